"""Every command of the README runs as written on a fresh clone (issue 28).

The test parses every fenced ``bash`` block of README.md (a command continued with ``\\`` is one command; ``#`` comments
stay, bash drops them) and runs the commands in README order with ``bash -c`` in a ``git clone`` of this checkout
(uncommitted README/code changes copied over it), with this Python's bin folder first on PATH (``python`` and the
installed ``klal`` console script) and the clone on PYTHONPATH, so the clone's code runs. Each must exit 0.

A README command not named below runs exactly as written, so a new command or a new ``bash`` block is run without
touching this file; an entry below whose command is no longer in the README fails the test (the tables cannot go
stale), and a code block fenced as ``sh``/``shell``/``console`` (which this test would not parse) fails it too.

Sizes made small (the README command + what is appended or replaced; bash keeps the last value of a repeated flag):

- ``klal train fit --config configs/demo.yaml`` and the three ``python train.py fit --config configs/demo.yaml ...``
  lines: the demo trains 400 steps on 200 generated samples (minutes). Appended: ``--trainer.max_steps 2
  --trainer.val_check_interval 2 --data.batch_size 2 --data.generate.num 16`` (the third line's own
  ``--trainer.max_steps 20`` is replaced by 2). Everything else (config, family, λ, output folders) as written, so the
  adapter ``runs/demo/klal/version_0/adapter`` the later commands read is the one the first of them writes.
- ``klal generate grid_patch --num 200`` and the ``python -m data_gen ... --num 2000`` / ``--num 200`` lines:
  ``--num`` -> 16 (at least one sample per split and enough for a batch).
- ``klal discover-heads``: appended ``--num 4`` (image-text pairs; default 1000, the set has 16 anyway).
- ``python evaluate.py --config configs/eval/synthetic_compare.yaml ...``: appended ``--max_samples 1
  --prepare_samples 2 --gallery_size 1`` (the config's 20 / 64 / 6 cost many minutes on the tiny model; even at one
  sample per task its eight methods take ~100 s of CPU, most of this test: EGG and LASER ~11 s a sample each).

Skipped (with the reason):

- ``pip install ... && python -m studies.demo``: installs packages (needs a registry, and this environment is already
  installed); the demo itself trains 400 steps on 200 samples (minutes). Not run by any test:
  tests/test_command_lines.py checks only its options.
- ``python -m pytest -q``: the suite this test is part of.
- ``klal evaluate --config configs/eval/synthetic_compare.yaml ...`` (the ``klal`` block): reads data/eval_* that only
  a later README command writes; the same evaluation runs below, after that data exists.
- ``klal convert-refcoco data/refcoco ...``: needs a RefCOCO download (data/refcoco), which no README command makes;
  the converter's exit 0 is tested on a hand-made file in tests/test_bad_inputs.py.
- ``configs/qwen2.5-vl-3b_lora_klal.yaml``, ``configs/qwen2.5-vl-7b_lora_ntp.yaml`` and every
  ``configs/scale/ddp_qwen2.5-vl-7b_klal.yaml`` line (plain, ``torchrun``, ``srun``): hub checkpoints (downloads) on
  8 GPUs / 2 nodes; the launchers' environment is tested in tests/test_scale.py.
- ``python train.py fit --config ... --ckpt_path last``: ``...`` is a placeholder for the run's own options; resuming
  is tested in tests/test_bad_inputs.py and tests/test_checkpointing.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HANG_S
from tests.test_bad_inputs import ROOT

README = ROOT / "README.md"

SMALL_TRAIN = " --trainer.max_steps 2 --trainer.val_check_interval 2 --data.batch_size 2 --data.generate.num 16"

SKIP: dict[str, str] = {
    'pip install "torch==2.13.0" -e ".[dev]" && python -m studies.demo': "installs packages; the demo trains 400 steps",
    "python -m pytest -q": "the test suite itself",
    "klal evaluate --config configs/eval/synthetic_compare.yaml --adapter runs/demo/klal/version_0/adapter": (
        "needs data/eval_*, written only by a later README command (which then runs the same evaluation)"
    ),
    "klal convert-refcoco data/refcoco --split-by unc --out data/refcoco_klal": "needs a RefCOCO download",
    "python train.py fit --config configs/qwen2.5-vl-3b_lora_klal.yaml --trainer.devices 8": "hub model, 8 GPUs",
    "python train.py fit --config configs/qwen2.5-vl-7b_lora_ntp.yaml": "hub model (download)",
    "python train.py fit --config configs/scale/ddp_qwen2.5-vl-7b_klal.yaml --trainer.devices 8": "hub model, 8 GPUs",
    "torchrun --nnodes 2 --nproc_per_node 8": "hub model, 2 nodes of 8 GPUs",
    "srun python train.py fit --config configs/scale/ddp_qwen2.5-vl-7b_klal.yaml": "SLURM, hub model, 2x8 GPUs",
    "python train.py fit --config ... --ckpt_path last": "'...' is a placeholder for the run's options",
}
"""README command (its start, before any ``#`` comment) -> why it is not run."""

SUBSTITUTE: list[tuple[str, str, str]] = [
    # (pattern, replacement, README command it must match at least once); applied in this order to every command
    (r"(--num) (?:2000|200)\b", r"\1 16", "python -m data_gen grid_patch        --num 2000"),
    (r"--trainer\.max_steps 20\b", "", "--model.klal_weight 0.5 --trainer.max_steps 20"),
    (
        r"^((?:klal train|python train\.py) fit --config configs/demo\.yaml[^#]*?)\s*(#.*)?$",
        r"\1" + SMALL_TRAIN,
        "klal train fit --config configs/demo.yaml",
    ),
    (r"^(klal discover-heads [^#]*?)\s*(#.*)?$", r"\1 --num 4", "klal discover-heads --data data/small_grid_patch"),
    (
        r"^(python evaluate\.py --config configs/eval/synthetic_compare\.yaml [^#]*?)\s*(#.*)?$",
        r"\1 --max_samples 1 --prepare_samples 2 --gallery_size 1",
        "python evaluate.py --config",
    ),
]
"""(regex, replacement, a README command it must apply to): the size reductions the module docstring lists."""


def readme_commands(text: str) -> list[str]:
    """The commands of every fenced ``bash`` block, in order; ``\\``-continued lines joined into one command."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "no bash block in README.md"
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return commands


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIP.items() if command.startswith(start)), None)


def small(command: str) -> str:
    """``command`` with the size reductions of SUBSTITUTE applied."""
    for pattern, replacement, _ in SUBSTITUTE:
        command = re.sub(pattern, replacement, command).strip()
    return command


def test_readme_has_no_unparsed_shell_blocks_and_no_stale_entries():
    text = README.read_text()
    assert not re.findall(r"^```(?:sh|shell|console|zsh)\s*$", text, flags=re.M), "shell blocks must be ```bash"
    commands = readme_commands(text)
    for start in SKIP:
        assert any(c.startswith(start) for c in commands), f"skip entry no longer in README: {start!r}"
    for pattern, _, example in SUBSTITUTE:
        hits = [c for c in commands if example in c]
        assert hits, f"substitution example no longer in README: {example!r}"
        assert all(re.search(pattern, c) for c in hits), f"{pattern!r} does not apply to {hits}"


@pytest.mark.slow
def test_every_readme_command_runs_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "klal"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=HANG_S)
    # uncommitted (tracked or new, not ignored) files of this checkout, so the test checks the tree it runs in
    listed = subprocess.run(
        ["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in listed:
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, clone / rel)
    env = {k: v for k, v in os.environ.items() if k != "KLAL_DEBUG"}
    bindir = str(Path(sys.executable).parent)
    env.update(PATH=bindir + os.pathsep + env["PATH"], PYTHONPATH=str(clone), TOKENIZERS_PARALLELISM="false")
    assert shutil.which("python", path=env["PATH"]) and shutil.which("klal", path=env["PATH"])
    ran, failed = [], []
    for command in readme_commands(README.read_text()):
        if skip_reason(command):
            continue
        line = small(command)
        proc = subprocess.run(
            ["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=HANG_S, check=False
        )
        ran.append(line)
        if proc.returncode != 0:
            failed.append(f"$ {line}\nexit {proc.returncode}\n{proc.stderr[-2000:]}")
    assert not failed, "\n\n".join(failed)
    assert len(ran) >= 15, ran  # every runnable block ran: klal, generate, train, evaluate
    assert (clone / "runs/demo/klal/version_0/adapter").is_dir()
    assert (clone / "exported").is_dir() and (clone / "grid_patch.png").is_file()
