"""Whether a checkpoint fits this run: :func:`base_fingerprint` / :func:`lora_fingerprint` describe what a
checkpoint's LoRA weights belong to (the base model by content, :mod:`klal.models.identity`); :func:`check_compatible`
refuses a checkpoint of another base model or LoRA configuration, :func:`check_trainable_keys` one that does not hold
exactly this run's trainable weights, and :func:`check_resume_hparams` a resumed command line that differs from the
checkpoint's settings, each naming both sides."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

import torch

from klal.models.family import TINY_ALIASES
from klal.models.identity import base_identity, check_same_base, same_name
from klal.models.lora import resolve_targets


def base_fingerprint(backbone: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The base model a LoRA checkpoint applies to, by content (:func:`klal.models.identity.base_identity`): its
    name (plus seed and sizes for ``tiny``), architecture and a sample of weights that training leaves unchanged.

    Args:
        backbone: the :class:`~klal.models.loader.ModelConfig` of the run.
        model: the loaded base model (bare or peft-wrapped), its weights not yet sharded.
    """
    tiny = None
    if backbone.is_tiny:
        overrides = {str(k): v for k, v in sorted((backbone.tiny_overrides or {}).items())}
        tiny = {"tiny_seed": int(backbone.tiny_seed), "tiny_overrides": overrides}
    return base_identity(model, str(backbone.name_or_path), tiny)


def lora_fingerprint(lora: Any, num_layers: int) -> dict[str, Any]:
    """The LoRA configuration that decides what the trainable weights are: rank, alpha, wrapped projections and layers
    (resolved, so ``layers=None`` and an explicit list of every layer agree). Dropout is not part of it.

    Args:
        lora: the :class:`~klal.models.lora.LoraSettings` of the run.
        num_layers: the language model's layer count.
    """
    every = lora.layers is None
    layers = list(range(num_layers)) if every else sorted({int(i) % num_layers for i in lora.layers})
    return {
        "r": int(lora.r),
        "alpha": lora.alpha,
        "targets": list(resolve_targets(lora.targets)),
        "layers": layers,
    }


def _describe(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fp.items())


def check_compatible(
    checkpoint: dict[str, Any], base: dict[str, Any], lora: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Refuse a checkpoint whose weights belong to another base model or another LoRA configuration.

    The base model is compared by content (:func:`klal.models.identity.identity_mismatch`), so any path to the same
    model is accepted. Checkpoints without fingerprints (written before klal stored them) are checked by base-model
    name only.

    Args:
        checkpoint: the loaded checkpoint dict (``klal_base_model``, ``klal_fingerprint``).
        base: :func:`base_fingerprint` of this run.
        lora: :func:`lora_fingerprint` of this run.
        source: how to name the checkpoint in messages (its path).

    Raises:
        ValueError: naming what the checkpoint was trained with and what this run uses.
    """
    saved_name = checkpoint.get("klal_base_model")
    fp = checkpoint.get("klal_fingerprint") or {}
    saved_base = fp.get("base")
    here_name = str(base["name_or_path"])
    named_other = saved_name is not None and (
        saved_base is None or (str(saved_name) in TINY_ALIASES) != (here_name in TINY_ALIASES)
    )
    if named_other and not same_name(str(saved_name), here_name):
        raise ValueError(f"{source} was trained on base model {saved_name!r}, but this run uses {here_name!r}")
    if saved_base is not None:
        check_same_base(saved_base, base, source)
    saved_lora = fp.get("lora")
    if saved_lora is not None:
        diff = [k for k in lora if saved_lora.get(k) != lora[k]]
        if diff:
            detail = ", ".join(f"{k} {saved_lora.get(k)} vs {lora[k]}" for k in diff)
            raise ValueError(
                f"{source} was trained with another LoRA config ({detail}; checkpoint vs this run): checkpoint "
                f"[{_describe(saved_lora)}], this run [{_describe(lora)}]"
            )


def check_trainable_keys(
    state_dict: dict[str, Any], expected: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Refuse a checkpoint state dict that does not hold exactly this run's trainable weights, with their shapes.

    Lightning loads klal checkpoints non-strictly (they lack the frozen base), so without this a mismatch would load
    nothing and continue silently.

    Raises:
        ValueError: missing, unexpected or differently shaped weights (a few names are listed).
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} trainable weights missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights this run does not train (e.g. {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} weights with other shapes (e.g. {k}: {tuple(state_dict[k].shape)} vs "
            f"{tuple(expected[k].shape)})"
        )
    if problems:
        raise ValueError(f"{source} does not match this run's LoRA weights: " + "; ".join(problems))


RUN_HPARAMS = ("lora", "klal_weight", "klal_query", "klal_layers", "klal_epsilon", "klal_image_mode", "optim")
"""Module hyperparameters that change what a resumed run computes (refused when changed, unless allowed)."""
MODEL_OPTIONS = ("backbone",)
"""Module hyperparameters that choose the model (refused when they differ from the checkpoint's)."""
DATA_KEEP_FREE = ("num_workers", "pin_memory", "eval_batch_size", "max_val_samples", "val_split", "test_split")
"""Data options a resumed run may change: they do not change the training batches."""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=lambda o: _plain(o) if dataclasses.is_dataclass(o) else str(o)))


def changed_hparams(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> dict[str, tuple]:
    """``{key: (saved, current)}`` for each of ``keys`` whose value differs (dataclasses compared as dicts)."""
    out = {}
    for key in keys:
        a, b = _plain(saved.get(key)), _plain(current.get(key))
        if a != b:
            out[key] = (a, b)
    return out


def check_resume_hparams(checkpoint: dict[str, Any], module: Any, datamodule: Any, source: str, allow: bool) -> None:
    """Refuse resuming ``source`` with settings other than the checkpoint's, naming each difference.

    Model options (:data:`MODEL_OPTIONS`) must always agree: Lightning's CLI used to replace them silently with the
    checkpoint's. Run hyperparameters (:data:`RUN_HPARAMS`) and the data options (all but :data:`DATA_KEEP_FREE`)
    may change only with ``allow`` (``--allow_changed_hparams``), e.g. a deliberate second stage at another learning
    rate. Checkpoints without saved hyperparameters are not checked.

    Raises:
        ValueError: ``"resuming <source>: <key> <saved> in the checkpoint vs <current> now; ..."``.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    current = dict(getattr(module, "hparams", {}) or {})
    # The attention kernel is a machine's choice (flash-attn falls back to sdpa); it does not change the model.
    saved_model = {k: {**_plain(v), "attn_implementation": None} for k, v in saved.items() if k in MODEL_OPTIONS}
    model_now = {k: {**_plain(v), "attn_implementation": None} for k, v in current.items() if k in MODEL_OPTIONS}
    problems = changed_hparams(saved_model, model_now, list(saved_model))
    if not allow:
        problems.update(changed_hparams(saved, current, [k for k in RUN_HPARAMS if k in saved]))
        saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
        data_now = dict(getattr(datamodule, "hparams", {}) or {}) if datamodule is not None else {}
        if saved_data and data_now:
            keys = [k for k in saved_data.keys() | data_now.keys() if k not in DATA_KEEP_FREE]
            problems.update({f"data.{k}": v for k, v in changed_hparams(saved_data, data_now, sorted(keys)).items()})
    if problems:
        detail = "; ".join(f"{k} {a} in the checkpoint vs {b} now" for k, (a, b) in problems.items())
        only_model = set(problems) <= set(MODEL_OPTIONS)
        hint = "" if only_model else " (--allow_changed_hparams true to resume anyway)"
        raise ValueError(f"resuming {source} with other settings than it was trained with: {detail}{hint}")
