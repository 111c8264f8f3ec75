"""LoRA on the language model of a VLM only (under the family's decoder-layer path, e.g. ``language_model.layers``).

The vision tower reuses the module names ``gate_proj``/``up_proj``/``down_proj`` for its MLP, so targeting LoRA by bare
names would also wrap the vision blocks (peft issue 2615). klal instead passes peft one regular expression, anchored on
the family's decoder layers (``language_model.layers.<i>``; SmolVLM's ``text_model.layers.<i>``), that names exactly
the chosen projections of the chosen decoder layers. Everything else
(vision tower, merger, embeddings, norms, ``lm_head``) stays frozen.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from klal.models.family import family_of
from klal.models.loader import text_config

__all__ = [
    "ATTENTION_TARGETS",
    "BASE_PARTS",
    "MLP_TARGETS",
    "LoraSettings",
    "apply_lora",
    "language_lora_regex",
    "lora_module_names",
    "resolve_targets",
    "train_base_parts",
    "trainable_parameter_summary",
]

ATTENTION_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_TARGETS,
    "attention_mlp": ATTENTION_TARGETS + MLP_TARGETS,
    # The decoder layers hold no other linear layers, so "all_linear" is attention_mlp; lm_head is never wrapped.
    "all_linear": ATTENTION_TARGETS + MLP_TARGETS,
}
_BY_SHORT_NAME = {t.split(".")[1]: t for t in ATTENTION_TARGETS + MLP_TARGETS}

LoraTargets = Literal["attention", "attention_mlp", "all_linear"] | list[str]
"""Which decoder-layer projections get LoRA: a preset name or a list of projection names (see :class:`LoraSettings`)."""


@dataclass
class LoraSettings:
    """LoRA on the language model's decoder layers."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    targets: Literal["attention", "attention_mlp", "all_linear"] | list[str] = "attention"
    """``attention`` (q/k/v/o projections), ``attention_mlp`` (plus gate/up/down), ``all_linear`` (every linear layer of
    the decoder layers, the same set), or a list of projection names such as ``["q_proj", "v_proj"]``."""
    layers: list[int] | None = None
    """Language-model layer indices to adapt (negative counts from the end); None adapts every layer."""


def resolve_targets(targets: LoraTargets) -> tuple[str, ...]:
    """The decoder-layer module paths (e.g. ``self_attn.q_proj``) that ``targets`` names, in a fixed order.

    Raises:
        ValueError: an unknown preset or projection name, or an empty list.
    """
    if isinstance(targets, str):
        if targets not in _PRESETS:
            raise ValueError(f"lora targets {targets!r} unknown; choose {', '.join(_PRESETS)} or a list of names")
        return _PRESETS[targets]
    names = list(targets)
    if not names:
        raise ValueError("lora targets: the list of projection names is empty")
    chosen = set()
    for name in names:
        full = _BY_SHORT_NAME.get(name, name)
        if full not in _BY_SHORT_NAME.values():
            raise ValueError(
                f"lora target {name!r} is not a decoder-layer projection; choose from "
                f"{sorted(_BY_SHORT_NAME)} (optionally prefixed self_attn./mlp.)"
            )
        chosen.add(full)
    return tuple(t for t in ATTENTION_TARGETS + MLP_TARGETS if t in chosen)


def _resolve_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layers is None:
        return list(range(num_layers))
    if len(layers) == 0:
        raise ValueError("lora layers: the list is empty (use None for all layers)")
    out = set()
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"lora layers must be integers, got {i!r}")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"lora layer {i} is out of range for a language model with {num_layers} layers")
        out.add(i % num_layers)
    return sorted(out)


