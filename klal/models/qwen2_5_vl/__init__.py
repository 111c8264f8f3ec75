"""Qwen2.5-VL, klal's first family: :data:`FAMILY` describes it; :mod:`klal.models.qwen2_5_vl.tiny` builds the
embedded ``tiny`` model and :mod:`klal.models.qwen2_5_vl.replica` an offline replica of the 3B checkpoint.

Facts (transformers 5.x): 14-px patches merged 2 x 2 (one visual token per 28 x 28 px of the resized image),
``<|image_pad|>`` tokens between ``<|vision_start|>`` and ``<|vision_end|>``, 3-D mrope from ``mm_token_type_ids``;
the vision tower's window/full attention blocks; the 3B model has 16 query / 2 KV heads in 36 layers, the 7B 28 / 4 in
28 layers.
"""

from typing import Any

from klal.models.family import register_family
from klal.models.qwen2_vl.family import QwenVLFamily


class Qwen2_5_VLFamily(QwenVLFamily):
    """Qwen2.5-VL (``Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct``)."""

    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    tiny_alias = "tiny"
    modeling = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    config_class_name = "Qwen2_5_VLConfig"
    decoder_layer_name = "Qwen2_5_VLDecoderLayer"
    vision_block_name = "Qwen2_5_VLVisionBlock"
    processor_path = "transformers.models.qwen2_5_vl.processing_qwen2_5_vl:Qwen2_5_VLProcessor"
    stock_processor = "Qwen2_5_VLProcessor"
    box_convention = "resized_pixels"
    stock_video_processor = "Qwen2VLVideoProcessor"
    patch = 14

    def processor_class(self) -> type:
        from klal.models.qwen2_5_vl.tiny import ImageTextQwen2_5_VLProcessor

        return ImageTextQwen2_5_VLProcessor

    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """:func:`klal.models.qwen2_5_vl.tiny.tiny_config` (its checks of the tiny geometry included)."""
        from klal.models.qwen2_5_vl.tiny import tiny_config

        return tiny_config(tokenizer, **overrides)


FAMILY = register_family(Qwen2_5_VLFamily())
