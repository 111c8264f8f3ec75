"""Export a trained LoRA adapter: a self-contained peft adapter folder, or a merged model.

Examples::

    # adapter folder (+ processor) that PeftModel.from_pretrained(base, OUT) loads
    python -m klal.export --adapter runs/demo/klal/version_0/adapter --out exports/demo-adapter
    # LoRA merged into the base weights: Qwen2_5_VLForConditionalGeneration.from_pretrained(OUT) loads it
    python -m klal.export --adapter runs/demo/klal/version_0/adapter --merge --out exports/demo-merged

The base model is the one the adapter was trained on, read from the adapter's ``klal_adapter.json`` (written by
training; it also holds the ``tiny`` model's seed and sizes and the processor's pixel bounds), else from peft's
``base_model_name_or_path``; ``--model`` overrides the location (a local copy of the same checkpoint). An adapter
of another base model is refused. The output folder is written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

from klal.checkpoint import ADAPTER_INFO, atomic_save_dir, base_fingerprint, check_compatible, read_adapter_info
from klal.models.loader import DTYPES, ModelConfig, load_model_and_processor

__all__ = ["export", "main", "resolve_base"]


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


def export(adapter: str, out: str, model: str | None = None, merge: bool = False, dtype: str = "auto") -> str:
    """Load the base model with ``adapter`` and write it to ``out``; returns ``out``.

    Args:
        adapter: peft adapter folder (e.g. ``<log_dir>/adapter`` from training).
        out: output folder (replaced if it exists).
        model: base model location overriding the one the adapter records.
        merge: merge the LoRA weights into the base and save a plain transformers model (``save_pretrained``, with
            the processor), instead of an adapter folder.
        dtype: parameter dtype of the loaded base (and of the merged model).

    Raises:
        FileNotFoundError: not an adapter folder.
        ValueError: the adapter was trained on another base model.
    """
    from peft import PeftModel

    cfg = resolve_base(adapter, model, dtype)
    if os.path.abspath(out) == os.path.abspath(adapter):
        raise ValueError(f"--out {out!r} is the adapter folder itself; choose another folder")
    base, processor = load_model_and_processor(cfg)
    info = read_adapter_info(adapter)
    saved_base = ((info or {}).get("fingerprint") or {}).get("base")
    if saved_base is not None:
        text_config = getattr(base.config, "text_config", base.config)
        here = base_fingerprint(cfg, text_config)
        recorded = {"klal_base_model": saved_base["name_or_path"], "klal_fingerprint": {"base": saved_base}}
        check_compatible(recorded, here, {}, source=f"adapter {adapter}")
    peft_model = PeftModel.from_pretrained(base, adapter)
    peft_model.eval()

    def write(tmp: str) -> None:
        if merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(tmp)
        else:
            peft_model.peft_config["default"].base_model_name_or_path = cfg.name_or_path
            peft_model.save_pretrained(tmp)
            if info is not None:
                shutil.copy(os.path.join(adapter, ADAPTER_INFO), os.path.join(tmp, ADAPTER_INFO))
        processor.save_pretrained(tmp)

    atomic_save_dir(write, out)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m klal.export",
        description="Export a klal LoRA adapter as a peft adapter folder or (--merge) a merged transformers model.",
    )
    p.add_argument("--adapter", required=True, help="peft adapter folder written by training (<log_dir>/adapter)")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument(
        "--model",
        default=None,
        help="base model: tiny, a hub id or a local folder (default: the one recorded with the adapter)",
    )
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights and save a plain model")
    p.add_argument("--dtype", default="auto", help="auto (float32 for tiny, bfloat16 otherwise), float32, bfloat16")
    return p


def main(argv: list[str] | None = None) -> str:
    """Command line entry point; returns the output folder."""
    args = _parser().parse_args(argv)
    try:
        out = export(args.adapter, args.out, model=args.model, merge=args.merge, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"klal.export: {e}") from e
    kind = "merged model" if args.merge else "adapter"
    print(f"wrote {kind} to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
