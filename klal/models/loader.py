"""Load a VLM of any supported family (an embedded tiny model, a hub id or a local folder) with its processor.

What differs between architectures comes from the checkpoint's :class:`klal.models.family.VLMFamily` (found by its
``config.model_type``): the model class, how the processor is assembled, the checks between the two. The text
backbone's attention implementation is a choice (``sdpa``, ``eager``, ``flash_attention_2`` or a name registered with
transformers' ``AttentionInterface``, such as klal's capture attention); the vision tower always runs sdpa.
:func:`set_text_attn_implementation` switches the text backbone later without touching the vision tower.

Processors are assembled from their parts (tokenizer, the family's PIL image processor, chat template) without the
video processor, because transformers' stock VLM processors cannot be built without torchvision; the PIL image
processors resize with the same rule as the torchvision ones, so the visual-token grid is the same (pixel values can
differ slightly).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from klal.geometry import check_pixels
from klal.hub import check_cached_when_offline
from klal.models.config import ModelConfig
from klal.models.family import TINY_ALIASES, VLMFamily, family_for_name

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
    """The language model's config of a VLM (bare or peft-wrapped) or config; a text-only config as is."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "text_config", cfg)


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """The torch dtype ``cfg.dtype`` stands for (``auto``: float32 for the tiny and bundled models, bfloat16
    otherwise)."""
    if cfg.dtype == "auto":
        return torch.float32 if cfg.is_tiny or cfg.is_bundled else torch.bfloat16
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
            raise FileNotFoundError(f"model folder {path!r} has no config.json (is it a saved checkpoint?)")
        return path
    if os.path.exists(path):
        raise ValueError(f"model name_or_path {name_or_path!r} is a file; give the checkpoint folder or a hub id")
    if not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(
            f"model name_or_path {name_or_path!r} is neither a tiny model ({', '.join(TINY_ALIASES)}), an existing "
            "folder, nor a hub id (owner/name)"
        )
    check_cached_when_offline(name_or_path)
    return name_or_path


def model_family(cfg: ModelConfig) -> VLMFamily:
    """The family of the model ``cfg`` names (its ``config.model_type``; a tiny alias names its family).

    Raises:
        FileNotFoundError: ``name_or_path`` is neither a tiny model, an existing checkpoint folder, nor a hub id.
        ValueError: a checkpoint of an architecture klal does not support (listing the supported ones).
    """
    return family_for_name(cfg.name_or_path if cfg.is_tiny else _check_source(cfg.name_or_path))


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


def load_processor(cfg: ModelConfig) -> Any:
    """The processor of ``cfg``'s checkpoint with ``cfg``'s pixel bounds (no model weights are read).

    A folder klal exported keeps the bounds it was trained with unless ``cfg`` sets others
    (:func:`with_saved_pixel_bounds`).
    """
    if not cfg.is_tiny:
        cfg = with_saved_pixel_bounds(cfg)
    check_pixels(cfg.min_pixels, cfg.max_pixels)
    family = model_family(cfg)
    if cfg.is_tiny:
        return family.build_tiny_processor(cfg.min_pixels, cfg.max_pixels)
    return family.load_processor(_check_source(cfg.name_or_path), cfg.min_pixels, cfg.max_pixels)


def load_model_and_processor(cfg: ModelConfig, processor: Any = None) -> tuple[torch.nn.Module, Any]:
    """Load the model (eval mode) and its processor.

    Args:
        cfg: what to load.
        processor: reuse this processor (e.g. one built earlier by :func:`load_processor`) instead of loading it again;
            it is checked against the model's image-token id and geometry.

    Raises:
        FileNotFoundError: ``name_or_path`` is neither a tiny model, an existing checkpoint folder, nor a hub id.
        ValueError: a checkpoint of an unsupported architecture, or a bad dtype/attention/pixel option.
    """
    from klal.kernels import resolve_attn_implementation

    dtype = resolve_dtype(cfg)
    family = model_family(cfg)
    # A kernel that cannot run here (flash-attn, flex, hub kernels) falls back to sdpa, so one config serves every
    # machine.
    text_attn = resolve_attn_implementation(cfg.attn_implementation, family.model_class())
    _check_attn_name(text_attn)
    attn = {"text_config": text_attn, "vision_config": "sdpa"}
    processor = processor if processor is not None else load_processor(cfg)
    if cfg.is_tiny:
        config = family.tiny_config(processor.tokenizer, **(cfg.tiny_overrides or {}))
        model = family.build_tiny_model(config, seed=cfg.tiny_seed, attn_implementation=attn, dtype=dtype)
        source = cfg.name_or_path
        # peft records this as the adapter's base model, so an adapter trained on a tiny model names its base.
        model.config._name_or_path = source
        model.name_or_path = source
    else:
        if cfg.tiny_overrides:
            raise ValueError(f"tiny_overrides apply only to the tiny models, not to {cfg.name_or_path!r}")
        source = _check_source(cfg.name_or_path)
        model = family.model_class().from_pretrained(source, dtype=dtype, attn_implementation=attn)
        model.eval()
    family.check_pair(model, processor, source)
    return model, processor


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_text_attn_implementation(model: torch.nn.Module, name: str) -> None:
    """Switch only the language model's attention implementation; the vision tower keeps its own.

    Works on a bare VLM or a peft-wrapped one. ``name`` must be ``eager`` or registered with
    ``AttentionInterface`` (register a mask function under the same name too, or padding is ignored).

    Raises:
        ValueError: ``name`` is not registered.
        RuntimeError: transformers did not apply the change as asked.
    """
    _check_attn_name(name, option="text attention implementation")
    base = _unwrap(model)
    config = base.config
    if not hasattr(config, "text_config") or not hasattr(config, "vision_config"):
        raise TypeError(f"expected a vision-language model (text and vision configs), got {type(base).__name__}")
    vision_before = config.vision_config._attn_implementation
    base.set_attn_implementation({"text_config": name})
    text_now = config.text_config._attn_implementation
    vision_now = config.vision_config._attn_implementation
    if text_now != name or vision_now != vision_before:
        raise RuntimeError(
            f"setting the text attention to {name!r} gave text={text_now!r}, vision={vision_now!r} "
            f"(vision was {vision_before!r})"
        )
