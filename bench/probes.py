"""Cost of each grounding method per sample: forward and backward passes and seconds, measured side by side in one
run on the same samples (a few of each synthetic task), with each method's time relative to the one-pass attention
probe.

Runs on the tiny model on CPU by default; ``--arch 3b`` / ``7b`` builds the published Qwen2.5-VL language/vision sizes
with random weights (no checkpoint download), for a GPU.

Examples::

    python -m bench.probes                                     # tiny model, CPU, 3 samples per task
    python -m bench.probes --arch 3b --device cuda --dtype bfloat16 --max-pixels 802816 --samples 4
    python -m bench.probes --batch-size 6                      # add batched rows for the methods that batch
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt

from bench.step import ARCH
from bench.throughput import cpu_name
from klal.cli import run as run_command
from klal.grounding import GroundingModel, available_methods, build_method
from klal.models.loader import ModelConfig, load_model_and_processor

TASKS = {
    "grid_patch": ("easy", {"image_size": 224}),
    "line_intersection": ("easy", {"image_size": 224}),
    "line_tracing": ("easy", {"image_size": 224, "line_width": 2, "node_radius": 8, "num_nodes": (6, 8)}),
}


METHOD_OPTIONS = {"localization_heads": {"floor": 0.0}}
"""Options other than the defaults. Every architecture here has random weights, whose attention is so flat that no
raw head map clears the paper's 0.001 floor; every other method runs with its defaults (EGG: the authors' round
cap of 15)."""


def make_rows(samples: int, image_size: int) -> list[dict]:
    """``samples`` rows of each synthetic task, drawn in memory (no dataset on disk needed)."""
    from data_gen.tasks import build_task
    from data_gen.writer import sample_row

    rows = []
    for name, (preset, over) in TASKS.items():
        task = build_task(name, preset=preset, overrides={**over, "image_size": image_size})
        rows += [sample_row(task, 123, i) for i in range(samples)]
    return rows


@dataclass
class ProbesOptions:
    """Cost per sample of each grounding method (see the module docstring)."""

    arch: Literal["tiny", "3b", "7b"] = "tiny"
    """The tiny model, or random weights at the published Qwen2.5-VL 3B / 7B sizes (bench/step.py ARCH)."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, ...)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    samples: PositiveInt = 3
    """Samples per task."""
    image_size: PositiveInt = 224
    """Image side of the generated samples in pixels."""
    max_pixels: PositiveInt = 224 * 224
    """Processor max_pixels."""
    methods: list[str] | None = None
    """Methods to measure (space- or comma-separated names; default: every registered method)."""
    threads: PositiveInt | None = None
    """Torch CPU threads."""
    batch_size: PositiveInt = 1
    """Also measure the methods that batch (run_batch) with this many samples per forward pass."""


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[dict]:
    """``python -m bench.probes [options]``: :func:`benchmark`."""
    return benchmark(run_command(ProbesOptions, argv, prog or "python -m bench.probes"))


def benchmark(args: ProbesOptions) -> list[dict]:
    """Run the benchmark; prints a markdown table and returns its rows."""
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(
        name_or_path="tiny",
        dtype=args.dtype,
        max_pixels=args.max_pixels,
        tiny_overrides=dict(ARCH[args.arch]) if args.arch != "tiny" else None,
    )
    model, processor = load_model_and_processor(cfg)
    model.to(args.device)
    for prm in model.parameters():
        prm.requires_grad_(False)
    gm = GroundingModel(model, processor)
    rows = make_rows(args.samples, args.image_size)
    names = args.methods or available_methods()
    # Warm-up: one probe pass so that lazy initialisation is not billed to the first method.
    build_method("attention_probe").run(gm, rows[0])

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = []
    for name in names:
        method = build_method(name, **METHOD_OPTIONS.get(name, {}))
        t0 = time.perf_counter()
        method.prepare(gm, rows)  # a no-op except for methods with a setup pass (localization-head discovery)
        t_prep = time.perf_counter() - t0
        # Only methods that share passes between samples (``batched``) get a batched row.
        batch_sizes = [1] + ([args.batch_size] if args.batch_size > 1 and method.batched else [])
        for bs in batch_sizes:
            fwd = bwd = secs = 0.0
            for start in range(0, len(rows), bs):
                sync()
                chunk = rows[start : start + bs]
                out = method.run_batch(gm, chunk) if bs > 1 else [method.run(gm, chunk[0])]
                sync()
                for res in out:
                    # As in evaluate.py: a batched pass counts once per sample in it; the seconds show the gain.
                    fwd += res.passes["forward"]
                    bwd += res.passes["backward"]
                    secs += res.seconds
            n = len(rows)
            label = name if bs == 1 else f"{name} (batch {bs})"
            results.append(
                {"method": label, "forward": fwd / n, "backward": bwd / n, "seconds": secs / n, "prepare_s": t_prep}
            )
    base = next((r["seconds"] for r in results if r["method"] == "attention_probe"), None)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name()
    print(
        f"\n{args.arch} model, {args.dtype}, {dev}, {len(rows)} samples ({args.samples} per task), "
        f"max_pixels {args.max_pixels}, torch threads {torch.get_num_threads()}"
    )
    print("| method | forward/sample | backward/sample | s/sample | x attention_probe | one-off prepare (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rel = f"{r['seconds'] / base:.1f}" if base else "-"
        print(
            f"| {r['method']} | {r['forward']:.1f} | {r['backward']:.1f} | {r['seconds']:.3f} | {rel} "
            f"| {r['prepare_s']:.2f} |"
        )
    return results


if __name__ == "__main__":
    main()
