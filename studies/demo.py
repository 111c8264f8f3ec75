"""The klal demo: generate a grid-patch dataset, train the tiny Qwen2.5-VL with NTP + KLAL on CPU, and show what
changed.

It runs ``train.py fit --config configs/demo.yaml`` (the same CLI users run) and measures the validation split before
and after training through the evaluation engine (:mod:`klal.eval`): the answer's NTP loss, KL(target || attention),
the share of the answer token's attention on the target cells, the pointing game, the teacher-forced answer-token
accuracy (a token rate, dominated by format tokens such as ``(``, ``,`` and ``<|im_end|>``) and the exact-answer
accuracy (greedy generation, normalised match). It prints them side by side and writes a PNG with the target and the
attention before and after over a few validation images, with each panel's question, gold and predicted answer.

Run (2 CPU cores, a few minutes)::

    python -m studies.demo
    python -m studies.demo --steps 40 --out runs/demo_quick     # shorter
    python -m studies.demo --steps 40 --extra --model.klal_weight 0.5   # the rest goes to train.py
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from jsonargparse.typing import PositiveInt

from klal.cli import run as run_command

REPO = Path(__file__).resolve().parents[1]


DEFAULT_TRAIN_CONFIG = str(REPO / "configs" / "demo.yaml")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, dict[str, float]]:
    """``python -m studies.demo [options] [--extra TRAIN.PY FLAGS...]``: :func:`demo`.

    Everything after ``--extra`` (or after a bare ``--``) goes to train.py unchanged, as the list option ``extra``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    cut = next((i for i, a in enumerate(args) if a in ("--extra", "--")), None)
    if cut is not None:
        args = [*args[:cut], "--extra", json.dumps(args[cut + 1 :])]
    return run_command(demo, args, prog or "python -m studies.demo")


