"""Which base model is this? Identity by content, not by the path it was loaded from.

A LoRA adapter (or a checkpoint, or a heads file) fits one base model. The same model reaches a user under many
names: a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``), the snapshot folder ``snapshot_download`` returns
(``.../models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<hash>``), a copied folder with any name. So klal compares
what the weights mean instead:

- the **architecture**: model type and the language model's and vision tower's sizes (:func:`architecture`);
- a **weight sample**: a few values of two weights that training never changes (the base ``q_proj`` of the first
  decoder layer and the base ``down_proj`` of the last; LoRA adds beside them and ``train_extra`` parts are the
  vision tower, the merger, the embeddings and ``lm_head``), compared with a tolerance, so a float32 load and a
  bfloat16 load of one checkpoint agree while another seed or another fine-tune does not (:func:`weight_sample`).

:func:`base_identity` gives both (plus the name, for messages, and for the embedded ``tiny`` model its seed and
sizes); :func:`identity_mismatch` says what differs. ``tiny`` is a name, not a path: a checkpoint of ``tiny`` never
fits a hub model and the other way round. Records without a weight sample (written before klal stored one) fall back
to the name (:func:`same_name`: equal, the same hub id spelt as a hub-cache snapshot path, or the same last path
component) plus the architecture.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from klal.models.config import TINY
from klal.models.family import TINY_ALIASES, family_of
from klal.models.loader import text_config

__all__ = [
    "TEXT_KEYS",
    "VISION_KEYS",
    "architecture",
    "base_identity",
    "check_same_base",
    "describe",
    "hub_id_of",
    "identity_mismatch",
    "model_name",
    "same_name",
    "weight_sample",
]

TEXT_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
"""Language-model config fields that must agree for LoRA weights to mean the same thing."""
VISION_KEYS = ("depth", "hidden_size", "out_hidden_size", "num_heads")
"""Vision-tower config fields recorded beside them (prefixed ``vision_``)."""
SAMPLE_SIZE = 16
"""Values taken from each sampled weight."""
SAMPLE_RTOL = 1e-2
"""Relative tolerance of the weight-sample comparison: bfloat16 keeps 8 bits of mantissa (0.4% relative error)."""
_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][^/\\]+$")


# -- names -------------------------------------------------------------------------------------------------------------
def hub_id_of(name_or_path: str) -> str:
    """``owner/name`` for a hub-cache snapshot path (``.../models--owner--name/snapshots/<hash>``), else the input."""
    m = _SNAPSHOT.search(os.path.normpath(str(name_or_path)))
    return f"{m['owner']}/{m['name']}" if m else str(name_or_path)


def same_name(a: str, b: str) -> bool:
    """Whether two model references may name the same model by their spelling alone (no content is read).

    True for equal strings, a hub id and its hub-cache snapshot path, or two paths with the same last component (a
    local copy ``.../Qwen2.5-VL-3B-Instruct`` of the hub model). A tiny model matches only its own name.
    """
    a, b = str(a), str(b)
    if a == b:
        return True
    if a in TINY_ALIASES or b in TINY_ALIASES:
        return False
    a, b = hub_id_of(a), hub_id_of(b)

    def tail(s: str) -> str:
        return os.path.basename(os.path.normpath(s))

    return a == b or tail(a) == tail(b)


def model_name(model: torch.nn.Module) -> str:
    """The name a (peft-wrapped) model was loaded under; ``tiny`` for a model built in memory (klal's tiny model)."""
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or "") or TINY


# -- content -----------------------------------------------------------------------------------------------------------
def architecture(model_or_config: Any) -> dict[str, Any]:
    """Model type and sizes: :data:`TEXT_KEYS` of the language model, :data:`VISION_KEYS` of the vision tower."""
    cfg = getattr(model_or_config, "config", model_or_config)
    text = text_config(cfg)
    out: dict[str, Any] = {"model_type": getattr(cfg, "model_type", None)}
    out.update({k: getattr(text, k, None) for k in TEXT_KEYS})
    vision = getattr(cfg, "vision_config", None)
    if vision is not None:
        out.update({f"vision_{k}": getattr(vision, k, None) for k in VISION_KEYS})
    return out


def _base_weight(model: torch.nn.Module, suffix: str) -> torch.Tensor | None:
    """The frozen weight of the first module whose name ends with ``suffix`` (peft's ``base_layer`` if wrapped)."""
    for name, module in model.named_modules():
        if name.endswith(suffix):
            module = getattr(module, "base_layer", module)
            weight = getattr(module, "weight", None)
            return weight if isinstance(weight, torch.Tensor) else None
    return None


