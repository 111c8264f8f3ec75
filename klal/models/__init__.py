"""Model loading: the embedded ``tiny`` Qwen2.5-VL, the loader for real checkpoints, and language-model-only LoRA.

Also here: :mod:`klal.models.identity` (which base model is this, by content) and :mod:`klal.models.replica` (a
Qwen2.5-VL-3B-Instruct replica with the real tokenizer and hub layout, for tests and benches).

The names below are imported on first use (PEP 562), so that ``from klal.models.config import ModelConfig`` does not
pull in torch and transformers through this package.
"""

import importlib
from typing import Any

_WHERE = {
    "ModelConfig": "klal.models.config",
    "load_model_and_processor": "klal.models.loader",
    "load_processor": "klal.models.loader",
    "resolve_dtype": "klal.models.loader",
    "set_text_attn_implementation": "klal.models.loader",
    "text_config": "klal.models.loader",
    "with_saved_pixel_bounds": "klal.models.loader",
    "LoraSettings": "klal.models.lora",
    "apply_lora": "klal.models.lora",
    "language_lora_regex": "klal.models.lora",
    "train_base_parts": "klal.models.lora",
    "trainable_parameter_summary": "klal.models.lora",
    "ImageTextQwen2_5_VLProcessor": "klal.models.tiny",
    "build_tiny_model": "klal.models.tiny",
    "build_tiny_processor": "klal.models.tiny",
    "build_tiny_tokenizer": "klal.models.tiny",
    "tiny_config": "klal.models.tiny",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'klal.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
