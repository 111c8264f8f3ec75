"""Which attention kernel runs the text backbone: the one a config names where it can run here, else sdpa with one
warning line.

Configs can then name a fast kernel everywhere (``model.backbone.attn_implementation``): a GPU machine with the kernel
installed uses it, other machines (CPU, or no ``pip install flash-attn``) run the same config on sdpa, which gives the
same results up to kernel rounding. Every name transformers accepts is handled:

- ``eager``, ``sdpa``: always.
- ``flash_attention_2`` / ``_3`` / ``_4``: where transformers finds that flash-attn version and a CUDA device.
- ``flex_attention``: where torch has it and the model's architecture supports it in transformers (of klal's
  families, LLaVA-OneVision; the Qwen families do not).
- hub kernels, ``org/repo[@rev][:function]`` (e.g. ``kernels-community/flash-attn``): with the ``kernels`` package and
  a CUDA device, loaded and registered through transformers; they are CUDA builds.

Attention capture (:mod:`klal.capture`) wraps whichever kernel results: the layer output is the kernel's, the
supervised rows are computed as eager attention would.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["FLASH", "flash_attention_available", "resolve_attn_implementation"]

log = logging.getLogger(__name__)

FLASH = "flash_attention_2"
FALLBACK = "sdpa"


def flash_attention_available(version: int = 2) -> bool:
    """Whether transformers can run ``flash_attention_<version>`` here (the flash-attn package and a CUDA device)."""
    from transformers.utils import import_utils

    check = getattr(import_utils, f"is_flash_attn_{version}_available", None)
    return bool(check()) if check is not None else False


def _hub_kernel_problem(name: str) -> str | None:
    """Why the hub kernel ``name`` cannot run here (None: it was loaded and registered with transformers)."""
    import torch
    from transformers.utils import is_kernels_available

    if not is_kernels_available():
        return "the kernels package is not installed (pip install kernels)"
    if not torch.cuda.is_available():
        return "hub attention kernels are CUDA builds and there is no CUDA device"
    from transformers.integrations.hub_kernels import load_and_register_attn_kernel

    try:
        load_and_register_attn_kernel(name)
    except Exception as e:  # offline, unknown repo, no build for this machine: all mean "use sdpa here"
        return f"loading it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def resolve_attn_implementation(name: str, model_class: Any = None) -> str:
    """``name``, or ``sdpa`` (with one warning line saying why) where that kernel cannot run here.

    Args:
        name: what the config asks for.
        model_class: the transformers class that will be loaded (its ``_supports_flex_attn`` decides
            ``flex_attention``); None skips that check.
    """
    from transformers.integrations.hub_kernels import is_kernel

    why = None
    flash = re.fullmatch(r"flash_attention_(\d)", name)
    if flash and not flash_attention_available(int(flash.group(1))):
        why = f"flash-attn {flash.group(1)} cannot run here (not installed or no CUDA)"
    elif name == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        if not is_torch_flex_attn_available():
            why = "this torch has no flex_attention"
        elif model_class is not None and not getattr(model_class, "_supports_flex_attn", False):
            why = f"transformers does not support flex_attention for {model_class.__name__}"
    elif is_kernel(name):
        why = _hub_kernel_problem(name)
    if why is None:
        return name
    log.warning("attn_implementation=%s, but %s: using %s", name, why, FALLBACK)
    return FALLBACK
