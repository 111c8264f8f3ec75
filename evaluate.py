"""Compare grounding on klal datasets: a LoRA adapter's (KLAL fine-tuned) attention, the base model's attention and
the training-free methods (localization heads, entropy-gradient grounding, ViCrop, LASER), in one table.

Writes ``<out>/results.json``, ``<out>/results.md`` (rows: methods; columns: per-task pointing game, attention mass
inside the evidence, KL(target || map), box IoU, Acc@0.5 and answer accuracy, each with its sample count; cost per
sample) and ``<out>/gallery_<method>.png``. Every option is a flag or a YAML key (``--config``). Text-only rows (no
image) are skipped; the number per dataset is logged, stored in ``results.json`` (``text_only_skipped``) and stated
under the table.

Examples (tiny random model on CPU; generate data first with ``python -m data_gen``)::

    python evaluate.py --data '[data/grid_patch]' --max_samples 8 --out runs/eval_base
    python evaluate.py --config configs/eval/synthetic_compare.yaml --adapter runs/demo/klal/version_0/adapter
    python evaluate.py --config configs/eval/synthetic_compare.yaml --model.name_or_path Qwen/Qwen2.5-VL-3B-Instruct \\
        --model.max_pixels 802816 --adapter runs/3b_klal/adapter
    python evaluate.py --print_methods                     # the methods and their options
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser


def build_parser() -> ArgumentParser:
    """The evaluate.py argument parser (fields of :class:`klal.evaluation.EvalConfig` as flags)."""
    from klal.evaluation import EvalConfig

    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0], parse_as_dict=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    p.add_class_arguments(EvalConfig, None, fail_untyped=False)
    p.add_argument("--print_methods", action="store_true", help="list the grounding methods and exit")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation on ``argv``; returns the dict also written to ``<out>/results.json``."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.print_methods:
        from klal.grounding import available_methods
        from klal.grounding.base import _REGISTRY

        for name in available_methods():
            doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]
            print(f"{name:20s} {doc}")
        return {}
    from klal.evaluation import EvalConfig, check_ranges, evaluate
    from klal.grounding import GroundingError

    init = p.instantiate(ns)
    fields = {k: v for k, v in vars(init).items() if k not in ("config", "print_methods", "__path__")}
    cfg = EvalConfig(**fields)
    try:
        results = evaluate(cfg)
    except (GroundingError, FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    print(Path(cfg.out, "results.md").read_text())
    bad = check_ranges(results["metrics"])
    if bad:
        sys.exit("evaluate.py: error: metrics out of range: " + "; ".join(bad))
    return results


if __name__ == "__main__":
    main()
