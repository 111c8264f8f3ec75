"""Evaluate a base model, optionally with a LoRA adapter, on klal datasets: NTP loss, KLAL, attention mass on the
evidence, and teacher-forced answer-token accuracy, per dataset split. Writes ``results.json`` and ``results.md``.

The training-free grounding methods (localization heads, entropy-gradient grounding, LASER, ViCrop) are not wired in
yet; this script measures the model's own answer-token attention, the quantity KLAL trains.

Examples::

    python evaluate.py --data data/grid_patch --out runs/eval_base                       # tiny base model
    python evaluate.py --data data/grid_patch --adapter runs/demo/klal/version_0/adapter --out runs/eval_klal
    python evaluate.py --model Qwen/Qwen2.5-VL-3B-Instruct --max-pixels 802816 --data data/grid_patch data/line_tracing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from torch.utils.data import DataLoader


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the results dict also written to ``<out>/results.json``."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, a hub id or a local checkpoint directory")
    p.add_argument("--adapter", default=None, help="peft adapter directory trained on --model")
    p.add_argument("--data", nargs="+", required=True, help="dataset directories (save_to_disk, klal schema)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--min-pixels", type=int, default=56 * 56)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--query", default="last", choices=["last", "all", "first", "prompt_last"])
    p.add_argument("--layers", default="all")
    p.add_argument("--out", default="runs/eval")
    args = p.parse_args(argv)

    import datasets
    from peft import PeftModel

    from klal.capture import enable_capture, parse_layers
    from klal.data.collate import KLALCollator
    from klal.data.schema import check_columns
    from klal.measure import measure
    from klal.models.loader import ModelConfig, load_model_and_processor
    from klal.module import KLALModule

    backbone = ModelConfig(name_or_path=args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    module = KLALModule(backbone=backbone, klal_query=args.query, klal_layers=args.layers)
    model, processor = load_model_and_processor(backbone, processor=module.processor)
    if args.adapter:
        if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            sys.exit(f"evaluate.py: error: --adapter {args.adapter!r} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, args.adapter)
    enable_capture(model)
    module.model = model.eval()
    module.layers = parse_layers(args.layers, module.text_config.num_hidden_layers)

    results: dict = {"model": args.model, "adapter": args.adapter, "split": args.split, "datasets": {}}
    for path in args.data:
        if not os.path.isdir(path):
            sys.exit(f"evaluate.py: error: dataset directory not found: {path}")
        dd = datasets.load_from_disk(path)
        if args.split not in dd:
            sys.exit(f"evaluate.py: error: {path} has no split {args.split!r} (has {list(dd)})")
        ds = dd[args.split]
        check_columns(ds, f"{path} [{args.split}]")
        if args.max_samples:
            ds = ds.select(range(min(args.max_samples, len(ds))))
        loader = DataLoader(ds, batch_size=args.batch_size, collate_fn=KLALCollator(processor))
        results["datasets"][path] = measure(module, loader, desc=Path(path).name)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| dataset | samples | with map | NTP | KLAL | target mass | token acc |", "|---|---|---|---|---|---|---|"]
    for path, r in results["datasets"].items():
        lines.append(
            f"| {path} | {r['samples']:.0f} | {r['samples_with_map']:.0f} | {r['ntp']:.4f} | {r['klal']:.4f} "
            f"| {r['target_mass']:.4f} | {r['token_acc']:.4f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