def demo(
    train_config: str = DEFAULT_TRAIN_CONFIG,
    out: str = "runs/demo",
    steps: PositiveInt | None = None,
    num_images: PositiveInt = 4,
    extra: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Train the tiny Qwen2.5-VL with NTP + KLAL on a generated grid-patch set and show what changed.

    Args:
        train_config: the train.py config (default: configs/demo.yaml).
        out: run directory (logs, checkpoint, adapter, PNG).
        steps: override trainer.max_steps (validation then runs every steps // 3).
        num_images: validation images in the PNG.
        extra: more train.py flags, passed through (on the command line: everything after --extra).

    Returns:
        ``{"before": metrics, "after": metrics}``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from klal import train_cli

    flags = [
        "--config",
        train_config,
        "--trainer.default_root_dir",
        out,
        "--trainer.logger.init_args.save_dir",
        out,
    ]
    if steps is not None:
        flags += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(max(steps // 3, 1))]
    sys.argv = sys.argv[:1]  # LightningCLI reads sys.argv too; the demo passes its flags explicitly
    cli = train_cli.main([*flags, *(extra or [])], run=False)
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.prepare_data()
    dm.processor = module.processor
    dm.setup("fit")
    module.configure_model()

    rows = validation_rows(dm)
    before, run_before = measure(module, rows, dm.batch_size, dm.target)

    trainer.fit(module, datamodule=dm)

    after, run_after = measure(module, rows, dm.batch_size, dm.target)

    print(
        f"\nklal demo: tiny Qwen2.5-VL, grid patch, {len(dm.splits['train'])} train / "
        f"{len(dm.splits['val'])} validation samples, {trainer.global_step} steps, "
        f"klal_weight={module.klal_weight}"
    )
    print(f"{'metric (validation, ' + str(len(rows)) + ' samples)':<56}{'before':>10}{'after':>10}")
    for key, label in METRICS:
        print(f"{label:<56}{before[key]:>10.4f}{after[key]:>10.4f}")

    png = Path(out) / "attention_before_after.png"
    save_before_after(rows[:num_images], run_before, run_after, png, dm.target)
    print(f"\nwrote {png}\nadapter: {module.resolve_adapter_dir()}\nlogs: {trainer.log_dir}")
    return {"before": before, "after": after}


METRICS = (
    ("ntp", "NTP loss on the answer (teacher-forced, mean per sample)"),
    ("target_kl", "KL(target || attention)"),
    ("evidence_mass", "attention mass on the target cells"),
    ("pointing", "pointing game (attention peak on a target cell)"),
    ("token_acc", "answer-token accuracy (teacher-forced; mostly format)"),
    ("exact_answer", "exact-answer accuracy (greedy answer, normalised match)"),
)
"""What the demo prints, before and after training: key of :func:`measure`'s dict, label."""

MAX_NEW_TOKENS = 12
"""Greedy decoding cap: a grid-patch answer ``(r, c)`` is about 6 tokens."""


def validation_rows(dm) -> list[dict]:
    """The validation rows that have an image (the ones attention can be measured on), decoded once."""
    from klal.session import image_rows

    kept, _ = image_rows(dm.splits["val"])
    return list(kept)


def measure(module, rows: list[dict], batch_size: int, target) -> tuple[dict[str, float], object]:
    """The demo's numbers on ``rows``, through the evaluation engine (:func:`klal.eval.engine.run_method` running
    :class:`klal.eval.attention.TeacherForcedAttention` with the module's query tokens and supervised layers, and
    greedy answers by the one decoder).

    Returns:
        ``{"ntp", "target_kl", "evidence_mass", "pointing", "token_acc", "exact_answer"}`` (means over the samples,
        grounding means over those with evidence) and the engine's run (its results hold the maps and answers).
    """
    import numpy as np

    from klal.eval.attention import TeacherForcedAttention
    from klal.eval.engine import run_method
    from klal.eval.metrics import GroundingMetrics, pooled
    from klal.grounding import GroundingModel

    gm = GroundingModel(module.model, module.processor)
    metrics = GroundingMetrics(spec=target)
    method = TeacherForcedAttention(query=module.klal_query, layers=list(module.layers), max_new_tokens=MAX_NEW_TOKENS)
    with gm.borrowed():
        run = run_method(gm, "demo", method, {"validation": rows}, metrics, batch_size=batch_size, keep_results=True)
    scores = metrics.compute()
    out = {
        "ntp": float(np.mean([r.extras["answer_nll"] for r in run.results])),
        "token_acc": float(np.mean([r.extras["token_acc"] for r in run.results])),
    }
    for key, name in (
        ("target_kl", "target_kl"),
        ("evidence_mass", "evidence_mass"),
        ("pointing", "pointing_game"),
        ("exact_answer", "answer_accuracy"),
    ):
        s = pooled(scores, "demo", name)
        out[key] = s["value"] if s["count"] else float("nan")
    return out, run


def save_before_after(rows: list[dict], before, after, png: Path, target=None) -> None:
    """One row of panels per sample: the target map, the attention before and after training (each with the greedy
    answer it gave), the question and gold answer above, and the colour scale of the maps. ``target``: the
    :class:`~klal.data.targets.TargetSpec` of the target maps (default: the defaults)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from klal.data.targets import build_target_map, evidence_cells
    from klal.eval.report import clip_text
    from klal.eval.scores import evidence_mass
    from klal.session import sample_images
    from klal.viz import overlay

    n = len(rows)
    fig, axes = plt.subplots(n, 3, figsize=(11, 3.8 * n), squeeze=False)
    for i, row in enumerate(rows):
        img = sample_images(row)[0]
        grid = before.results[i].maps[0].shape
        orig = (row["height"], row["width"])
        target_map = build_target_map(row["evidence"], orig, grid, target)
        cells = evidence_cells(row["evidence"], orig, grid)
        # The whole question, wrapped (it used to be cut with "..."); the panels are tall enough for four lines.
        overlay(axes[i, 0], img, target_map, "\n".join(["target map", *textwrap.wrap(row["question"], 36)]))
        for j, (name, run) in enumerate((("before", before), ("after", after)), start=1):
            res = run.results[i]
            mass = f", mass {evidence_mass(res.maps[0], cells):.2f}" if cells is not None else ""
            said = clip_text(repr(res.answer), 30)
            title = f"attention {name} training{mass}\ngold: {row['answer']}  said: {said}"
            overlay(axes[i, j], img, res.maps[0], title)
    fig.suptitle("Answer-token attention over the image (mean over the supervised layers), before and after KLAL")
    fig.tight_layout(rect=(0, 0, 0.92, 0.97))
    bar = fig.add_axes((0.935, 0.1, 0.015, 0.8))
    fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap="inferno"), cax=bar, label="map value, per panel: min (0) to max (1)"
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
