"""The peft adapter folder a run exports: :func:`save_adapter` writes it all-or-nothing with :data:`ADAPTER_INFO`
(the backbone and LoRA settings and the base model's fingerprint), :func:`read_adapter_info` reads that back, and
:func:`check_adapter_base` refuses loading an adapter onto another base model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from klal.atomic import atomic_save_dir
from klal.models.family import TINY_ALIASES
from klal.models.identity import base_identity, check_same_base, same_name

ADAPTER_INFO = "klal_adapter.json"
"""File written next to the peft adapter: the backbone and LoRA settings it was trained with."""


def _as_dict(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def save_adapter(
    model: Any,
    path: str,
    backbone: Any,
    lora: Any,
    fingerprint: dict[str, Any] | None = None,
    processor: Any = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the peft adapter of ``model`` to ``path`` atomically, with :data:`ADAPTER_INFO` (the backbone and LoRA
    settings, so ``python -m klal.export`` rebuilds the right base) and optionally the processor.

    ``state_dict``: the model's full weights gathered from a sharded strategy (FSDP); default: the model's own."""
    info = {"backbone": _as_dict(backbone), "lora": _as_dict(lora), "fingerprint": fingerprint}

    def write(tmp: str) -> None:
        embeddings = embedding_layers_trained(model)
        if state_dict is not None:
            model.save_pretrained(tmp, state_dict=state_dict, save_embedding_layers=embeddings)
        else:
            model.save_pretrained(tmp, save_embedding_layers=embeddings)
        if processor is not None:
            processor.save_pretrained(tmp)
        with open(os.path.join(tmp, ADAPTER_INFO), "w") as f:
            json.dump(info, f, indent=2, default=list)

    atomic_save_dir(write, path)


def embedding_layers_trained(model: Any) -> bool:
    """Whether ``model`` trains an embedding matrix (``embed_tokens`` / ``lm_head``, LoRA's ``train_extra``) in full:
    peft's ``save_pretrained(save_embedding_layers=...)``.

    Passed explicitly on every save: peft's default (``"auto"``) looks the base model's ``config.json`` up on the Hub to
    see whether the vocabulary was resized (klal never resizes it), a network request on every adapter save that, for
    the tiny model or a local folder, fails with two warnings.
    """
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    return any(
        p.requires_grad and "lora_" not in name and any(f".{e}." in f".{name}" for e in EMBEDDING_LAYER_NAMES)
        for name, p in model.named_parameters()
    )


def read_adapter_info(path: str) -> dict[str, Any] | None:
    """:data:`ADAPTER_INFO` of an adapter folder, or None when it has none (an adapter from elsewhere)."""
    file = os.path.join(path, ADAPTER_INFO)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def _peft_base_name(adapter: str) -> str | None:
    file = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"adapter {adapter!r} has no adapter_config.json (is it a peft adapter folder?)")
    with open(file) as f:
        return json.load(f).get("base_model_name_or_path")


def check_adapter_base(model: Any, adapter: str, name: str, error: type[Exception] = ValueError) -> None:
    """Refuse loading ``adapter`` onto ``model`` (loaded as ``name``) when it was trained on another base model.

    The check is by content where the adapter records it (:data:`ADAPTER_INFO`, written by klal's training and
    export): architecture plus a sample of frozen weights, so the hub id, its snapshot path and a copied folder are
    all accepted. An adapter from elsewhere is checked by peft's recorded base name
    (:func:`klal.models.identity.same_name`).

    Raises:
        FileNotFoundError: not a peft adapter folder.
        error: another base model, naming both sides.
    """
    recorded = _peft_base_name(adapter)
    saved = ((read_adapter_info(adapter) or {}).get("fingerprint") or {}).get("base")
    name = str(name)
    by_name = saved is None or (str(recorded) in TINY_ALIASES) != (name in TINY_ALIASES)
    if recorded and name and by_name and not same_name(str(recorded), name):
        raise error(f"adapter {adapter!r} was trained on base model {recorded!r}, but the model given is {name!r}")
    if saved is not None:
        check_same_base(saved, base_identity(model, name), f"adapter {adapter}", error=error)
