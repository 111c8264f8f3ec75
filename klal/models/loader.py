"""Load a Qwen2.5-VL (the embedded ``tiny`` model, a hub id or a local folder) with its processor.

The text backbone's attention implementation is a choice (``sdpa``, ``eager``, ``flash_attention_2`` or a name
registered with transformers' ``AttentionInterface``, such as klal's capture attention); the vision tower always runs
sdpa. :func:`set_text_attn_implementation` switches the text backbone later without touching the vision tower.

Processors are always assembled from their parts (tokenizer, the PIL Qwen2-VL image processor, chat template) into
:class:`~klal.models.tiny.ImageTextQwen2_5_VLProcessor`, because transformers' own ``Qwen2_5_VLProcessor`` cannot be
loaded without torchvision (its video processor needs it). The PIL image processor resizes with the same
``smart_resize`` rule, so the visual-token grid is the same as with the torchvision one; pixel values can differ
slightly from the torchvision resize.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PretrainedConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from klal.hub import check_cached_when_offline
from klal.models.config import TINY, ModelConfig
from klal.models.tiny import (
    ImageTextQwen2_5_VLProcessor,
    _check_pixels,
    build_tiny_model,
    build_tiny_processor,
    tiny_config,
)

__all__ = [
    "DTYPES",
    "ModelConfig",
    "load_model_and_processor",
    "load_processor",
    "resolve_dtype",
    "set_text_attn_implementation",
    "text_config",
    "with_saved_pixel_bounds",
]

QWEN2_5_VL_MODEL_TYPE = "qwen2_5_vl"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# owner/name, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def text_config(model_or_config: Any) -> Any:
    """The language model's config of a Qwen2.5-VL model (bare or peft-wrapped) or config; a text-only config as is."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "text_config", cfg)


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """The torch dtype ``cfg.dtype`` stands for (``auto``: float32 for tiny, bfloat16 otherwise)."""
    if cfg.dtype == "auto":
        return torch.float32 if cfg.is_tiny else torch.bfloat16
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model dtype {cfg.dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return DTYPES[cfg.dtype]


def _check_attn_name(name: str, option: str = "attn_implementation") -> None:
    if name != "eager" and name not in ALL_ATTENTION_FUNCTIONS:
        available = sorted({"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()})
        raise ValueError(f"{option}={name!r} is not a registered attention implementation; available: {available}")


def _check_source(name_or_path: str) -> str:
    """Validate a checkpoint reference; returns it unchanged (local folders expanded)."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model folder {path!r} has no config.json (is it a saved Qwen2.5-VL checkpoint?)")
        return path
    if os.path.exists(path):
        raise ValueError(f"model name_or_path {name_or_path!r} is a file; give the checkpoint folder or a hub id")
    if not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(
            f"model name_or_path {name_or_path!r} is neither 'tiny', an existing folder, nor a hub id (owner/name)"
        )
    check_cached_when_offline(name_or_path)
    return name_or_path


def _check_model_type(source: str) -> None:
    config_dict, _ = PretrainedConfig.get_config_dict(source)
    model_type = config_dict.get("model_type")
    if model_type != QWEN2_5_VL_MODEL_TYPE:
        raise ValueError(
            f"checkpoint {source!r} has model_type={model_type!r}; klal supports Qwen2.5-VL ({QWEN2_5_VL_MODEL_TYPE!r})"
        )


# Files klal writes beside what it saves (training's adapter folder, an export), holding the backbone settings.
_KLAL_RECORDS = ("klal_export.json", "klal_adapter.json")


def with_saved_pixel_bounds(cfg: ModelConfig, folder: str | os.PathLike | None = None) -> ModelConfig:
    """``cfg`` with the pixel bounds klal saved in ``folder`` (default: ``cfg.name_or_path``), for each bound that
    ``cfg`` leaves at its default; a bound set to another value is the caller's choice and is kept.

    ``folder`` is an adapter folder (``klal_adapter.json``) or an export (``klal_export.json``); other folders (a hub
    checkpoint, whose preprocessor config allows up to 12.8 M pixels) and hub ids leave ``cfg`` as it is.
    """
    folder = os.fspath(folder if folder is not None else cfg.name_or_path)
    saved: dict[str, Any] = {}
    for name in _KLAL_RECORDS:
        path = os.path.join(os.path.expanduser(folder), name)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f).get("backbone") or {}
            break
    defaults = ModelConfig()
    changes = {
        key: int(saved[key])
        for key in ("min_pixels", "max_pixels")
        if saved.get(key) is not None and getattr(cfg, key) == getattr(defaults, key)
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_processor(cfg: ModelConfig) -> Qwen2_5_VLProcessor:
    """The processor of ``cfg``'s checkpoint with ``cfg``'s pixel bounds (no model weights are read).

    A folder klal exported keeps the bounds it was trained with unless ``cfg`` sets others
    (:func:`with_saved_pixel_bounds`).
    """
    if not cfg.is_tiny:
        cfg = with_saved_pixel_bounds(cfg)
    _check_pixels(cfg.min_pixels, cfg.max_pixels)
    if cfg.is_tiny:
        return build_tiny_processor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    source = _check_source(cfg.name_or_path)
    _check_model_type(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Passed as keywords so they win over min_pixels/max_pixels stored in older checkpoints' preprocessor configs.
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        source, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
    )
    size = image_processor.size
    if (size["shortest_edge"], size["longest_edge"]) != (cfg.min_pixels, cfg.max_pixels):
        raise RuntimeError(
            f"image processor of {source!r} ignored min_pixels/max_pixels: got size {dict(size)}, "
            f"wanted ({cfg.min_pixels}, {cfg.max_pixels})"
        )
    processor_dict, _ = Qwen2_5_VLProcessor.get_processor_dict(source)
    chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise ValueError(f"checkpoint {source!r} has no chat template (chat_template.jinja/.json or tokenizer config)")
    return ImageTextQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def _check_pair(model: Qwen2_5_VLForConditionalGeneration, processor: Any, source: str) -> None:
    """Refuse a processor whose image tokens or patch geometry disagree with the model."""
    cfg, vis, ip = model.config, model.config.vision_config, processor.image_processor
    pairs = {
        "image_token_id": (cfg.image_token_id, processor.image_token_id),
        "patch_size": (vis.patch_size, ip.patch_size),
        "spatial_merge_size / merge_size": (vis.spatial_merge_size, ip.merge_size),
        "temporal_patch_size": (vis.temporal_patch_size, ip.temporal_patch_size),
    }
    bad = {k: v for k, v in pairs.items() if int(v[0]) != int(v[1])}
    if bad:
        detail = ", ".join(f"{k}: model {m} vs processor {p}" for k, (m, p) in bad.items())
        raise ValueError(f"processor does not match model {source!r}: {detail}")


def load_model_and_processor(
    cfg: ModelConfig, processor: Qwen2_5_VLProcessor | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Load the model (eval mode) and its processor.

    Args:
        cfg: what to load.
        processor: reuse this processor (e.g. one built earlier by :func:`load_processor`) instead of loading it again;
            it is checked against the model's image-token id and patch geometry.

    Raises:
        FileNotFoundError: ``name_or_path`` is neither ``tiny``, an existing checkpoint folder, nor a hub id.
        ValueError: a checkpoint of another architecture, or a bad dtype/attention/pixel option.
    """
    from klal.kernels import resolve_attn_implementation

    dtype = resolve_dtype(cfg)
    # flash_attention_2 falls back to sdpa where flash-attn cannot run, so one config serves every machine.
    text_attn = resolve_attn_implementation(cfg.attn_implementation)
    _check_attn_name(text_attn)
    attn = {"text_config": text_attn, "vision_config": "sdpa"}
    processor = processor if processor is not None else load_processor(cfg)
    if cfg.is_tiny:
        config = tiny_config(tokenizer=processor.tokenizer, **(cfg.tiny_overrides or {}))
        model = build_tiny_model(config, seed=cfg.tiny_seed, attn_implementation=attn, dtype=dtype)
        source = TINY
        # peft records this as the adapter's base model, so an adapter trained on the tiny model names its base.
        model.config._name_or_path = TINY
        model.name_or_path = TINY
    else:
        if cfg.tiny_overrides:
            raise ValueError(f"tiny_overrides apply only to the tiny model, not to {cfg.name_or_path!r}")
        source = _check_source(cfg.name_or_path)
        _check_model_type(source)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=dtype, attn_implementation=attn)
        model.eval()
    _check_pair(model, processor, source)
    return model, processor


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_text_attn_implementation(model: torch.nn.Module, name: str) -> None:
    """Switch only the language model's attention implementation; the vision tower keeps its own.

    Works on a bare Qwen2.5-VL or a peft-wrapped one. ``name`` must be ``eager`` or registered with
    ``AttentionInterface`` (register a mask function under the same name too, or padding is ignored).

    Raises:
        ValueError: ``name`` is not registered.
        RuntimeError: transformers did not apply the change as asked.
    """
    _check_attn_name(name, option="text attention implementation")
    base = _unwrap(model)
    config = base.config
    if not hasattr(config, "text_config") or not hasattr(config, "vision_config"):
        raise TypeError(f"expected a Qwen2.5-VL model, got {type(base).__name__}")
    vision_before = config.vision_config._attn_implementation
    base.set_attn_implementation({"text_config": name})
    text_now = config.text_config._attn_implementation
    vision_now = config.vision_config._attn_implementation
    if text_now != name or vision_now != vision_before:
        raise RuntimeError(
            f"setting the text attention to {name!r} gave text={text_now!r}, vision={vision_now!r} "
            f"(vision was {vision_before!r})"
        )
