"""Export a trained LoRA adapter: a self-contained peft adapter folder, or a merged model in the stock layout.

Examples::

    # adapter folder (+ processor) that PeftModel.from_pretrained(base, OUT) loads
    python -m klal.export --adapter runs/demo/klal/version_0/adapter --out exports/demo-adapter
    # LoRA merged into the base weights, loadable without klal:
    #   AutoProcessor.from_pretrained(OUT); AutoModelForImageTextToText.from_pretrained(OUT)
    python -m klal.export --adapter runs/demo/klal/version_0/adapter --merge --out exports/demo-merged

The base model is the one the adapter was trained on, read from the adapter's ``klal_adapter.json`` (written by
training; it also holds the ``tiny`` model's seed and sizes and the processor's pixel bounds), else from peft's
``base_model_name_or_path``; ``--model`` overrides the location (any path to the same model: the hub id, its
snapshot folder, a copy). An adapter of another base model is refused, by content (architecture and frozen
weights, :mod:`klal.models.identity`).

The processor is written in the stock layout of the model's family
(:meth:`klal.models.family.VLMFamily.save_stock_processor`): the class names of transformers' stock processor,
``processor_config.json`` with the image and video processors (and, on the Qwen families, the flat
``preprocessor_config.json`` and ``video_preprocessor_config.json`` that older transformers and vLLM read), the chat
template, and the pixel bounds the adapter was trained with.

Nothing that export did not write is ever deleted: ``--out`` must be new, empty, or a previous export (it carries
:data:`EXPORT_INFO`), and a previous export is replaced only with ``--overwrite``. ``--out`` may not be the adapter
folder, inside it, or a folder that contains it. The output is written atomically (a temporary folder renamed into
place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from klal.models.config import ModelConfig

# klal.checkpoint and klal.models.loader (torch, transformers) are imported where they are used, so that
# ``klal export --help`` answers without loading them.

__all__ = ["EXPORT_INFO", "check_out_dir", "export", "main", "resolve_base"]

EXPORT_INFO = "klal_export.json"
"""File every export writes: what it holds (``adapter`` or ``merged``), its source adapter and the backbone settings
(pixel bounds included). It marks the folder as klal's own, so a later ``--overwrite`` may replace it."""


def _check_adapter_dir(adapter: str) -> None:
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"--adapter {adapter!r} is not a folder")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter {adapter!r} has no adapter_config.json (is it a peft adapter folder?)")