def weight_sample(model: torch.nn.Module) -> list[float] | None:
    """:data:`SAMPLE_SIZE` values, spread over each of two weights that LoRA training leaves as they are.

    None where the weights are not materialised here (meta tensors, a DeepSpeed ZeRO-3 partition, an FSDP shard):
    the identity is then the architecture alone.
    """
    n_layers = int(text_config(model).num_hidden_layers)
    lm = family_of(model).language_model(model)  # the family names its decoder (language_model, text_model)
    values: list[float] = []
    for suffix in ("layers.0.self_attn.q_proj", f"layers.{n_layers - 1}.mlp.down_proj"):
        w = _base_weight(lm, suffix)
        if w is None or w.is_meta or w.dim() != 2 or w.numel() == 0 or hasattr(w, "ds_numel"):
            return None
        flat = w.detach().reshape(-1)
        # Evenly spread, offset from the start so a row of constant initialisation is not all that is read.
        step = max(flat.numel() // SAMPLE_SIZE, 1)
        idx = torch.arange(step // 2, flat.numel(), step, device=flat.device)[:SAMPLE_SIZE]
        values += [float(v) for v in flat[idx].float().cpu()]
    return values


def base_identity(model: torch.nn.Module, name: str, tiny: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a base model is, as klal records it beside adapters and checkpoints.

    Args:
        model: the loaded (optionally peft-wrapped) base model.
        name: how it was referred to (kept for messages; not compared unless the other side has no weight sample).
        tiny: for the embedded ``tiny`` model, ``{"tiny_seed": ..., "tiny_overrides": ...}`` (also compared).
    """
    out: dict[str, Any] = {"name_or_path": str(name)}
    out.update(tiny or {})
    out["architecture"] = architecture(model)
    out["weights"] = weight_sample(model)
    return out


def _weights_differ(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return True
    scale = max((abs(x) for x in a + b), default=0.0) or 1.0
    return any(not math.isclose(x, y, rel_tol=SAMPLE_RTOL, abs_tol=SAMPLE_RTOL * scale) for x, y in zip(a, b))


def identity_mismatch(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The fields in which two :func:`base_identity` records disagree (empty: the same base model).

    The architecture is compared on the keys both records hold (older records have fewer). The weight sample is
    compared when both have one, and reported only when nothing else differs; without it the names must agree
    (:func:`same_name`). ``tiny`` against another name always differs.
    """
    a_name, b_name = str(saved.get("name_or_path", "")), str(here.get("name_or_path", ""))
    diff: list[str] = []
    if (a_name in TINY_ALIASES) != (b_name in TINY_ALIASES):
        return ["name_or_path"]
    for key in ("tiny_seed", "tiny_overrides"):
        if key in saved and key in here and saved[key] != here[key]:
            diff.append(key)
    a_arch, b_arch = saved.get("architecture") or {}, here.get("architecture") or {}
    if any(a_arch[k] != b_arch[k] for k in a_arch.keys() & b_arch.keys()):
        diff.append("architecture")
    a_w, b_w = saved.get("weights"), here.get("weights")
    if a_w is not None and b_w is not None:
        if not diff and _weights_differ(list(a_w), list(b_w)):
            diff.append("weights")
    elif not same_name(a_name, b_name):
        diff.append("name_or_path")
    return diff


def describe(identity: dict[str, Any]) -> str:
    """One line: ``name_or_path=..., architecture={...}, weights=[first values ...]``."""
    parts = []
    for key, value in identity.items():
        if key == "weights" and value:
            value = "[" + ", ".join(f"{v:.4g}" for v in value[:3]) + ", ...]"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def check_same_base(
    saved: dict[str, Any], here: dict[str, Any], source: str, error: type[Exception] = ValueError
) -> None:
    """Refuse ``source`` (an adapter, a checkpoint) recorded with another base model than ``here``, naming both.

    Raises:
        error: ``"<source> was trained on another base model (<fields> differ): <source> [...], this model
            [...]"``.
    """
    diff = identity_mismatch(saved, here)
    if diff:
        raise error(
            f"{source} was trained on another base model ({', '.join(diff)} differ): {source} [{describe(saved)}], "
            f"this model [{describe(here)}]"
        )
