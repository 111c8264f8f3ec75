"""The embedded ``tiny`` Qwen2.5-VL: real transformers classes, random weights, an offline tokenizer.

Everything here is built in code, deterministically and without any download, so tests, the demo and CPU smoke runs
exercise exactly the code paths a real checkpoint uses (``Qwen2_5_VLForConditionalGeneration``, the Qwen2-VL image
processor with ``smart_resize``, 3-D mrope positions from ``mm_token_type_ids``, GQA attention, the vision tower's
window/full attention blocks and patch merger) at a size where a training step takes milliseconds.

Tokenizer, chat template and text sizes: the Qwen-VL line's shared tiny pieces (:mod:`klal.models.qwen2_vl.tiny`,
re-exported here).

Processor: :class:`ImageTextQwen2_5_VLProcessor`, a :class:`~transformers.Qwen2_5_VLProcessor` without the video
processor. transformers cannot build the stock processor without torchvision (its video processor needs it, and
``ProcessorMixin`` refuses a missing one), and klal never feeds videos; the subclass behaves identically for text and
images, returning ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_pixels
from klal.models.family import apply_tiny_overrides
from klal.models.qwen2_vl.family import ImageTextProcessorMixin, init_fields, qwen_config
from klal.models.qwen2_vl.tiny import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    QWEN2_SPECIAL_TOKENS,
    TINY_TEXT_DEFAULTS,
    build_tiny_tokenizer,
    default_mrope_section,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "ImageTextQwen2_5_VLProcessor",
    "QWEN2_SPECIAL_TOKENS",
    "TINY_TEXT_DEFAULTS",
    "TINY_VISION_DEFAULTS",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "default_mrope_section",
    "tiny_config",
]

TINY_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "initializer_range": 0.02,
}
_ROPE_THETA = 1_000_000.0
# Vision geometry that must agree with the tiny image processor (it produces the patches the tower consumes).
_PROCESSOR_GEOMETRY = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}


# -- processor ---------------------------------------------------------------------------------------------------------
class ImageTextQwen2_5_VLProcessor(ImageTextProcessorMixin, Qwen2_5_VLProcessor):
    """:class:`~transformers.Qwen2_5_VLProcessor` for text and images only (no video processor, so no torchvision).

    Args:
        image_processor: a Qwen2-VL image processor (klal uses the PIL one).
        tokenizer: a Qwen2 tokenizer with ``<|image_pad|>`` and ``<|video_pad|>`` in its vocabulary.
        chat_template: Jinja chat template; None keeps none (``apply_chat_template`` then needs one passed in).
    """

    stock_name = "Qwen2_5_VLProcessor"


def build_tiny_processor(
    min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Qwen2_5_VLProcessor:
    """The tiny model's processor: PIL Qwen2-VL image processor + tiny tokenizer + Qwen2.5-VL chat template.

    Args:
        min_pixels: lower bound on the resized image area (``smart_resize``).
        max_pixels: upper bound on the resized image area; 448*448 gives at most 256 visual tokens per image.
    """
    from klal.models.qwen2_5_vl import FAMILY

    check_pixels(min_pixels, max_pixels)
    return FAMILY.build_tiny_processor(min_pixels, max_pixels)


# -- config and model --------------------------------------------------------------------------------------------------
def tiny_config(tokenizer: PreTrainedTokenizerBase | None = None, **overrides: Any) -> Qwen2_5_VLConfig:
    """Config of the tiny Qwen2.5-VL (defaults: :data:`TINY_TEXT_DEFAULTS`, :data:`TINY_VISION_DEFAULTS`).

    Args:
        tokenizer: supplies the vocabulary size and special-token ids; None builds the tiny tokenizer.
        **overrides: language-model fields by name (``hidden_size=128``, ``num_hidden_layers=2``, ``mrope_section``,
            ``rope_theta``), vision fields with a ``vision_`` prefix (``vision_depth=4``, ``vision_hidden_size=64``),
            or whole dicts ``text_config={...}`` / ``vision_config={...}`` merged into the defaults. The vision output
            size follows the text hidden size and ``mrope_section`` follows the head size unless given.

    Raises:
        ValueError: an unknown override, a vision geometry the tiny image processor does not produce, or an
            inconsistent head layout.
    """
    tokenizer = tokenizer or build_tiny_tokenizer()
    text = dict(TINY_TEXT_DEFAULTS)
    vision = dict(TINY_VISION_DEFAULTS)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _ROPE_THETA}
    fields = (init_fields(Qwen2_5_VLTextConfig), init_fields(Qwen2_5_VLVisionConfig))
    special = {"mrope_section": None, "rope_theta": rope["rope_theta"]}
    apply_tiny_overrides(text, vision, overrides, fields, "Qwen2.5-VL", special)
    rope["rope_theta"] = special["rope_theta"]
    if special["mrope_section"] is not None:
        rope["mrope_section"] = special["mrope_section"]
    for key, want in _PROCESSOR_GEOMETRY.items():
        if vision.get(key) != want:
            raise ValueError(
                f"tiny_config: vision {key}={vision.get(key)} does not match the tiny image processor ({want})"
            )

    hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    if hidden % heads or heads % kv:
        raise ValueError(
            f"tiny_config: hidden_size ({hidden}) must divide by num_attention_heads ({heads}), "
            f"which must divide by num_key_value_heads ({kv})"
        )
    head_dim = hidden // heads
    rope.setdefault("mrope_section", default_mrope_section(head_dim))
    if sum(rope["mrope_section"]) != head_dim // 2:
        raise ValueError(f"tiny_config: mrope_section {rope['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
    if vision["hidden_size"] % vision["num_heads"]:
        raise ValueError(
            f"tiny_config: vision hidden_size ({vision['hidden_size']}) must divide by "
            f"num_heads ({vision['num_heads']})"
        )
    if any(not 0 <= i < vision["depth"] for i in vision["fullatt_block_indexes"]):
        raise ValueError(
            f"tiny_config: fullatt_block_indexes {vision['fullatt_block_indexes']} out of range for "
            f"depth {vision['depth']}"
        )
    vision.setdefault("out_hidden_size", hidden)
    if vision["out_hidden_size"] != hidden:
        raise ValueError(f"tiny_config: vision out_hidden_size ({vision['out_hidden_size']}) != text hidden ({hidden})")
    text["rope_parameters"] = rope
    return qwen_config(Qwen2_5_VLConfig, text, vision, tokenizer)


def build_tiny_model(
    config: Qwen2_5_VLConfig | None = None,
    seed: int = 0,
    attn_implementation: str | dict = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialised tiny Qwen2.5-VL, in eval mode (:meth:`klal.models.family.VLMFamily.build_tiny_model`).

    Args:
        config: None builds :func:`tiny_config`; a given config is deep-copied, never modified.
        seed: weight-initialisation seed (the global RNG state is left as it was).
        attn_implementation: a name for the text backbone (the vision tower stays on sdpa), or a transformers dict
            ``{"text_config": ..., "vision_config": ...}``.
        dtype: parameter dtype.
    """
    from klal.models.qwen2_5_vl import FAMILY

    return FAMILY.build_tiny_model(config if config is not None else tiny_config(), seed, attn_implementation, dtype)
