"""The klal demo: generate a grid-patch dataset, train the tiny Qwen2.5-VL with NTP + KLAL on CPU, and show what
changed.

It runs ``train.py fit --config configs/demo.yaml`` (the same CLI users run), measures NTP, KLAL, the share of the
answer token's attention that lands on the target cell, and teacher-forced answer-token accuracy on the validation
split before and after training, prints them side by side, and writes a PNG with the attention maps before and after
over a few validation images.

Run (2 CPU cores, a few minutes)::

    python -m studies.demo
    python -m studies.demo --steps 40 --out runs/demo_quick     # shorter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m studies.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="training config (default: demo)")
    p.add_argument("--out", default="runs/demo", help="run directory (logs, checkpoint, adapter, PNG)")
    p.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--num-images", type=int, default=4, help="validation images in the PNG")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags, passed through")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the demo; returns ``{"before": metrics, "after": metrics}``."""
    args = _parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from klal import train_cli
    from klal.measure import attention_grids, measure
    from klal.viz import overlay

    flags = [
        "--config",
        args.config,
        "--trainer.default_root_dir",
        args.out,
        "--trainer.logger.init_args.save_dir",
        args.out,
    ]
    if args.steps is not None:
        flags += ["--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(max(args.steps // 3, 1))]
    sys.argv = sys.argv[:1]  # LightningCLI reads sys.argv too; the demo passes its flags explicitly
    cli = train_cli.main([*flags, *args.extra], run=False)
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.prepare_data()
    dm.processor = module.processor
    dm.setup("fit")
    module.configure_model()

    val_loader = dm.val_dataloader()
    probe = next(iter(val_loader))
    before = measure(module, val_loader, desc="before")
    maps_before = attention_grids(module, probe)

    trainer.fit(module, datamodule=dm)

    after = measure(module, val_loader, desc="after")
    maps_after = attention_grids(module, probe)

    print(
        f"\nklal demo: tiny Qwen2.5-VL, grid patch, {len(dm.splits['train'])} train / "
        f"{len(dm.splits['val'])} validation samples, {trainer.global_step} steps, "
        f"klal_weight={module.klal_weight}"
    )
    print(f"{'metric (validation)':<28}{'before':>10}{'after':>10}")
    rows = [
        ("NTP loss", "ntp"),
        ("KLAL", "klal"),
        ("attention mass on target", "target_mass"),
        ("answer token accuracy", "token_acc"),
    ]
    for label, key in rows:
        print(f"{label:<28}{before[key]:>10.4f}{after[key]:>10.4f}")

    n = min(args.num_images, len(probe["ids"]))
    rows_ds = [dm.splits["val"][i] for i in range(n)]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for i, row in enumerate(rows_ds):
        img = row["image"].convert("RGB")
        gh, gw = probe["grids"][i][0]
        target = probe["target"][i, : gh * gw].reshape(gh, gw).numpy()
        overlay(axes[i, 0], img, target, f"target  |  {row['question'][:40]}")
        overlay(axes[i, 1], img, maps_before[i][0], f"attention before (mass {_mass(maps_before[i][0], target):.2f})")
        overlay(axes[i, 2], img, maps_after[i][0], f"attention after (mass {_mass(maps_after[i][0], target):.2f})")
    fig.suptitle("Answer-token attention over the image (mean over layers), before and after KLAL training")
    fig.tight_layout()
    png = Path(args.out) / "attention_before_after.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"\nwrote {png}\nadapter: {module.resolve_adapter_dir()}\nlogs: {trainer.log_dir}")
    return {"before": before, "after": after}


def _mass(att, target) -> float:
    return float((att * (target > 0)).sum())


if __name__ == "__main__":
    main()
