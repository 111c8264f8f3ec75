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

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from data_gen.base import GenerationError
from data_gen.tasks import build_task, task_names
from data_gen.writer import generate_dataset


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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m bench.datagen", description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200, help="samples per measurement (default 200)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--tasks", nargs="+", default=task_names(), help="tasks (default all)")
    p.add_argument("--image-size", type=int, default=448, help="image side in pixels (default 448)")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept (default 1)")
    args = p.parse_args(argv)
    if args.num < 3 or min(args.workers) < 1 or args.repeat < 1:
        p.error("--num must be >= 3, --repeat >= 1 and every --workers value >= 1")

    print(
        f"data_gen throughput: {args.num} samples, {args.image_size}x{args.image_size}, "
        f"best of {args.repeat}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start), "
        f"Python {platform.python_version()}, {platform.machine()}; free-CPU check: {max(args.workers)} busy "
        f"processes run {cpu_parallel_speedup(max(args.workers)):.2f}x faster than one"
    )
    print()
    print("| task | workers | samples | seconds | samples/s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.tasks:
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
