"""Training-free grounding methods, run as baselines, probes and evaluation hooks on base and fine-tuned models.

Every method maps one dataset row to a relevance map per image over the model's token grid, ranked boxes in original
pixels and, for methods that answer, an answer. Importing this package registers the built-in methods:

=====================  ==================================================================================
``attention_probe``    a query token's head-mean attention over visual tokens (the quantity KLAL trains)
``localization_heads`` Kang et al. (CVPR 2025): a few heads found by S_img + spatial entropy localise
``entropy_gradient``   gradient of the next-token entropy w.r.t. visual token embeddings, zoom and re-ground
``vicrop_rel_att``     ViCrop: query attention divided by generic-prompt attention, crop, answer
``vicrop_grad_att``    ViCrop: attention x ReLU(gradient of the top token's log-prob), crop, answer
``laser``              VAQ layer selection, Con-ViCrop crop, counterfactual decoding gated by VAT
=====================  ==================================================================================

Example::

    from klal.grounding import GroundingModel, build_method
    from klal.models.loader import ModelConfig
    gm = GroundingModel.load(ModelConfig("tiny"))
    result = build_method("entropy_gradient", max_rounds=1).run(gm, row)   # row: a klal dataset row

A method is a :class:`GroundingMethod` subclass (:mod:`klal.grounding.base`): it declares its options as a frozen
``Options`` dataclass (defaults and bounds in one place, checked by :mod:`klal.grounding.options`) and writes only
``ground`` (and, to share passes between rows, ``ground_batch``); timing, pass counting, the image check and the
crop-size check are the base's. A new method registers itself with ``class MyMethod(GroundingMethod, name="...")``.
"""

# Importing the method modules registers them.
from klal.grounding import egg, laser, loc_heads, probe, vicrop  # noqa: F401
from klal.grounding.base import GENERIC_PROMPT, GroundingMethod, GroundingResult
from klal.grounding.registry import available_methods, build_method, method_class, register_method
from klal.session import GroundingError, GroundingModel, load_adapter

__all__ = [
    "GENERIC_PROMPT",
    "GroundingError",
    "GroundingMethod",
    "GroundingModel",
    "GroundingResult",
    "available_methods",
    "build_method",
    "load_adapter",
    "method_class",
    "register_method",
]
