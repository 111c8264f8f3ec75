"""Collator: schema rows -> VLM model inputs, answer-only labels, and target maps on each image's token grids.

Each row is rendered with the processor's chat template as ``user: <image> question`` followed by the
assistant answer. The prompt goes through the processor (which expands the image placeholder to the image's tokens;
the chat template writes any special tokens, so the tokenizer adds none). The family's per-token inputs
(:attr:`klal.models.family.VLMFamily.token_inputs`: on the Qwen families ``mm_token_type_ids``, without which the model
silently falls back to 1-D positions; on Gemma 3 ``token_type_ids``, which open the bidirectional attention inside an
image) are kept and padded with the family's value. The answer is tokenised separately and appended with the family's
end-of-turn token (:attr:`~klal.models.family.VLMFamily.end_of_turn`), so the answer-token positions are exact. Labels
are ``-100`` everywhere except the answer and its end-of-turn token.

Target maps are built on every grid the processor actually produced (the model family's
:meth:`~klal.models.family.VLMFamily.image_grids`: ``image_grid_thw`` h/2 x w/2 on the Qwen families, a base view and
anyres tiles on LLaVA-OneVision) from the evidence in original-image pixels, and concatenated in the order the visual
tokens appear in the sequence (images in order, grids in order, row-major), which is the key order of
:class:`klal.capture.CaptureRequest`. An image with several grids gives each grid an equal share of its mass.

Several images in one sample: give the row ``image`` as a list of images and ``evidence`` as a list of evidence dicts,
one per image (an empty dict for an image without evidence). With ``joint`` supervision each image that has a map gets
an equal share of the target mass.

Text-only samples: a row whose ``image`` is None or an empty list renders without an image placeholder, so it has no
image tokens and its per-token inputs hold the text value. It gets no target map, counted in
:class:`NoMapCounter` with the reason ``no image``, and trains with next-token loss only. Its evidence must be empty.
Text-only and image rows can share a batch (the model's 3-D positions give text rows plain 1-D ones). A batch without
any image has no ``pixel_values`` / ``image_grid_thw``: the model then skips the vision tower and numbers the positions
itself, which for text gives the same attention (the three mrope axes coincide and rotary attention depends only on
position differences, so left padding shifts nothing). Its ``target`` / ``key_image`` are ``(B, 1)`` placeholders
with no valid visual token.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import torch

from klal.data.images import to_rgb
from klal.data.schema import Evidence, is_text_only
from klal.data.targets import TargetMapError, TargetSpec, grid_target_maps
from klal.models.family import VLMFamily, processor_family

IGNORE_INDEX = -100
NO_IMAGE_REASON = "no image"
"""The :class:`NoMapCounter` reason of text-only samples."""


class _BatchTensors(TypedDict):
    input_ids: torch.Tensor
    """(B, S) long: chat-formatted prompt (with the image placeholder expanded to the image's tokens), answer and
    end-of-turn token ids; padded with the pad id on the right (training) or left (generation)."""
    attention_mask: torch.Tensor
    """(B, S) long: 1 for real tokens, 0 for padding."""
    labels: torch.Tensor
    """(B, S) long: the answer and end-of-turn token ids, :data:`IGNORE_INDEX` (-100) everywhere else (NTP targets;
    the model shifts them)."""
    answer_mask: torch.Tensor
    """(B, S) bool: the answer's content tokens (not the end-of-turn token): where the KLAL queries are chosen."""
    target: torch.Tensor
    """(B, V) float32: each sample's target distribution over its visual tokens in sequence order (images in order,
    row-major per image), summing to 1 where ``has_target``; V is the batch's largest visual-token count (at least 1),
    zero beyond a sample's own tokens."""
    has_target: torch.Tensor
    """(B,) bool: the sample has a target map (False: text-only, or no evidence mass; see ``no_map_reason``)."""
    key_image: torch.Tensor
    """(B, V) long: index (within the sample) of the image each visual-token slot belongs to, -1 for padding slots."""
    grids: list[list[tuple[int, int]]]
    """Per sample: its visual-token grids ``(rows, cols)`` in sequence order (one per image on the Qwen families,
    :meth:`klal.models.family.VLMFamily.image_grids`)."""
    grid_image: list[list[int]]
    """Per sample, per grid: the index (within the sample) of the image the grid belongs to."""
    image_wh: list[list[tuple[int, int]]]
    """Per sample, per image: its original ``(width, height)`` (what the grids' footprints are computed from)."""
    no_map_reason: list[str | None]
    """Per sample: why it has no target map (one of :data:`klal.data.targets.NO_MAP_REASONS`, ``no image``, ...),
    or None."""
    ids: list[str]
    """Per sample: the row's ``id`` (named in errors), else its position in the batch."""


class KLALBatch(_BatchTensors, total=False):
    """What :class:`KLALCollator` returns: the model inputs, the NTP labels and the KLAL targets of B samples padded
    to S tokens. The family's image keys (:attr:`klal.models.family.VLMFamily.image_input_keys`) are present only
    when the batch holds at least one image (the model runs its vision tower only when ``pixel_values`` is given)."""

    pixel_values: torch.Tensor
    """float32: the processor's pixels of every image of the batch, images in order (Qwen: ``(P, 3 * 2 * p * p)``
    patches, P = sum of t*h*w of ``image_grid_thw``, p the patch side)."""
    image_grid_thw: torch.Tensor
    """(N, 3) long, Qwen families: per image, its patch grid (t, h, w); visual tokens = t*h*w / 4."""
    image_sizes: torch.Tensor
    """(N, 2) long, LLaVA-OneVision: per image, its original (height, width)."""
    pixel_attention_mask: torch.Tensor
    """(B, N, M, M) long, SmolVLM: per sample, per view (tile or global, padded to the batch's most), its valid
    pixels."""
    mm_token_type_ids: torch.Tensor
    """(B, S) long, Qwen families: 0 text, 1 image token; the model derives its 3-D mrope positions from it."""
    token_type_ids: torch.Tensor
    """(B, S) long, Gemma 3: 0 text, 1 image token; the model lets the tokens of one image attend to each other."""
    word_mask: torch.Tensor
    """(B, S) bool, only when some row's meta names a ``query_word``: True on that word's tokens in the question
    (its last occurrence; the ``word`` KLAL query supervises the last of them)."""


@dataclass
class PromptSettings:
    """How a schema row becomes a chat."""

    system_prompt: str | None = None
    """System message; None keeps the chat template's default."""
    question_suffix: str = ""
    """Text appended to every question (e.g. an answer-format instruction)."""
    end_of_turn: str | None = None
    """Token that ends the assistant turn; it is appended to the answer and supervised by NTP. None: the model
    family's (:attr:`klal.models.family.VLMFamily.end_of_turn`)."""


@dataclass
class NoMapCounter:
    """Counts samples that got no target map, by reason (reported in logs and by the demo)."""

    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        """Count one sample without a map."""
        self.reasons[reason] += 1

    @property
    def total(self) -> int:
        """All samples without a map so far."""
        return sum(self.reasons.values())


class KLALCollator:
    """Turn a list of schema rows into one padded batch.

    Args:
        processor: a processor klal built for a supported family (tokenizer + image processor + chat template).
        target: how evidence becomes a target map.
        prompt: chat rendering settings.
        padding_side: ``right`` for training, ``left`` for batched generation.
        max_length: refuse samples longer than this many tokens (None: no limit).
        family: the model family (default: the one that built ``processor``).
    """

    def __init__(
        self,
        processor: Any,
        target: TargetSpec | None = None,
        prompt: PromptSettings | None = None,
        padding_side: Literal["left", "right"] = "right",
        max_length: int | None = None,
        family: VLMFamily | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.target = target or TargetSpec()
        self.prompt = prompt or PromptSettings()
        self.padding_side = padding_side
        self.max_length = max_length
        self.family = family or processor_family(processor)
        self.image_token_id = self.family.grid_token_id(processor)
        self.end_of_turn = self.prompt.end_of_turn or self.family.end_of_turn
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.no_map = NoMapCounter()

    # -- prompt rendering ---------------------------------------------------------------------------------------
    def prompt_text(self, question: str, num_images: int) -> str:
        """The chat-formatted prompt up to and including the assistant header."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question + self.prompt.question_suffix})
        messages: list[dict[str, Any]] = []
        if self.prompt.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.prompt.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer_ids(self, answer: str) -> tuple[list[int], int]:
        """Token ids of ``answer + end_of_turn`` (after the family's answer prefix) and the count of answer content
        tokens among them."""
        content = self.tokenizer(self.family.answer_prefix + answer, add_special_tokens=False)["input_ids"]
        end = self.tokenizer(self.end_of_turn, add_special_tokens=False)["input_ids"]
        return list(content) + list(end), len(content)

    def word_span(self, prompt_ids: list[int], row: dict[str, Any], index: int) -> tuple[int, int] | None:
        """Token span ``[start, end)`` in ``prompt_ids`` of the question word the row's meta names as
        ``query_word`` (its last occurrence), or None when the meta names none.

        The word is looked up as its own tokens with and without a leading space, as a byte-level BPE tokenises it
        inside a sentence; a word the prompt does not contain that way is an error naming the sample.
        """
        meta = row.get("meta")
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                return None  # free-form meta names no word
        word = meta.get("query_word") if isinstance(meta, dict) else None
        if not word:
            return None
        for text in (" " + word, word):
            w = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(len(prompt_ids) - len(w), -1, -1):
                if prompt_ids[start : start + len(w)] == w:
                    return start, start + len(w)
        raise ValueError(
            f"sample {row.get('id', index)!r}: meta query_word {word!r} is not a token sequence of the prompt "
            f"(question {row.get('question')!r})"
        )

    def _refused_sample(self, rows: list[dict[str, Any]], images_per_row: list[list[Any]], prompts: list[str]) -> str:
        """``sample 'ID'`` (with its image size) of the first row the processor refuses on its own; ``samples ...``
        naming the whole batch when none is refused alone."""
        for i, (row, ims, prompt) in enumerate(zip(rows, images_per_row, prompts)):
            try:
                self.processor(
                    text=[prompt],
                    images=self.family.processor_images([ims]),
                    padding=False,
                    return_tensors=None,
                    add_special_tokens=False,
                )
            except ValueError:
                sizes = ", ".join(f"{im.width} x {im.height}" for im in ims)
                return f"sample {_sample_id(row, i)!r} (image {sizes})" if ims else f"sample {_sample_id(row, i)!r}"
        return "samples " + ", ".join(repr(_sample_id(r, i)) for i, r in enumerate(rows))

    # -- main entry -----------------------------------------------------------------------------------------------
    def __call__(self, rows: list[dict[str, Any]]) -> KLALBatch:
        images_per_row = [
            [to_rgb(im, _sample_id(r, i)) for im in _row_images(r, _sample_id(r, i))] for i, r in enumerate(rows)
        ]
        images = [im for ims in images_per_row for im in ims]
        prompts = [self.prompt_text(r["question"], len(ims)) for r, ims in zip(rows, images_per_row)]
        try:
            enc = self.processor(
                text=prompts,
                images=self.family.processor_images(images_per_row),
                padding=False,
                return_tensors=None,
                add_special_tokens=False,  # the chat template wrote them (a bos the tokenizer added would be a second)
            )
        except ValueError as e:  # the processor refuses an image (an aspect ratio over 200) without naming it
            raise ValueError(f"{self._refused_sample(rows, images_per_row, prompts)}: {e}") from None
        image_grids = self.family.image_grids(self.processor, enc, len(images))

        seqs, labels, answer_masks, word_masks = [], [], [], []
        token_inputs: dict[str, list[list[int]]] = {k: [] for k in self.family.token_inputs}
        for i, row in enumerate(rows):
            p_ids = list(enc["input_ids"][i])
            word = self.word_span(p_ids, row, i)
            a_ids, n_content = self.answer_ids(str(row["answer"]))
            if n_content == 0 or not str(row["answer"]).strip():
                raise ValueError(f"sample {row.get('id', i)!r}: empty answer {row['answer']!r} (nothing to supervise)")
            ids = p_ids + a_ids
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"sample {row.get('id', i)!r}: {len(ids)} tokens exceed max_length={self.max_length} "
                    "(lower max_pixels or raise max_length)"
                )
            seqs.append(ids)
            labels.append([IGNORE_INDEX] * len(p_ids) + a_ids)
            answer_masks.append([0] * len(p_ids) + [1] * n_content + [0] * (len(a_ids) - n_content))
            for key, fill in self.family.token_inputs.items():
                values = list(enc[key][i]) if key in enc else [fill] * len(p_ids)
                token_inputs[key].append(values + [fill] * len(a_ids))
            word_masks.append(None if word is None else [word[0] <= k < word[1] for k in range(len(ids))])

        batch = self._pad(seqs, labels, answer_masks, token_inputs, word_masks)
        if images:
            # Without any image the keys stay out: the model runs its vision tower only when pixel_values is given,
            # and an empty pixel tensor would still enter it.
            for key in self.family.image_input_keys:
                value = np.asarray(enc[key])
                batch[key] = torch.as_tensor(value, dtype=torch.float32 if value.dtype.kind == "f" else torch.long)
        batch.update(self._targets(rows, images_per_row, image_grids))
        batch["image_wh"] = [[(im.width, im.height) for im in ims] for ims in images_per_row]
        batch["ids"] = [str(r.get("id", i)) for i, r in enumerate(rows)]
        return batch

    def _pad(self, seqs, labels, answer_masks, token_inputs, word_masks) -> dict[str, torch.Tensor]:
        n = max(len(s) for s in seqs)
        b = len(seqs)
        out = {
            "input_ids": torch.full((b, n), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((b, n), dtype=torch.long),
            "labels": torch.full((b, n), IGNORE_INDEX, dtype=torch.long),
            "answer_mask": torch.zeros((b, n), dtype=torch.bool),
        }
        for key, fill in self.family.token_inputs.items():
            out[key] = torch.full((b, n), fill, dtype=torch.long)
        # Only when some row names a question word: the key's absence tells the ``word`` query there is none.
        if any(w is not None for w in word_masks):
            out["word_mask"] = torch.zeros((b, n), dtype=torch.bool)
        for i, (s, lab, am, wm) in enumerate(zip(seqs, labels, answer_masks, word_masks)):
            sl = slice(n - len(s), n) if self.padding_side == "left" else slice(0, len(s))
            out["input_ids"][i, sl] = torch.tensor(s)
            out["attention_mask"][i, sl] = 1
            out["labels"][i, sl] = torch.tensor(lab)
            out["answer_mask"][i, sl] = torch.tensor(am, dtype=torch.bool)
            for key, values in token_inputs.items():
                out[key][i, sl] = torch.tensor(values[i])
            if wm is not None:
                out["word_mask"][i, sl] = torch.tensor(wm, dtype=torch.bool)
        return out

    def _targets(self, rows, images_per_row, image_grids) -> dict[str, Any]:
        """``target`` (B, V), ``has_target`` (B,), ``key_image`` (B, V), ``grids``, ``grid_image`` and
        ``no_map_reason`` per row.

        An image with several grids (anyres tiling) gets the same evidence on each grid, each grid an equal share of
        the image's mass; a sample with several images gives each image that has a map an equal share.
        """
        per_row_maps: list[list[np.ndarray | None]] = []
        grids: list[list[tuple[int, int]]] = []
        grid_image: list[list[int]] = []
        reasons: list[str | None] = []
        k = 0
        for i, (row, ims) in enumerate(zip(rows, images_per_row)):
            evs = row.get("evidence")
            if not ims:
                _check_no_evidence(evs, _sample_id(row, i))
                per_row_maps.append([])
                grids.append([])
                grid_image.append([])
                reasons.append(NO_IMAGE_REASON)
                continue
            ev_list = evs if isinstance(evs, list) else [evs] + [None] * (len(ims) - 1)
            if len(ev_list) != len(ims):
                raise ValueError(f"sample {row.get('id', i)!r}: {len(ims)} images but {len(ev_list)} evidence entries")
            maps, g, owner, why = [], [], [], []
            n_with = 0
            for j, (im, ev) in enumerate(zip(ims, ev_list)):
                im_grids = image_grids[k]
                k += 1
                evidence = ev if isinstance(ev, Evidence) else Evidence.from_dict(ev)
                # Each token's mass is the evidence inside what its patches saw (the family's footprints).
                fps = self.family.footprints(self.processor, im.height, im.width, im_grids)
                try:
                    im_maps, grid_why = grid_target_maps(evidence, (im.height, im.width), fps, self.target)
                except TargetMapError as e:
                    raise TargetMapError(f"sample {row.get('id', i)!r}: {e}") from e
                why.extend(grid_why)
                n_with += any(m is not None for m in im_maps)
                maps.extend(im_maps)
                g.extend(im_grids)
                owner.extend([j] * len(im_grids))
            per_row_maps.append([None if m is None else m / n_with for m in maps])
            grids.append(g)
            grid_image.append(owner)
            if n_with == 0:
                reasons.append("; ".join(sorted({r for r in why if r})) or "no evidence")
            else:
                reasons.append(None)
        # Counted only once the whole batch is valid, so a batch that raises leaves no partial counts behind.
        for reason in reasons:
            if reason is not None:
                self.no_map.add(reason)

        n_vis = [sum(h * w for h, w in g) for g in grids]
        v = max(max(n_vis, default=0), 1)
        target = torch.zeros((len(rows), v), dtype=torch.float32)
        key_image = torch.full((len(rows), v), -1, dtype=torch.long)
        for i, (maps, g, owner) in enumerate(zip(per_row_maps, grids, grid_image)):
            off = 0
            for m, (gh, gw), j in zip(maps, g, owner):
                key_image[i, off : off + gh * gw] = j
                if m is not None:
                    target[i, off : off + gh * gw] = torch.from_numpy(m.reshape(-1)).float()
                off += gh * gw
        return {
            "target": target,
            "has_target": torch.tensor([r is None for r in reasons], dtype=torch.bool),
            "key_image": key_image,
            "grids": grids,
            "grid_image": grid_image,
            "no_map_reason": reasons,
        }


def _sample_id(row: dict[str, Any], index: int) -> str:
    """The id errors name: the row's ``id``, else its position in the batch."""
    return str(row.get("id", index))


def _row_images(row: dict[str, Any], sample_id: str) -> list[Any]:
    """The row's images as a list: empty for a text-only sample (``image`` None or an empty list).

    Raises:
        ValueError: the row has no ``image`` field at all (a text-only sample says so with ``image: None``).
    """
    if "image" not in row:
        raise ValueError(
            f"sample {sample_id!r}: no 'image' field; give an image, a list of images, or None for a text-only sample"
        )
    image = row["image"]
    if is_text_only(image):
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _check_no_evidence(evidence: Any, sample_id: str) -> None:
    """Refuse evidence on a text-only sample: there is no image for it to point into.

    Accepts None, an empty list, or evidence dicts / :class:`Evidence` without geometry (the schema column always
    holds a dict, with empty lists for a text-only row).
    """
    entries = evidence if isinstance(evidence, list) else [evidence]
    for ev in entries:
        if ev is None:
            continue
        if not isinstance(ev, (dict, Evidence)):
            raise TypeError(f"sample {sample_id!r}: evidence must be a dict, got {type(ev).__name__}")
        if not (ev if isinstance(ev, Evidence) else Evidence.from_dict(ev)).is_empty():
            raise ValueError(f"sample {sample_id!r}: has evidence but no image; a text-only sample has empty evidence")
