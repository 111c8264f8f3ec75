"""The model-family seam: everything klal needs to know about one VLM architecture, in one record.

klal's training, evaluation and grounding code is written once against :class:`VLMFamily`; each supported
architecture supplies one subclass in its own folder (``klal/models/<family>/``), registered here by the
``config.model_type`` transformers gives its checkpoints, the way transformers' Auto classes map model types to
classes. Nothing outside ``klal/models/<family>/`` names a family's classes or constants.

What a family tells (the rest of klal reads nothing else about the architecture):

* **visual-token geometry**: how an image of a given size becomes one or more grids of LLM visual tokens
  (:meth:`VLMFamily.grids_for_size`, :meth:`VLMFamily.processor_grids`), which grids the processor actually produced
  (:meth:`VLMFamily.image_grids`), and, per grid, each token's **footprint**: the part of the original image its
  patches saw (:meth:`VLMFamily.footprints`, a :class:`klal.geometry.Footprint`). Target maps, evidence cells,
  grounding metrics, method boxes and crops all map original pixels to tokens through the footprints and nothing
  else. The default, equal cells over the whole image, is exact when the processor resizes the whole image by one
  scale per axis (the Qwen families' ``smart_resize``); a family whose processor pads, tiles, leaves margins or
  pools overrides it (LLaVA-OneVision). Several grids per image follow each other in the sequence, e.g.
  LLaVA-OneVision's base view then its anyres tile map. A *tile-major* family (tokens contiguous per tile: SmolVLM /
  Idefics3 image splitting, InternVL dynamic tiles, each followed or preceded by a global/thumbnail view) gives one
  grid per tile plus one for the global view, in sequence order, each with its own footprint: a tile's tokens see
  only that tile's part of the original image (its axis intervals lie inside the tile, with the tile's resize
  scale), the global view's see the whole image squashed; :meth:`VLMFamily.merge_grids` then stitches the tile
  maps into one map (and adds the global view resampled through the footprints), and :meth:`VLMFamily.map_grid` /
  :meth:`VLMFamily.map_footprint` name the stitched grid. Separators between tiles or rows that are image tokens
  but not cells are left out by :meth:`VLMFamily.visual_token_mask`. A grid may be empty (0 rows or columns: a
  LLaVA-OneVision tile map that unpads to nothing); it holds no cells and has no footprint;
* the chat and processor facts: the end-of-turn token, which token is one grid cell
  (:meth:`VLMFamily.grid_token_id`), the stop tokens of decoding, whether the processor takes images nested per
  prompt, the per-token model inputs and how they pad (:attr:`VLMFamily.token_inputs`), the tiny tokenizer;
* the model-input keys, where the decoder layers are and which of them are full attention
  (:meth:`VLMFamily.attention_layers`: KLAL and the attention methods act only on those), the eager attention function
  the capture replays, the LoRA layer prefix, the FSDP wrap classes, the positions of prompt and generated tokens for
  cached decoding, the stock processor names of an export, and whether the pixel-budget options apply;
* how to build its tiny random model and processor offline (for tests and CPU runs), and how to load a checkpoint's
  processor.

Register a family with :func:`register_family`; look one up with :func:`family_of` (a model or config),
:func:`family_for_type` (a ``model_type``) or :func:`family_for_name` (a ``ModelConfig.name_or_path``).
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from klal.geometry import Footprint

FAMILY_MODULES: dict[str, str] = {
    "qwen2_5_vl": "klal.models.qwen2_5_vl",
    "qwen2_vl": "klal.models.qwen2_vl",
    "qwen3_vl": "klal.models.qwen3_vl",
    "qwen3_5": "klal.models.qwen3_5",
    "llava_onevision": "klal.models.llava_onevision",
    "gemma3": "klal.models.gemma3",
    "idefics3": "klal.models.smolvlm",
    "internvl": "klal.models.internvl",
}
"""``config.model_type`` -> the module whose ``FAMILY`` describes it (imported on first use, so that looking up a
family does not import every architecture)."""

TINY_ALIASES: dict[str, str] = {
    "tiny": "qwen2_5_vl",
    "tiny-qwen2-vl": "qwen2_vl",
    "tiny-qwen3-vl": "qwen3_vl",
    "tiny-qwen3.5": "qwen3_5",
    "tiny-llava-onevision": "llava_onevision",
    "tiny-gemma3": "gemma3",
    "tiny-smolvlm": "idefics3",
    "tiny-internvl": "internvl",
}
"""``ModelConfig.name_or_path`` names of the embedded tiny random models, one per family (``tiny`` is Qwen2.5-VL)."""

DEFAULT_MODEL_TYPE = TINY_ALIASES["tiny"]
"""The family options default to where a model type is asked for without a model (Qwen2.5-VL, klal's first)."""

Grid = tuple[int, int]
"""``(rows, cols)`` of one grid of visual tokens, row-major; where its tokens look is its footprint
(:meth:`VLMFamily.footprints`). Either may be 0 (an empty grid, no cells)."""

_FAMILIES: dict[str, VLMFamily] = {}


class UnsupportedModelError(ValueError):
    """A checkpoint or model of an architecture no registered family describes."""


class VLMFamily(abc.ABC):
    """What klal knows about one VLM architecture; one subclass per family, one instance registered per model type.

    Attributes:
        name: the family's name (its folder under ``klal/models/``), e.g. ``qwen2_5_vl``.
        model_type: the ``config.model_type`` of its checkpoints.
        label: a human-readable name for messages and docs.
        tiny_alias: the ``ModelConfig.name_or_path`` of its embedded tiny model.
        input_keys: the model inputs of a prompt, as the processor returns them (``labels`` not included).
        image_input_keys: the inputs that exist only when the batch holds an image.
        pixel_bounds: whether ``min_pixels`` / ``max_pixels`` set the resized image area (Qwen's ``smart_resize``).
        stock_processor: the transformers processor class name an export's ``processor_config.json`` names.
    """

    name: ClassVar[str]
    model_type: ClassVar[str]
    label: ClassVar[str]
    tiny_alias: ClassVar[str]
    input_keys: ClassVar[tuple[str, ...]]
    image_input_keys: ClassVar[tuple[str, ...]]
    pixel_bounds: ClassVar[bool] = True
    stock_processor: ClassVar[str]
    box_convention: ClassVar[str | None] = None
    """How the family's instruct checkpoints write a box in generated text: ``resized_pixels`` (absolute pixels of
    the processor-resized image), ``normalized_1000`` (0-1000 of the image size) or ``normalized_1`` (0-1); None:
    unknown (answer boxes cannot be scored). :func:`klal.eval.benchmark_scores.answer_box_to_original` reads it."""

    # -- model classes and loading -------------------------------------------------------------------------------
    @abc.abstractmethod
    def model_class(self) -> type:
        """The transformers ``...ForConditionalGeneration`` class of this family."""

    def build_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        """The tiny model's processor (offline tokenizer, chat template, PIL image processor), marked as this
        family's."""
        return self.mark(self.make_tiny_processor(min_pixels, max_pixels))

    def load_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        """The processor of the checkpoint at ``source`` (a folder or a cached hub id), with these pixel bounds, marked
        as this family's."""
        return self.mark(self.read_processor(source, min_pixels, max_pixels))

    def mark(self, processor: Any) -> Any:
        """Record on ``processor`` which family built it (:func:`processor_family` reads it); returns it."""
        setattr(processor, PROCESSOR_MARK, self.model_type)
        return processor

    @abc.abstractmethod
    def make_tiny_processor(self, min_pixels: int, max_pixels: int) -> Any:
        """Build the tiny model's processor (unmarked)."""

    @abc.abstractmethod
    def read_processor(self, source: str, min_pixels: int, max_pixels: int) -> Any:
        """Read the checkpoint's processor (unmarked)."""

    @abc.abstractmethod
    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The tiny model's config (real transformers config class, small sizes); ``overrides`` by field name."""

    @abc.abstractmethod
    def check_pair(self, model: Any, processor: Any, source: str) -> None:
        """Refuse a processor whose image tokens or geometry disagree with ``model`` (ValueError naming both)."""

    @abc.abstractmethod
    def save_stock_processor(self, processor: Any, out: str) -> None:
        """Write ``processor`` to ``out`` in the layout the stock ``AutoProcessor`` of this family loads."""

    def build_tiny_model(
        self, config: Any = None, seed: int = 0, attn_implementation: str | dict = "sdpa", dtype: Any = None
    ) -> Any:
        """The tiny random model of this family, in eval mode.

        Args:
            config: None builds :meth:`tiny_config` with the tiny tokenizer; a given config is deep-copied, never
                modified (``_from_config`` keeps the object it is given, so two models must never share one).
            seed: weight-initialisation seed (the global RNG state is left as it was).
            attn_implementation: a name for the text backbone (the vision tower stays on sdpa), or a transformers dict
                ``{"text_config": ..., "vision_config": ...}``.
            dtype: parameter dtype (default float32).
        """
        import copy

        import torch

        if config is None:
            from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

            config = self.tiny_config(self.build_tiny_processor(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).tokenizer)
        cfg = copy.deepcopy(config)
        attn = attn_implementation
        if isinstance(attn, str):
            attn = {"text_config": attn, "vision_config": "sdpa"}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class()._from_config(cfg, attn_implementation=attn, dtype=dtype or torch.float32)
        text_cfg = cfg.text_config
        gen = model.generation_config
        gen.eos_token_id = [text_cfg.eos_token_id, text_cfg.pad_token_id]
        gen.pad_token_id = text_cfg.pad_token_id
        gen.bos_token_id = text_cfg.bos_token_id
        gen.do_sample = False
        return model.eval()

    # -- chat and processor facts -----------------------------------------------------------------------------------
    end_of_turn: ClassVar[str]
    """The token that closes an assistant turn in the family's chat format (appended to every answer and supervised
    by NTP; decoding stops there)."""

    answer_prefix: ClassVar[str] = ""
    """Text the family's chat format writes between the assistant header and the answer, which the generation prompt
    leaves to the model (SmolVLM's ``Assistant:`` is followed by a space): training answers start with it, so they
    read as the instruct checkpoints' own turns."""

    token_inputs: ClassVar[Mapping[str, int]] = {}
    """Per-token model inputs the processor returns beside ``input_ids`` / ``attention_mask`` (Qwen's
    ``mm_token_type_ids``, Gemma 3's ``token_type_ids``), each with the value that pads it and fills the tokens klal
    appends (answer, generated tokens: text)."""

    nested_images: ClassVar[bool] = False
    """Whether the processor takes the images as one list per prompt (Gemma 3) instead of one flat list."""

    def grid_token_id(self, processor: Any) -> int:
        """The token id of one grid cell in the expanded prompt (the model scatters one visual feature into each).

        The default is the processor's ``image_token_id`` (the Qwen and LLaVA families expand their placeholder into
        copies of it); a family whose placeholder differs from the cell token overrides it."""
        return int(processor.image_token_id)

    def stop_token_ids(self, processor: Any) -> list[int]:
        """Tokens that end a generated answer: the end-of-turn token, the tokenizer's eos, and the image tokens.

        The image tokens are no text: fed back with the prompt's images (LASER's negative view, EGG's rounds) the
        model would count one image token more than its images fill and refuse the input. Only an untrained model
        emits them."""
        tok = processor.tokenizer
        ends = (
            tok.convert_tokens_to_ids(self.end_of_turn),
            tok.eos_token_id,
            self.grid_token_id(processor),
            getattr(processor, "image_token_id", None),
        )
        return sorted({int(i) for i in ends if isinstance(i, int) and i != tok.unk_token_id})

    def processor_images(self, images_per_prompt: Sequence[Sequence[Any]]) -> list[Any] | None:
        """The ``images`` argument of one processor call for these prompts' images (None when there is none): one
        flat list in prompt order, or one list per prompt where :attr:`nested_images` says so."""
        if not any(len(ims) for ims in images_per_prompt):
            return None
        if self.nested_images:
            return [list(ims) for ims in images_per_prompt]
        return [im for ims in images_per_prompt for im in ims]

    def tiny_tokenizer(self) -> Any:
        """The tiny model's tokenizer (built offline: no download), with the family's special tokens and chat
        template."""
        from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

        return self.make_tiny_processor(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).tokenizer

    # -- geometry ------------------------------------------------------------------------------------------------
    def grids_for_size(self, height: int, width: int, min_pixels: int, max_pixels: int) -> list[Grid]:
        """The grids an image of this original size gives under a pixel budget, in sequence order (no processor
        needed).

        Raises:
            ValueError: the family's grids depend on its processor's settings, not on a pixel budget
                (:meth:`processor_grids` gives them).
        """
        raise ValueError(f"{self.label}'s grids depend on its processor; use processor_grids")

    def resized_hw(self, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        """The ``(height, width)`` the processor resizes an image to, for families with a pixel budget.

        Raises:
            ValueError: the family has no pixel-budget resize.
        """
        raise ValueError(f"{self.label} has no pixel-budget resize (min_pixels / max_pixels do not apply)")

    @abc.abstractmethod
    def processor_grids(self, processor: Any, height: int, width: int) -> list[Grid]:
        """The grids ``processor`` (with its own pixel bounds or resolutions) gives an image of this original size."""

    def image_token_count(self, processor: Any, height: int, width: int) -> int:
        """How many image tokens the prompt holds for one image of this size: the grids' cells, plus any separators
        a family inserts (LLaVA-OneVision's row ends)."""
        return sum(r * c for r, c in self.processor_grids(processor, height, width))

    @abc.abstractmethod
    def image_grids(self, processor: Any, enc: Mapping[str, Any], num_images: int) -> list[list[Grid]]:
        """Per image of ``processor``'s output ``enc`` (images in order), its grids in sequence order."""

    def visual_token_mask(
        self, input_ids: Any, image_token_id: int, image_grids: Sequence[Sequence[Sequence[Grid]]] | None = None
    ) -> Any:
        """``(B, S)`` bool: the positions that hold a grid cell (in sequence order: images, then grids, row-major).

        Args:
            input_ids: ``(B, S)`` token ids.
            image_token_id: the processor's image token.
            image_grids: per sample, per image, its grids (:func:`nest_grids` of a batch's ``grids`` and
                ``grid_image``); only a family whose image tokens include separators needs them.

        The default is every image token; a family whose image tokens include separators (row ends) overrides it.
        """
        return input_ids == image_token_id

    def merge_grids(self, maps: Sequence[Any], footprints: Sequence[Footprint | None] | None = None) -> Any:
        """One relevance map per image from the maps on each of its grids (``(..., rows, cols)`` numpy arrays, in
        sequence order), on the image's map grid (:meth:`map_grid`). Single-grid families return the one map.

        Args:
            maps: the maps, one per grid.
            footprints: the grids' footprints (:meth:`footprints`), for families that resample one grid onto another
                through them; None takes every grid as equal cells over the whole image.
        """
        if len(maps) != 1:
            raise ValueError(f"{self.label} gives one grid per image, got {len(maps)} maps")
        return maps[0]

    @staticmethod
    def map_grid(grids: Sequence[Grid]) -> Grid:
        """The grid an image's relevance map is reported on: its last (finest) grid that has cells."""
        with_cells = [g for g in grids if g[0] * g[1]]
        return tuple(with_cells[-1] if with_cells else grids[-1])

    def footprints(
        self, processor: Any, height: int, width: int, grids: Sequence[Grid] | None = None
    ) -> list[Footprint | None]:
        """Per grid of an image (sequence order), its tokens' footprints in the original image (None for an empty
        grid).

        The default is equal cells covering the whole image on every grid, which is exact for a processor that
        resizes the whole image by one scale per axis into whole tokens (the Qwen families' ``smart_resize``: a
        token is ``patch * merge`` px of the resized image, ``W / cols`` by ``H / rows`` px of the original).

        Args:
            processor: the family's processor (its settings fix the geometry).
            height: original image height in pixels.
            width: original image width in pixels.
            grids: the image's grids as :meth:`image_grids` gave them (default :meth:`processor_grids`); a family
                that computes footprints itself checks that they agree.
        """
        from klal.geometry import Footprint

        grids = self.processor_grids(processor, height, width) if grids is None else grids
        return [Footprint.uniform((height, width), g) if g[0] * g[1] else None for g in grids]

    def map_footprint(self, processor: Any, height: int, width: int) -> Footprint:
        """The footprint of the grid an image's relevance map is on (:meth:`map_grid`; what the grounding metrics
        and the methods' boxes use)."""
        grids = self.processor_grids(processor, height, width)
        fps = self.footprints(processor, height, width, grids)
        target = self.map_grid(grids)
        for g, fp in zip(reversed(grids), reversed(fps)):
            if tuple(g) == target and fp is not None:
                return fp
        raise RuntimeError(f"{self.label}: no footprint for the map grid {target} of a {height} x {width} image")

    # -- layers ----------------------------------------------------------------------------------------------------
    decoder_name: ClassVar[str] = "language_model"
    """The attribute name of the text decoder (the module with ``.layers``) in the model tree (Idefics3's is
    ``text_model``); :meth:`language_model` and :attr:`lora_layers_pattern` both follow from it."""

    def language_model(self, model: Any) -> Any:
        """The text decoder module (the one with ``.layers``) of a plain or peft-wrapped model."""
        for name, mod in model.named_modules():
            if name.endswith(self.decoder_name) and hasattr(mod, "layers"):
                return mod
        raise RuntimeError(f"could not find the language model of a {self.label} model (a '*{self.decoder_name}')")

    def attention_layers(self, text_config: Any) -> list[int]:
        """Indices of the decoder layers with full (softmax) attention: every layer unless the family is hybrid."""
        return list(range(int(text_config.num_hidden_layers)))

    @property
    def lora_layers_pattern(self) -> str:
        """Regex, anchored in LoRA target patterns, for the language model's decoder layers (never the vision
        tower's)."""
        return rf"{re.escape(self.decoder_name)}\.layers"

    @abc.abstractmethod
    def fsdp_wrap_classes(self, vision_blocks: bool) -> set[type]:
        """The module classes FSDP wraps one unit each: the decoder layer, plus the vision block if asked."""

    @abc.abstractmethod
    def eager_attention(self) -> Callable[..., Any]:
        """The family's eager attention function, which the capture replays for the ``eager`` kernel."""

    # -- positions for cached decoding ---------------------------------------------------------------------------
    def prompt_positions(self, model: Any, inputs: Mapping[str, Any], mask: Any) -> Any:
        """The position ids of left-padded prompts as the model computes them (padding excluded); the default is
        1-D: ``(B, S)``, the running count of real tokens (padding at 0)."""
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def step_positions(self, next_pos: Any) -> Any:
        """The position ids of one generated token per row, from ``next_pos`` ``(B,)``; the default is 1-D
        ``(B, 1)``."""
        return next_pos[:, None].clone()

    @staticmethod
    def next_positions(positions: Any) -> Any:
        """``(B,)``: the position after each row's last prompt token (padding sits at 0, so it never wins the max)."""
        return positions.reshape(-1, *positions.shape[-2:]).amax(dim=(0, 2)) + 1


def register_family(family: VLMFamily) -> VLMFamily:
    """Make ``family`` the one for its ``model_type``; returns it (a module writes ``FAMILY = register_family(...)``).

    Raises:
        ValueError: another family is already registered for that model type.
    """
    old = _FAMILIES.get(family.model_type)
    if old is not None and type(old) is not type(family):
        raise ValueError(f"model type {family.model_type!r} already has the family {type(old).__name__}")
    _FAMILIES[family.model_type] = family
    return family


def family_for_type(model_type: str) -> VLMFamily:
    """The family registered for a ``config.model_type``.

    Raises:
        UnsupportedModelError: no family describes that model type (the message lists the supported ones).
    """
    if model_type not in _FAMILIES:
        if model_type not in FAMILY_MODULES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; klal supports {', '.join(sorted(FAMILY_MODULES))}"
            )
        importlib.import_module(FAMILY_MODULES[model_type])
    return _FAMILIES[model_type]


def family_of(model_or_config: Any) -> VLMFamily:
    """The family of a model (plain or peft-wrapped) or of its config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(cfg, "model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"{type(model_or_config).__name__} has no config.model_type")
    return family_for_type(model_type)


def model_type_of(name_or_path: str) -> str:
    """The ``model_type`` that ``ModelConfig.name_or_path`` names: a tiny alias's, or the checkpoint's ``config.json``
    (a local folder, or a hub id in the local cache; nothing is downloaded)."""
    if name_or_path in TINY_ALIASES:
        return TINY_ALIASES[name_or_path]
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"model folder {path!r} has no config.json (is it a saved checkpoint?)")
        with open(cfg_file) as f:
            model_type = json.load(f).get("model_type")
    else:
        from transformers import PretrainedConfig

        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
        model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedModelError(f"checkpoint {name_or_path!r} has no model_type in its config.json")
    return model_type


PROCESSOR_MARK = "klal_model_type"
"""Attribute every processor a family builds carries: the ``model_type`` it was built for (two families can share a
processor class, e.g. Qwen3-VL and Qwen3.5)."""


def processor_family(processor: Any) -> VLMFamily:
    """The family that built ``processor`` (:meth:`VLMFamily.build_tiny_processor` / :meth:`VLMFamily.load_processor`).

    Raises:
        UnsupportedModelError: a processor klal did not build (pass the family explicitly).
    """
    model_type = getattr(processor, PROCESSOR_MARK, None)
    if not isinstance(model_type, str):
        raise UnsupportedModelError(
            f"{type(processor).__name__} was not built by klal (klal.models.loader.load_processor); pass its family"
        )
    return family_for_type(model_type)


def family_for_name(name_or_path: str) -> VLMFamily:
    """The family of what ``ModelConfig.name_or_path`` names (a tiny alias, a folder or a cached hub id)."""
    model_type = model_type_of(name_or_path)
    try:
        return family_for_type(model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"checkpoint {name_or_path!r}: {e}") from None


def read_chat_parts(processor_class: type, source: str) -> tuple[dict[str, Any], Any, str]:
    """What every family's processor needs from a checkpoint folder or cached hub id: the ``processor_class``'s
    processor dict (``processor_config.json`` ...), the tokenizer (``AutoTokenizer``) and the chat template (the
    processor's, else the tokenizer's).

    Raises:
        ValueError: the checkpoint has no chat template.
    """
    from transformers import AutoTokenizer

    processor_dict, _ = processor_class.get_processor_dict(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise ValueError(f"checkpoint {source!r} has no chat template (chat_template.jinja/.json or tokenizer config)")
    return processor_dict, tokenizer, chat_template


def update_processor_config(out: str, **entries: Any) -> None:
    """Set ``entries`` in ``<out>/processor_config.json`` (created if missing), keeping its other keys."""
    path = os.path.join(out, "processor_config.json")
    config: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    config.update(entries)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def refuse_mismatch(pairs: Mapping[str, tuple[Any, Any]], source: str) -> None:
    """:meth:`VLMFamily.check_pair`'s refusal: ``pairs`` maps a fact to its ``(model, processor)`` values.

    Raises:
        ValueError: some pair differs, naming each and ``source``.
    """
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: model {m} vs processor {p}" for k, (m, p) in bad.items())
        raise ValueError(f"processor does not match model {source!r}: {detail}")


def save_with_stock_image_processor(processor: Any, out: str, image_processor_type: str, processor_class: str) -> None:
    """``processor.save_pretrained(out)``, with ``processor_config.json`` naming the stock image-processor type and
    processor class (klal builds the PIL image processors, whose own names the stock Auto classes may not map)."""
    processor.save_pretrained(out)
    image = {k: v for k, v in processor.image_processor.to_dict().items() if not k.startswith("_")}
    image["image_processor_type"] = image_processor_type
    image.pop("processor_class", None)
    update_processor_config(out, image_processor=image, processor_class=processor_class)


def nest_grids(grids: Sequence[Sequence[Grid]], grid_image: Sequence[Sequence[int]]) -> list[list[list[Grid]]]:
    """Per sample, per image, its grids: from a batch's flat per-sample ``grids`` and the image of each
    (``grid_image``)."""
    out: list[list[list[Grid]]] = []
    for g, owner in zip(grids, grid_image):
        per_image: list[list[Grid]] = [[] for _ in range(max(owner, default=-1) + 1)]
        for grid, j in zip(g, owner):
            per_image[j].append(tuple(grid))
        out.append(per_image)
    return out


def apply_tiny_overrides(
    text: dict[str, Any],
    vision: dict[str, Any],
    overrides: dict[str, Any],
    fields: tuple[set[str], set[str]],
    who: str,
    special: dict[str, Any] | None = None,
) -> None:
    """Merge a tiny config's ``overrides`` into its ``text`` and ``vision`` dicts (in place).

    Args:
        text: text-config fields.
        vision: vision-config fields.
        overrides: whole ``text_config`` / ``vision_config`` dicts, text fields by name, vision fields with a
            ``vision_`` prefix, or keys of ``special``.
        fields: the text and vision config classes' field names.
        who: the family, for the message.
        special: further keys the caller handles itself (updated in place).

    Raises:
        ValueError: an unknown override, naming it and what is accepted.
    """
    text.update(overrides.pop("text_config", None) or {})
    vision.update(overrides.pop("vision_config", None) or {})
    text_fields, vision_fields = fields
    for key, value in overrides.items():
        if special is not None and key in special:
            special[key] = value
        elif key.startswith("vision_") and key[len("vision_") :] in vision_fields:
            vision[key[len("vision_") :]] = value
        elif key in text_fields:
            text[key] = value
        else:
            extra = "".join(f"{k!r}, " for k in special or {})
            raise ValueError(
                f"tiny_config: unknown override {key!r} for {who}; use a text-config field, 'vision_<field>', "
                f"{extra}or text_config=/vision_config= dicts"
            )


def split_grids(vec: Any, grids: Sequence[Grid]) -> list[Any]:
    """Cut a ``(..., V)`` per-visual-token array into one ``(..., rows, cols)`` array per grid, in order.

    Raises:
        ValueError: ``V`` is not the grids' total cell count.
    """
    total = sum(h * w for h, w in grids)
    if vec.shape[-1] != total:
        raise ValueError(f"vector of {vec.shape[-1]} visual tokens does not match grids {list(grids)} ({total})")
    out, off = [], 0
    for h, w in grids:
        out.append(vec[..., off : off + h * w].reshape(*vec.shape[:-1], h, w))
        off += h * w
    return out
