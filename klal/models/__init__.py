"""Model loading: the embedded ``tiny`` Qwen2.5-VL, the loader for real checkpoints, and language-model-only LoRA.

Also here: :mod:`klal.models.identity` (which base model is this, by content) and :mod:`klal.models.replica` (a
Qwen2.5-VL-3B-Instruct replica with the real tokenizer and hub layout, for tests and benches).
"""

from klal.models.loader import (
    ModelConfig,
    load_model_and_processor,
    load_processor,
    resolve_dtype,
    set_text_attn_implementation,
    text_config,
    with_saved_pixel_bounds,
)
from klal.models.lora import (
    LoraSettings,
    apply_lora,
    language_lora_regex,
    train_base_parts,
    trainable_parameter_summary,
)
from klal.models.tiny import (
    ImageTextQwen2_5_VLProcessor,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_tokenizer,
    tiny_config,
)

__all__ = [
    "ImageTextQwen2_5_VLProcessor",
    "LoraSettings",
    "ModelConfig",
    "apply_lora",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "language_lora_regex",
    "load_model_and_processor",
    "load_processor",
    "resolve_dtype",
    "set_text_attn_implementation",
    "text_config",
    "tiny_config",
    "train_base_parts",
    "trainable_parameter_summary",
    "with_saved_pixel_bounds",
]