def resolve_base(adapter: str, model: str | None = None, dtype: str = "auto") -> ModelConfig:
    """The :class:`~klal.models.loader.ModelConfig` of the base model ``adapter`` belongs to.

    Args:
        adapter: peft adapter folder.
        model: base model location overriding the recorded one (``tiny``, a hub id or a folder).
        dtype: parameter dtype (``auto``: float32 for tiny, bfloat16 otherwise).

    Raises:
        FileNotFoundError: not an adapter folder.
        ValueError: no base model is recorded and ``model`` is not given, or a bad dtype.
    """
    _check_adapter_dir(adapter)
    from klal.checkpoint.adapter import read_adapter_info
    from klal.models.loader import DTYPES

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    info = read_adapter_info(adapter)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if info is not None:
        kwargs = {k: v for k, v in info["backbone"].items() if k in fields}
    else:
        with open(os.path.join(adapter, "adapter_config.json")) as f:
            recorded = json.load(f).get("base_model_name_or_path")
        if not recorded and model is None:
            raise ValueError(f"adapter {adapter!r} does not record its base model; pass --model")
        kwargs = {"name_or_path": recorded}
    if model is not None:
        kwargs["name_or_path"] = model
    kwargs["dtype"] = dtype
    return ModelConfig(**kwargs)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (both absolute and resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_dir(out: str, adapter: str, overwrite: bool) -> None:
    """Refuse an output folder whose writing would destroy something export did not write.

    Raises:
        ValueError: ``out`` is the adapter, inside it or above it; a file; a non-empty folder that is not a previous
            export; or a previous export without ``overwrite``.
    """
    out_abs, adapter_abs = os.path.realpath(out), os.path.realpath(adapter)
    if _inside(adapter_abs, out_abs):
        what = "the adapter folder itself" if out_abs == adapter_abs else f"a folder containing the adapter {adapter}"
        raise ValueError(f"--out {out!r} is {what}; choose a new folder (export never replaces its source)")
    if _inside(out_abs, adapter_abs):
        raise ValueError(f"--out {out!r} is inside the adapter folder {adapter!r}; choose a folder outside it")
    if not os.path.exists(out_abs):
        return
    if not os.path.isdir(out_abs):
        raise ValueError(f"--out {out!r} is a file; choose a folder")
    if not os.listdir(out_abs):
        return
    if not os.path.isfile(os.path.join(out_abs, EXPORT_INFO)):
        raise ValueError(
            f"--out {out!r} is a non-empty folder that klal did not export (no {EXPORT_INFO}); choose a new or empty "
            "folder (nothing was deleted)"
        )
    if not overwrite:
        raise ValueError(f"--out {out!r} holds a previous export; pass --overwrite to replace it")


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def export(
    *,
    adapter: str,
    out: str,
    model: str | None = None,
    merge: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
) -> str:
    """Export a klal LoRA adapter as a peft adapter folder or, with --merge, a merged transformers model.

    Args:
        adapter: peft adapter folder written by training (``<log_dir>/adapter``).
        out: output folder: new, empty, or a previous export (replaced only with ``--overwrite``).
        model: base model location overriding the one the adapter records (``tiny``, a hub id or a folder holding
            the same model).
        merge: merge the LoRA weights into the base and save a plain transformers model with the processor.
        dtype: parameter dtype of the loaded base and of a merged model: ``auto`` (float32 for tiny, bfloat16
            otherwise), ``float32``, ``bfloat16``, ``float16``.
        overwrite: replace ``out`` when it holds a previous export (never anything else).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: not an adapter folder.
        ValueError: the adapter was trained on another base model, or ``out`` may not be written.
    """
    from peft import PeftModel

    from klal.atomic import atomic_save_dir
    from klal.checkpoint.adapter import ADAPTER_INFO, check_adapter_base, embedding_layers_trained, read_adapter_info
    from klal.models.family import family_of
    from klal.models.loader import load_model_and_processor

    cfg = resolve_base(adapter, model, dtype)
    check_out_dir(out, adapter, overwrite)
    base, processor = load_model_and_processor(cfg)
    check_adapter_base(base, adapter, cfg.name_or_path)
    info = read_adapter_info(adapter)
    peft_model = PeftModel.from_pretrained(base, adapter)
    peft_model.eval()
    record = {
        "kind": "merged" if merge else "adapter",
        "adapter": os.path.abspath(adapter),
        "backbone": dataclasses.asdict(cfg),
        "fingerprint": (info or {}).get("fingerprint"),
    }

    def write(tmp: str) -> None:
        if merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(tmp)
        else:
            peft_model.peft_config["default"].base_model_name_or_path = cfg.name_or_path
            peft_model.save_pretrained(tmp, save_embedding_layers=embedding_layers_trained(peft_model))
            if info is not None:
                shutil.copy(os.path.join(adapter, ADAPTER_INFO), os.path.join(tmp, ADAPTER_INFO))
        family_of(base).save_stock_processor(processor, tmp)
        _write_json(os.path.join(tmp, EXPORT_INFO), record)

    atomic_save_dir(write, out)
    return out


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> str:
    """Command line entry point (``python -m klal.export`` / ``klal export``); returns the output folder."""
    from klal.cli import run

    out = run(export, argv, prog or "python -m klal.export")
    with open(os.path.join(out, EXPORT_INFO)) as f:
        kind = "merged model" if json.load(f)["kind"] == "merged" else "adapter"
    print(f"wrote {kind} to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
