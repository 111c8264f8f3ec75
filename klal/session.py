"""A model session: a VLM (optionally with a LoRA adapter) and its processor, with the passes that grounding methods,
evaluation, the probes callback, the studies and the benches need.

:class:`GroundingModel` renders prompts as training does (:class:`klal.data.collate.KLALCollator`), runs forward
passes with the capture on (:mod:`klal.capture`, never ``output_attentions``), takes gradients at the language model's
input embeddings, appends tokens and decodes greedily (:mod:`klal.decode`); it counts forward and backward passes so
that every method's cost can be reported. What differs between model families (input keys, where the language model
lives, how grids are read) comes from the model's :class:`klal.models.family.VLMFamily`.

Also here: the row helpers every consumer of dataset rows shares (:func:`sample_images`, :func:`text_only_mask`,
:func:`image_rows`) and :func:`load_adapter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from klal.capture import CaptureRequest, enable_capture, select_queries
from klal.data.collate import KLALCollator, PromptSettings
from klal.data.images import to_rgb
from klal.data.schema import is_text_only
from klal.models.family import family_of, nest_grids, split_grids
from klal.models.loader import text_config

if TYPE_CHECKING:
    from klal.decode import Decoding


class GroundingError(ValueError):
    """Bad input to a grounding method; the message names the sample or option at fault."""


def sample_images(sample: dict[str, Any]) -> list[Image.Image]:
    """The sample's images as RGB PIL images (a row holds one image or a list).

    Returns:
        At least one image: this is the one check every method relies on for "the sample has an image".

    Raises:
        GroundingError: a text-only sample (nothing to ground; callers skip those rows with :func:`image_rows`), or an
            image that is not a PIL image.
    """
    if is_text_only(sample["image"]):
        raise GroundingError(
            f"sample {sample.get('id')!r} is text-only (no image): grounding methods need an image; "
            "leave text-only rows out (klal.grounding.base.image_rows)"
        )
    ims = sample["image"] if isinstance(sample["image"], (list, tuple)) else [sample["image"]]
    try:
        return [to_rgb(im, sample.get("id")) for im in ims]
    except TypeError as e:
        raise GroundingError(str(e)) from e


def text_only_mask(rows: Any) -> list[bool]:
    """Which rows are text-only samples (:func:`klal.data.schema.is_text_only`: ``image`` None or an empty list).

    For a ``datasets.Dataset`` the ``image`` column is read as Arrow, so no image is decoded (a whole split can be
    scanned before any model runs); any other sequence of rows is checked row by row.

    Args:
        rows: a ``datasets.Dataset`` in the klal schema, or a sequence of row dicts.
    """
    import datasets

    if isinstance(rows, datasets.Dataset):
        import pyarrow as pa
        import pyarrow.compute as pc

        col = rows.with_format("arrow")["image"]  # honours select() indices; the images stay encoded
        mask = col.is_null()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            # A multi-image column: an empty list is text-only too (a null length is already covered above).
            mask = pc.or_(mask, pc.fill_null(pc.equal(pc.list_value_length(col), 0), False))
        return [bool(v) for v in mask.to_pylist()]
    return [is_text_only(rows[i]["image"]) for i in range(len(rows))]


def image_rows(rows: Any, limit: int | None = None) -> tuple[Any, int]:
    """The rows that have an image, in order, and how many text-only rows were left out.

    Args:
        rows: a ``datasets.Dataset`` (the result is a ``select`` of it, images still undecoded) or a sequence of row
            dicts (the result is a list).
        limit: keep at most this many image rows (the first ones). Text-only rows after the last kept image row are
            not counted: they were never passed over.

    Returns:
        ``(kept, skipped)``: the image rows and the number of text-only rows skipped among the rows scanned.
    """
    import datasets

    mask = text_only_mask(rows)
    keep: list[int] = []
    skipped = 0
    for i, text_only in enumerate(mask):
        if limit is not None and len(keep) >= limit:
            break
        if text_only:
            skipped += 1
        else:
            keep.append(i)
    if isinstance(rows, datasets.Dataset):
        return rows.select(keep), skipped
    return [rows[i] for i in keep], skipped


class GroundingModel:
    """A VLM of a supported family (optionally with a LoRA adapter) prepared for grounding probes.

    Layers are counted the way klal's layer specs count them: :attr:`num_layers` is the number of full-attention layers
    (every layer except on hybrid models such as Qwen3.5), and a method's layer ``l`` is the ``l``-th of them
    (:attr:`attention_layers` holds their decoder-layer indices).

    Args:
        model: a ``...ForConditionalGeneration`` of a supported family, or a peft model around one.
        processor: its processor.
        prompt: chat rendering (same as training, so probes see the prompts the model was tuned on).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, prompt: PromptSettings | None = None) -> None:
        enable_capture(model)
        self.model = model
        self.processor = processor
        self.family = family_of(model)
        self.collator = KLALCollator(processor, prompt=prompt, family=self.family)
        self.image_token_id = self.family.grid_token_id(processor)
        self.text_config = text_config(model)
        self.attention_layers = self.family.attention_layers(self.text_config)
        self.num_layers = len(self.attention_layers)
        self.num_heads = int(self.text_config.num_attention_heads)
        self.passes = {"forward": 0, "backward": 0}

    @classmethod
    def load(cls, backbone: Any, adapter: str | None = None, prompt: PromptSettings | None = None) -> GroundingModel:
        """Load a base model (:class:`klal.models.loader.ModelConfig`) and, optionally, a peft adapter trained on it.

        Raises:
            GroundingError: the adapter directory is missing or was trained on another base model.
        """
        from klal.models.loader import load_model_and_processor, with_saved_pixel_bounds

        # The adapter's saved pixel bounds, unless the caller chose others: the visual grid it was trained on.
        backbone = with_saved_pixel_bounds(backbone, adapter) if adapter else backbone
        model, processor = load_model_and_processor(backbone)
        if adapter:
            model = load_adapter(model, adapter, backbone.name_or_path)
        gm = cls(model, processor, prompt)
        gm.model.eval()
        for p in gm.model.parameters():
            p.requires_grad_(False)
        return gm

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[GroundingModel]:
        """Use a model that is being trained: eval mode and frozen weights inside, everything restored after.

        Gradient methods (entropy gradient, grad-att) then leave no ``.grad`` on the trained weights.
        """
        was_training = self.model.training
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        grads = [(p, p.grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for p, g in grads:
                p.grad = g
            self.model.train(was_training)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    # -- inputs -----------------------------------------------------------------------------------------------------
    def inputs(self, images: Sequence[Image.Image], question: str) -> dict[str, Any]:
        """Chat prompt (ending with the assistant header) for ``images`` + ``question`` as model tensors.

        Returns:
            The family's model inputs (:attr:`klal.models.family.VLMFamily.input_keys`) on the model device, plus
            ``layout`` (per image, its visual-token grids ``(rows, cols)`` in sequence order: one on the Qwen
            families), ``grids`` (per image, the grid its relevance map is on: :meth:`split_grid` gives maps on
            them), ``image_wh`` (``[(w, h)]`` per image; not ``image_sizes``, which is a LLaVA model input) and
            ``visual_mask`` ``(1, S)`` (the grid cells' positions).
        """
        text = self.collator.prompt_text(question, len(images))
        enc = self.processor(
            text=[text],
            images=self.family.processor_images([list(images)]),
            return_tensors="pt",
            add_special_tokens=False,  # the chat template wrote them, as in training
        )
        out: dict[str, Any] = {k: v.to(self.device) for k, v in enc.items() if torch.is_tensor(v)}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        per_image = self.family.image_grids(self.processor, enc, len(images))
        out["layout"] = per_image
        out["grids"] = [self.family.map_footprint(self.processor, im.height, im.width).shape for im in images]
        out["image_wh"] = [(im.width, im.height) for im in images]
        out["visual_mask"] = self.family.visual_token_mask(out["input_ids"], self.image_token_id, [per_image])
        return out

    def _model_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: inputs[k] for k in self.family.input_keys if k in inputs}

    def layer_ids(self, layers: Iterable[int] | None) -> list[int]:
        """Decoder-layer indices of the attention layers numbered ``layers`` (None: all of them; never a layer the
        family leaves out, such as Gemma 3's sliding-window ones)."""
        return list(self.attention_layers) if layers is None else [self.attention_layers[i] for i in layers]

    def forward(self, inputs: dict[str, Any], request: CaptureRequest | None = None) -> torch.Tensor:
        """One forward pass; returns the logits ``(1, S, vocab)``."""
        kw = self._model_kwargs(inputs)
        if request is not None:
            kw["klal_capture"] = request
        self.passes["forward"] += 1
        return self.model(**kw, use_cache=False).logits

    def backward(self, scalar: torch.Tensor) -> None:
        """Backpropagate ``scalar`` (counted as one backward pass)."""
        self.passes["backward"] += 1
        scalar.backward()

    # -- passes the methods need ------------------------------------------------------------------------------------
    def request(
        self,
        inputs: dict[str, Any],
        query_pos: int | Sequence[int] | None = None,
        layers: Iterable[int] | None = None,
        per_head: bool = True,
        differentiable_rows: bool = False,
    ) -> CaptureRequest:
        """A capture request for the given query positions (default: the last prompt token) over the visual tokens."""
        s = inputs["input_ids"].shape[1]
        pos = [s - 1] if query_pos is None else ([query_pos] if isinstance(query_pos, int) else list(query_pos))
        qmask = torch.zeros((1, s), dtype=torch.bool, device=self.device)
        qmask[0, [p % s for p in pos]] = True
        req = CaptureRequest.from_masks(qmask, inputs["visual_mask"], self.layer_ids(layers))
        req.per_head = per_head
        req.differentiable_rows = differentiable_rows
        return req

    def attention(
        self,
        inputs: dict[str, Any],
        query_pos: int | None = None,
        layers: Iterable[int] | None = None,
        per_head: bool = True,
    ) -> torch.Tensor:
        """Attention of one query position (default: last prompt token) over the visual tokens.

        Returns:
            ``(L, H, V)`` probabilities (``(L, V)`` head-mean without ``per_head``), renormalised over the visual
            tokens per head, for the requested layers in increasing order.
        """
        req = self.request(inputs, query_pos, layers, per_head)
        with torch.no_grad():
            self.forward(inputs, req)
        maps = req.stacked().exp()  # (L, 1, H, 1, V) or (L, 1, 1, V)
        req.clear()
        return maps[:, 0, :, 0] if per_head else maps[:, 0, 0]

    def batch_attention(
        self,
        samples: Sequence[dict[str, Any]],
        query: Literal["prompt_last", "answer_last"] = "prompt_last",
        layers: Iterable[int] | None = None,
        per_head: bool = True,
    ) -> list[tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]]:
        """:meth:`attention` for several samples in ONE forward pass, on the training collator's right-padded batch.

        Every sample is rendered as in training (prompt, gold answer, end of turn) by :class:`KLALCollator`, and one
        query token per sample is read with the capture: ``prompt_last``, the token before the answer (causal
        attention never reaches the appended answer, so its map is the single-sample prompt map), or
        ``answer_last``, the gold answer's last content token (teacher-forced). Padded keys get no attention, so each
        sample's map is the one a pass on that sample alone gives, up to float round-off.

        Args:
            samples: dataset rows (``id``, ``image``, ``question``, ``answer``).
            query: which token's attention to read.
            layers: language layers (default all), in increasing order in the result.
            per_head: keep heads (``(L, H, V_i)``) instead of the head mean (``(L, V_i)``).

        Returns:
            Per sample: the maps (probabilities over its ``V_i`` visual tokens, renormalised per head), its layout
            (per image, its grids: :meth:`split_grid` takes it) and its image sizes ``[(w, h)]``.

        Raises:
            GroundingError: unknown ``query``, or a sample with an empty answer (naming it).
        """
        if query not in ("prompt_last", "answer_last"):
            raise GroundingError(f"batch_attention: query must be prompt_last or answer_last, not {query!r}")
        if not samples:
            return []
        rows = [
            {
                "id": s.get("id"),
                "image": sample_images(s),
                "question": s["question"],
                "answer": str(s["answer"]),
                "evidence": None,  # the batch is only model input here; targets are not needed
            }
            for s in samples
        ]
        try:
            batch = self.collator(rows)
        except ValueError as e:
            raise GroundingError(str(e)) from e
        kw = {k: batch[k].to(self.device) for k in self.family.input_keys if k in batch}
        kw["pixel_values"] = kw["pixel_values"].to(self.model.dtype)
        qmask = select_queries(batch["answer_mask"].to(self.device), "last" if query == "answer_last" else query)
        visual = self.family.visual_token_mask(
            kw["input_ids"], self.image_token_id, nest_grids(batch["grids"], batch["grid_image"])
        )
        req = CaptureRequest.from_masks(qmask, visual, self.layer_ids(layers))
        req.per_head = per_head
        self.passes["forward"] += 1
        with torch.no_grad():
            self.model(**kw, klal_capture=req, use_cache=False)
        maps = req.stacked().exp()  # (L, B, H, 1, V) or (L, B, 1, V)
        n_keys = req.key_valid.sum(-1).tolist()
        req.clear()
        out = []
        for i, row in enumerate(rows):
            m = maps[:, i, :, 0, : n_keys[i]] if per_head else maps[:, i, 0, : n_keys[i]]
            layout = nest_grids([batch["grids"][i]], [batch["grid_image"][i]])[0]
            out.append((m, layout, [(im.width, im.height) for im in row["image"]]))
        return out

    def visual_embeds_grad(
        self, inputs: dict[str, Any], objective: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 norm of the gradient of ``objective(logits)`` with respect to each visual token's input embedding.

        The visual token embeddings are the vision features the model scatters into its image-token positions, i.e.
        the language model's ``inputs_embeds`` at the grid cells' positions.

        Returns:
            ``(V,)`` gradient norms (visual tokens in sequence order) and the objective's value.
        """
        lm = self.family.language_model(self.model)
        holder: dict[str, torch.Tensor] = {}

        def pre_hook(_module, args, kwargs):
            emb = kwargs["inputs_embeds"].detach().requires_grad_(True)
            holder["emb"] = emb
            kwargs["inputs_embeds"] = emb
            return args, kwargs

        handle = lm.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.enable_grad():
                logits = self.forward(inputs)
                value = objective(logits)
                self.backward(value)
        finally:
            handle.remove()
        grad = holder["emb"].grad[0]  # (S, D)
        vis = inputs["visual_mask"][0]
        return grad[vis].float().norm(dim=-1).detach(), value.detach()

    def append_tokens(self, inputs: dict[str, Any], ids: Sequence[int]) -> dict[str, Any]:
        """``inputs`` (one prompt, from :meth:`inputs`) with the token ``ids`` appended, as the model reads them.

        The attention mask grows with ones and the family's per-token inputs
        (:attr:`klal.models.family.VLMFamily.token_inputs`) with their text value, so the model reads the appended
        tokens as it reads them when they are part of the encoded text; the other keys (images, grids, sizes) are
        kept and ``visual_mask`` is recomputed.
        """
        ids_t = inputs["input_ids"]
        extra = torch.tensor([list(ids)], dtype=ids_t.dtype, device=ids_t.device)  # (1, n)
        out = dict(inputs)
        out["input_ids"] = torch.cat([ids_t, extra], dim=1)
        mask = inputs.get("attention_mask", torch.ones_like(ids_t))
        out["attention_mask"] = torch.cat([mask, torch.ones_like(extra, dtype=mask.dtype)], dim=1)
        for key, fill in self.family.token_inputs.items():
            if key in inputs:
                out[key] = torch.nn.functional.pad(inputs[key], (0, extra.shape[1]), value=fill)
        out["visual_mask"] = self.family.visual_token_mask(out["input_ids"], self.image_token_id, [inputs["layout"]])
        return out

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: the family's end-of-turn token, the tokenizer's eos and the image tokens
        (:meth:`klal.models.family.VLMFamily.stop_token_ids`)."""
        return self.family.stop_token_ids(self.processor)

    def generate(
        self,
        inputs: dict[str, Any],
        max_new_tokens: int = 16,
        logits_fn: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
        decoding: Decoding = "greedy",
    ) -> str:
        """Decoding of the answer, by default greedy (:func:`klal.decode.greedy_generate`: truly greedy, whatever the
        checkpoint's generation config says); stops at the end-of-turn token or the tokenizer's eos.

        Args:
            inputs: from :meth:`inputs`.
            max_new_tokens: decoding cap.
            logits_fn: optional hook ``(next_logits (vocab,), generated_ids) -> logits`` (LASER's contrastive
                decoding); it may run its own forward passes. Greedy decoding only.
            decoding: ``greedy``, or ``generation_config`` (:func:`klal.decode.config_generate`: the checkpoint's
                generation config applies, as in the authors' baselines).

        Returns:
            The answer text; each decoding step counts as one forward pass.
        """
        hook = None
        if logits_fn is not None:

            def hook(logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
                return logits_fn(logits[0], generated[0])[None]  # one prompt: (1, vocab)

        new = self.decode_ids(self._model_kwargs(inputs), max_new_tokens, hook, decoding)[0]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    def decode_ids(
        self,
        model_inputs: dict[str, Any],
        max_new_tokens: int,
        logits_hook: Callable[[torch.Tensor, list[list[int]]], torch.Tensor] | None = None,
        decoding: Decoding = "greedy",
    ) -> list[list[int]]:
        """:func:`klal.decode.generate_ids` (by default greedy) on a (left-padded) batch of prompts, stopping at
        :attr:`stop_ids`; counts one forward pass per decoding step, the stop token's included."""
        from klal.decode import generate_ids

        ids = generate_ids(self.model, model_inputs, max_new_tokens, self.stop_ids, decoding, logits_hook)
        self.passes["forward"] += min(max_new_tokens, max((len(t) for t in ids), default=0) + 1)
        return ids

    # -- grids ------------------------------------------------------------------------------------------------------
    def split_grid(
        self,
        vec: torch.Tensor | np.ndarray,
        layout: Sequence[Sequence[tuple[int, int]]],
        image_wh: Sequence[tuple[int, int]] | None = None,
    ) -> list[np.ndarray]:
        """Cut a ``(..., V)`` per-visual-token array into one ``(..., rows, cols)`` map per image.

        Args:
            vec: values over the visual tokens in sequence order.
            layout: per image, its grids (``inputs["layout"]``, or a :meth:`batch_attention` sample's); an image with
                several grids gets one map on its map grid (:meth:`klal.models.family.VLMFamily.merge_grids`).
            image_wh: per image its ``(W, H)`` (``inputs["image_wh"]``), so that several grids merge through their
                tokens' footprints (:meth:`klal.models.family.VLMFamily.footprints`); None merges them as equal
                cells over the image.
        """
        arr = vec.detach().float().cpu().numpy() if torch.is_tensor(vec) else np.asarray(vec, dtype=np.float64)
        flat = [tuple(g) for grids in layout for g in grids]
        maps = iter(split_grids(arr, flat))
        out = []
        for j, grids in enumerate(layout):
            fps = None
            if image_wh is not None and len(grids) > 1:
                w, h = image_wh[j]
                fps = self.family.footprints(self.processor, int(h), int(w), grids)
            out.append(self.family.merge_grids([next(maps) for _ in grids], fps))
        return out


def load_adapter(model: torch.nn.Module, adapter: str, base_name: str) -> torch.nn.Module:
    """Wrap ``model`` with the peft adapter at ``adapter``, refusing one trained on another base model.

    Raises:
        GroundingError: missing adapter files, or an adapter whose recorded base differs from ``base_name``.
    """
    import os

    from peft import PeftModel

    from klal.checkpoint.adapter import check_adapter_base

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise GroundingError(f"adapter {adapter!r} has no adapter_config.json")
    # By content (architecture + frozen weights), so the hub id, its snapshot path and a copy are all accepted.
    check_adapter_base(model, adapter, base_name, error=GroundingError)
    return PeftModel.from_pretrained(model, adapter)
