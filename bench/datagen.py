"""Data-generation throughput: samples per second per task, end to end (draw, PNG-encode, write Arrow, save).

Run from the repository root::

    python -m bench.datagen --num 200                      # every task, 448x448, 1 and 2 workers
    python -m bench.datagen --num 500 --workers 1 2 4 --tasks grid_patch --repeat 3

Each measurement is one :func:`data_gen.writer.generate_dataset` call into a fresh temporary directory with the task's
default config at ``--image-size``; pool start-up and saving are included; with ``--repeat`` the fastest run counts
(other processes on a shared machine only ever slow a run down). A task whose module cannot be imported is
reported as unavailable. Prints a Markdown table, headed by a free-CPU check (how much faster the largest worker count
of busy-loop processes runs than one), since on a shared machine other jobs can keep workers from scaling.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse.typing import PositiveInt

from data_gen.base import GenerationError
from data_gen.tasks import build_task, task_names
from data_gen.writer import generate_dataset
from klal.cli import run as run_command


def _burn(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def cpu_parallel_speedup(procs: int = 2, n: int = 4_000_000) -> float:
    """Speed-up of ``procs`` processes over one on a pure-Python busy loop: how much parallel CPU is free right now.

    On a shared machine other jobs can leave less than ``procs`` free CPUs; then worker counts cannot scale either, and
    this number says so next to the table.
    """
    import multiprocessing

    t0 = time.perf_counter()
    for _ in range(procs):
        _burn(n)
    serial = time.perf_counter() - t0
    with multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(procs) as pool:
        t0 = time.perf_counter()
        pool.map(_burn, [n] * procs)
        parallel = time.perf_counter() - t0
    return serial / parallel


def measure(task_name: str, num: int, workers: int, image_size: int, seed: int = 0) -> float:
    """Seconds to generate and save ``num`` samples of ``task_name`` with ``workers`` processes."""
    task = build_task(task_name, overrides={"image_size": image_size})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_dataset(task, num, seed, Path(tmp) / "ds", workers=workers, progress=False)
        return time.perf_counter() - t0


@dataclass
class DatagenOptions:
    """Data-generation throughput (see the module docstring)."""

    num: PositiveInt = 200
    """Samples per measurement (at least 3: one per split)."""
    workers: list[PositiveInt] = field(default_factory=lambda: [1, 2])
    """Worker counts (space- or comma-separated)."""
    tasks: list[str] | None = None
    """Tasks (default: every registered task)."""
    image_size: PositiveInt = 448
    """Image side in pixels."""
    repeat: PositiveInt = 1
    """Runs per measurement; the fastest is kept."""

    def __post_init__(self) -> None:
        if self.num < 3:
            raise ValueError(f"--num must be >= 3 (one sample per split), got {self.num}")
        if not self.workers:
            raise ValueError("--workers: give at least one worker count")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python -m bench.datagen [options]``: :func:`benchmark`; returns the exit status."""
    return benchmark(run_command(DatagenOptions, argv, prog or "python -m bench.datagen"))


def benchmark(args: DatagenOptions) -> int:
    """Run the benchmark and print the table; returns the exit status."""

    print(
        f"data_gen throughput: {args.num} samples, {args.image_size}x{args.image_size}, "
        f"best of {args.repeat}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start), "
        f"Python {platform.python_version()}, {platform.machine()}; free-CPU check: {max(args.workers)} busy "
        f"processes run {cpu_parallel_speedup(max(args.workers)):.2f}x faster than one"
    )
    print()
    print("| task | workers | samples | seconds | samples/s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.tasks or task_names():
        for w in args.workers:
            try:
                sec = min(measure(name, args.num, w, args.image_size) for _ in range(args.repeat))
            except GenerationError as e:
                print(f"| {name} | {w} | - | - | unavailable: {e} |")
                break
            print(f"| {name} | {w} | {args.num} | {sec:.2f} | {args.num / sec:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