def language_lora_regex(
    targets: LoraTargets, layers: list[int] | None, num_layers: int, layers_pattern: str = r"language_model\.layers"
) -> str:
    """A regular expression (for peft's full-match ``target_modules``) naming the chosen projections of the chosen
    decoder layers of the language model, and nothing in the vision tower.

    Args:
        targets: preset or list of projection names (see :class:`LoraSettings`).
        layers: layer indices; None for all.
        num_layers: the language model's ``num_hidden_layers``.
        layers_pattern: regex of the decoder layers' module path
            (:attr:`klal.models.family.VLMFamily.lora_layers_pattern`).
    """
    idx = _resolve_layers(layers, num_layers)
    paths = resolve_targets(targets)
    layer_alt = "|".join(str(i) for i in idx)
    target_alt = "|".join(re.escape(p) for p in paths)
    # "(?:.*\.)?" lets the prefix vary (model. / base_model.model.model.) while language_model must be a whole
    # component, so model.visual.blocks.*.mlp.* can never match.
    return rf"(?:.*\.)?{layers_pattern}\.(?:{layer_alt})\.(?:{target_alt})"


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with LoRA on the language model only; all base weights are frozen.

    Raises:
        ValueError: bad rank/alpha/dropout/targets/layers.
        RuntimeError: the regex matched a different set of modules than expected (e.g. renamed modules).
    """
    if settings.r < 1:
        raise ValueError(f"lora r must be >= 1, got {settings.r}")
    if settings.alpha <= 0:
        raise ValueError(f"lora alpha must be > 0, got {settings.alpha}")
    if not 0.0 <= settings.dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {settings.dropout}")
    num_layers = text_config(model).num_hidden_layers
    pattern = family_of(model).lora_layers_pattern
    regex = language_lora_regex(settings.targets, settings.layers, num_layers, pattern)
    # A hybrid model (Qwen3.5) has the attention projections only in its full-attention layers: expect the chosen
    # projections that the chosen layers actually have.
    present = {r for r in (_layer_relative(n, pattern) for n, _ in model.named_modules()) if r is not None}
    expected = {
        f"layers.{i}.{p}"
        for i in _resolve_layers(settings.layers, num_layers)
        for p in resolve_targets(settings.targets)
        if f"layers.{i}.{p}" in present
    }
    if not expected:
        raise ValueError(
            f"lora targets {settings.targets!r} name no module of the chosen layers {settings.layers!r} of this model"
        )
    peft_cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=regex,
        bias="none",
    )
    wrapped = get_peft_model(model, peft_cfg)
    found = {_layer_relative(n, pattern) or n for n in lora_module_names(wrapped)}
    if found != expected:
        raise RuntimeError(
            f"LoRA regex {regex!r} wrapped {sorted(found)} but {sorted(expected)} were expected; "
            "has the model's module layout changed?"
        )
    return wrapped


def _layer_relative(name: str, layers_pattern: str) -> str | None:
    """``...language_model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj`` (None for a module outside
    the decoder layers that ``layers_pattern`` names)."""
    m = re.search(rf"(?:^|\.){layers_pattern}\.(.+)$", name)
    return f"layers.{m.group(1)}" if m else None


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def trainable_parameter_summary(model: torch.nn.Module) -> str:
    """One line: trainable / total parameters, their share, and how many modules carry LoRA."""
    total = trainable = tensors = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            tensors += 1
    share = 100.0 * trainable / total if total else 0.0
    n_lora = len(lora_module_names(model))
    return (
        f"trainable parameters: {trainable:,} / {total:,} ({share:.3f}%) in {tensors} tensors; "
        f"{n_lora} modules with LoRA"
    )


BASE_PARTS: dict[str, str] = {
    "merger": ".visual.merger.",
    "vision": ".visual.",
    "embed_tokens": ".embed_tokens.",
    "lm_head": ".lm_head.",
}
"""Base-model parts that can train in full next to LoRA, and the name component that finds each (whatever prefix
peft adds): ``merger`` (the vision patch merger), ``vision`` (the whole vision tower, merger included),
``embed_tokens``, ``lm_head``."""


def train_base_parts(model: torch.nn.Module, parts: list[str]) -> int:
    """Make whole base-model parts (:data:`BASE_PARTS`) trainable next to LoRA; returns the parameters switched on.

    With tied embeddings (``tie_word_embeddings``, e.g. Qwen2.5-VL-3B) ``lm_head`` and ``embed_tokens`` are one
    matrix: asking for either trains that shared matrix, which changes both the output head and the input
    embeddings, and a warning says so (there is no separate head to train).

    Raises:
        ValueError: an unknown part, or a part that matches no parameter of ``model``.
    """
    unknown = [p for p in parts if p not in BASE_PARTS]
    if unknown:
        raise ValueError(f"train_extra {unknown} unknown; choose from {list(BASE_PARTS)}")
    n = 0
    matched: dict[str, int] = {part: 0 for part in parts}
    seen: set[int] = set()
    # remove_duplicate=False: a tied lm_head.weight is listed under its own name too, not only as embed_tokens.
    for name, p in model.named_parameters(remove_duplicate=False):
        full = "." + name
        hits = [part for part in parts if BASE_PARTS[part] in full]
        for part in hits:
            matched[part] += 1
        if hits and id(p) not in seen:
            seen.add(id(p))
            if not p.requires_grad:
                p.requires_grad_(True)
                n += p.numel()
    empty = [part for part, count in matched.items() if count == 0]
    if empty:
        raise ValueError(f"train_extra {empty} matched no parameters of the model")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied and {"lm_head", "embed_tokens"} & set(parts):
        warnings.warn(
            "train_extra: this model ties lm_head to embed_tokens (tie_word_embeddings), so the shared matrix trains: "
            "the output head and the input embeddings change together",
            stacklevel=2,
        )
    return n
