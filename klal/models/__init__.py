"""Models: the model-family seam (:mod:`klal.models.family`), one folder per family (``qwen2_5_vl/``, ``qwen2_vl/``,
``qwen3_vl/``, ``qwen3_5/``, ``llava_onevision/``, ``gemma3/``), the loader for tiny models and real checkpoints, and
language-model-only LoRA.

Also here: :mod:`klal.models.identity` (which base model is this, by content); the Qwen2.5-VL folder holds the
embedded ``tiny`` model and :mod:`klal.models.qwen2_5_vl.replica` (a Qwen2.5-VL-3B-Instruct replica with the real
tokenizer and hub layout, for tests and benches).

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
    "VLMFamily": "klal.models.family",
    "family_for_name": "klal.models.family",
    "family_of": "klal.models.family",
    "model_family": "klal.models.loader",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'klal.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
