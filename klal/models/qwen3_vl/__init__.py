"""Qwen3-VL: :data:`FAMILY` describes it.

Facts read from the installed transformers classes: the vision tower cuts 16-px patches (``Qwen3VLVisionConfig``
default ``patch_size=16``) and merges 2 x 2, so one visual token covers 32 x 32 px of the resized image; the image
processor is the line's ``Qwen2VLImageProcessor`` with ``patch_size=16``. *Deepstack*: features of a few vision
layers (``deepstack_visual_indexes``) are added to the hidden states at the image positions of the first language
layers; the visual tokens, their order and the attention klal captures are unchanged by it.
"""

from klal.models.family import register_family
from klal.models.qwen2_vl.family import QwenVLFamily


class Qwen3VLFamily(QwenVLFamily):
    """Qwen3-VL (``Qwen/Qwen3-VL-*``): 16-px patches, learned position embeddings, deepstack features."""

    name = "qwen3_vl"
    model_type = "qwen3_vl"
    label = "Qwen3-VL"
    tiny_alias = "tiny-qwen3-vl"
    modeling = "transformers.models.qwen3_vl.modeling_qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    config_class_name = "Qwen3VLConfig"
    decoder_layer_name = "Qwen3VLTextDecoderLayer"
    vision_block_name = "Qwen3VLVisionBlock"
    processor_path = "transformers.models.qwen3_vl.processing_qwen3_vl:Qwen3VLProcessor"
    stock_processor = "Qwen3VLProcessor"
    box_convention = "normalized_1000"
    stock_video_processor = "Qwen3VLVideoProcessor"
    patch = 16
    tiny_text = {
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_interleaved": True},
    }
    tiny_vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
    }


FAMILY = register_family(Qwen3VLFamily())
