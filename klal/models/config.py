"""Which VLM to load and how: :class:`ModelConfig`, with no torch or transformers import.

Kept apart from :mod:`klal.models.loader` so that the commands whose options include a model (``evaluate.py``,
``klal export``, ``klal discover-heads``) can build their ``--help`` without importing torch and transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from klal.models.family import TINY_ALIASES

TINY = "tiny"
"""The name of the default embedded random test model, a tiny Qwen2.5-VL (:mod:`klal.models.qwen2_5_vl.tiny`); every
family has one (:data:`klal.models.family.TINY_ALIASES`)."""


BUNDLED: dict[str, Path] = {
    name: Path(__file__).resolve().parent / "qwen2_5_vl" / name for name in ("tiny-base", "tiny-base-v2")
}
"""Checkpoints shipped inside klal, by name, loaded offline: ``tiny-base`` is the tiny Qwen2.5-VL klal pretrained on
its synthetic curriculum (``studies/pretrain``; model card in its folder and in ``results/pretrain/``);
``tiny-base-v2`` the same model pretrained on larger objects (28-60 px) with a marked-object skill
(``configs/pretrain/tiny_base_v2.yaml``; ``results/pretrain_v2/``): it reads the fill colour of a marked object and
counts, and reads small objects' colour worse than ``tiny-base``."""


@dataclass
class ModelConfig:
    """Which VLM to load and how."""

    name_or_path: str = TINY
    """``tiny`` (embedded random Qwen2.5-VL), another family's tiny model (``tiny-<family>``, one per registered family:
    :data:`klal.models.family.TINY_ALIASES`; an unknown name lists them), ``tiny-base`` / ``tiny-base-v2`` (klal's
    small pretrained Qwen2.5-VLs, shipped with klal), a hub id such as ``Qwen/Qwen2.5-VL-3B-Instruct``, or a local
    folder of any supported family (:mod:`klal.models.family`)."""
    dtype: str = "auto"
    """Parameter dtype: ``auto`` (bfloat16 for real checkpoints, float32 for tiny and the bundled bases), ``float32``,
    ``bfloat16`` or ``float16``."""
    min_pixels: int = DEFAULT_MIN_PIXELS
    """Lower bound on each resized image's area (processor ``smart_resize``; a family without a pixel budget
    ignores it)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Upper bound on each resized image's area. 448*448 (at most 256 visual tokens) suits the tiny model and CPU runs;
    real runs typically use e.g. 1024*28*28 (at most 1024 visual tokens per image)."""
    attn_implementation: str = "sdpa"
    """Attention kernel of the text backbone (``sdpa``, ``eager``, ``flash_attention_2``); the vision tower always uses
    sdpa. ``flash_attention_2`` falls back to sdpa, with a warning, where flash-attn cannot run."""
    tiny_seed: int = 0
    """Weight-initialisation seed of the tiny model."""
    tiny_overrides: dict | None = None
    """Size overrides for the tiny model, passed to the family's ``tiny_config`` (:mod:`klal.models.family`) (e.g.
    ``{"num_hidden_layers": 2, "vision_depth": 1}``)."""

    def __post_init__(self) -> None:
        # A bundled name becomes its folder here, once, so every reader of name_or_path sees a checkpoint folder.
        if self.name_or_path in BUNDLED:
            self.name_or_path = str(BUNDLED[self.name_or_path])

    @property
    def is_bundled(self) -> bool:
        """Whether this is a checkpoint shipped inside klal (:data:`BUNDLED`)."""
        path = os.path.abspath(os.path.expanduser(self.name_or_path))
        return any(path == str(p) for p in BUNDLED.values())

    @property
    def is_tiny(self) -> bool:
        """Whether this names an embedded tiny model (``tiny`` or a family's ``tiny-*`` alias)."""
        return self.name_or_path in TINY_ALIASES
