"""Which attention kernel runs the text backbone: ``flash_attention_2`` where flash-attn can run, else sdpa.

Configs can then ask for flash-attention-2 everywhere (``model.backbone.attn_implementation``): machines with
``flash_attn`` installed and a CUDA device use it, others (CPU, or no ``pip install flash-attn``) run the same config
on sdpa, which gives the same results up to kernel rounding.
"""

from __future__ import annotations

import logging

__all__ = ["FLASH", "flash_attention_available", "resolve_attn_implementation"]

log = logging.getLogger(__name__)

FLASH = "flash_attention_2"


def flash_attention_available() -> bool:
    """Whether transformers can run ``flash_attention_2`` here (the ``flash_attn`` package and a CUDA device)."""
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def resolve_attn_implementation(name: str) -> str:
    """``name``, except that ``flash_attention_2`` becomes ``sdpa`` (with a warning) where flash-attn cannot run.

    Configs can then ask for flash-attention-2 everywhere: machines with ``flash_attn`` installed use it, others
    (CPU, or no ``pip install flash-attn``) run the same config on sdpa, which gives the same results up to kernel
    rounding.
    """
    if name == FLASH and not flash_attention_available():
        log.warning(
            "attn_implementation=flash_attention_2, but flash-attn cannot run here (not installed or no CUDA): "
            "using sdpa"
        )
        return "sdpa"
    return name
