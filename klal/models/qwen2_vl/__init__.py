"""Qwen2-VL: the first of the Qwen-VL line (14-px patches, merge 2, 3-D mrope); :data:`FAMILY` describes it.

The line's shared machinery lives here too (:mod:`klal.models.qwen2_vl.family`, :mod:`klal.models.qwen2_vl.geometry`),
since Qwen2-VL's image processor and resize rule are the ones every later member reuses.
"""

from klal.models.family import register_family
from klal.models.qwen2_vl.family import QwenVLFamily


class Qwen2VLFamily(QwenVLFamily):
    """Qwen2-VL (``Qwen/Qwen2-VL-2B/7B/72B-Instruct``): vision output width is ``vision_config.hidden_size``."""

    name = "qwen2_vl"
    model_type = "qwen2_vl"
    label = "Qwen2-VL"
    tiny_alias = "tiny-qwen2-vl"
    modeling = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    config_class_name = "Qwen2VLConfig"
    decoder_layer_name = "Qwen2VLDecoderLayer"
    vision_block_name = "Qwen2VLVisionBlock"
    processor_path = "transformers.models.qwen2_vl.processing_qwen2_vl:Qwen2VLProcessor"
    stock_processor = "Qwen2VLProcessor"
    box_convention = "normalized_1000"
    stock_video_processor = "Qwen2VLVideoProcessor"
    patch = 14
    tiny_vision = {
        "depth": 2,
        "embed_dim": 32,
        "mlp_ratio": 2,
        "num_heads": 2,
        "hidden_act": "quick_gelu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


FAMILY = register_family(Qwen2VLFamily())
