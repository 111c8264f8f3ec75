"""Compare grounding on klal datasets: a LoRA adapter's (KLAL fine-tuned) attention, the base model's attention and
the training-free methods (localization heads, entropy-gradient grounding, ViCrop, LASER), in one table.

Writes ``<out>/results.json``, ``<out>/results.md`` (rows: methods; columns: per-task pointing game, attention mass
inside the evidence, KL(target || map), box IoU, Acc@0.5 and answer accuracy, each with its sample count; cost per
sample) and ``<out>/gallery_<method>.png``. Every option is a flag or a YAML key (``--config``). Text-only rows (no
image) are skipped; the number per dataset is logged, stored in ``results.json`` (``text_only_skipped``) and stated
under the table. ``klal evaluate`` is the same command (:mod:`klal.eval.cli`).

Examples (tiny random model on CPU; generate data first with ``python -m data_gen``)::

    python evaluate.py --data data/grid_patch --max_samples 8 --out runs/eval_base
    python evaluate.py --config configs/eval/synthetic_compare.yaml --adapter runs/demo/klal/version_0/adapter
    python evaluate.py --config configs/eval/synthetic_compare.yaml --model.name_or_path Qwen/Qwen2.5-VL-3B-Instruct \\
        --model.max_pixels 802816 --adapter runs/3b_klal/adapter
    python evaluate.py --print_methods                     # the methods and their options
"""

from klal.eval.cli import main

if __name__ == "__main__":
    main()
