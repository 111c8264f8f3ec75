"""Qwen3.5: a hybrid language model (gated delta-net linear-attention layers beside full-attention ones) on the
Qwen3-VL vision tower; :data:`FAMILY` describes it.

Only the full-attention layers have a softmax attention over the visual tokens, so KLAL, the capture and every
attention method act on those alone (:meth:`Qwen3_5Family.attention_layers`, from ``text_config.layer_types``); layer
specs such as ``all`` or ``-8:`` count full-attention layers. LoRA's ``attention`` targets exist only in those layers;
its ``layers`` option still counts every decoder layer. The processor is ``Qwen3VLProcessor`` (16-px patches, merge 2).
Without the optional ``flash-linear-attention`` and ``causal-conv1d`` kernels transformers runs its (slower) PyTorch
reference for the linear layers.
"""

from typing import Any

from klal.models.family import register_family
from klal.models.qwen2_vl.family import QwenVLFamily
from klal.models.qwen3_vl import Qwen3VLFamily


class Qwen3_5Family(QwenVLFamily):
    """Qwen3.5 (``Qwen/Qwen3.5-*``): hybrid layers, partial rotary embedding, Qwen3-VL vision tower."""

    name = "qwen3_5"
    model_type = "qwen3_5"
    label = "Qwen3.5"
    tiny_alias = "tiny-qwen3.5"
    modeling = "transformers.models.qwen3_5.modeling_qwen3_5"
    model_class_name = "Qwen3_5ForConditionalGeneration"
    config_class_name = "Qwen3_5Config"
    decoder_layer_name = "Qwen3_5DecoderLayer"
    vision_block_name = "Qwen3_5VisionBlock"
    processor_path = "transformers.models.qwen3_vl.processing_qwen3_vl:Qwen3VLProcessor"
    stock_processor = "Qwen3VLProcessor"
    box_convention = "normalized_1000"
    stock_video_processor = "Qwen3VLVideoProcessor"
    patch = 16
    tiny_text = {
        "head_dim": 16,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "partial_rotary_factor": 0.5,
            "mrope_interleaved": True,
        },
    }
    # The Qwen3-VL tower's tiny sizes; Qwen3.5's vision config has no deepstack.
    tiny_vision = {k: v for k, v in Qwen3VLFamily.tiny_vision.items() if k != "deepstack_visual_indexes"}

    def attention_layers(self, text_config: Any) -> list[int]:
        """The ``full_attention`` entries of ``text_config.layer_types`` (the linear-attention layers have no
        softmax attention to capture or supervise)."""
        return [i for i, kind in enumerate(text_config.layer_types) if kind == "full_attention"]


FAMILY = register_family(Qwen3_5Family())
