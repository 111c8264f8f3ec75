"""The study protocol that ``python -m studies.reproduce`` enforces before it runs anything.

* **Confirmatory studies** (``confirmatory: true``): the config file must be committed in git, unchanged since its
  last commit, and that commit's tree must hold no file under the study's ``results_dir``, i.e. the design was
  committed before any of its results (a separate, earlier commit). The command line may not change any of its keys.
  :func:`confirmatory_record` checks this and returns the config's blob hash and commit, which the report records
  and every run's fingerprint includes (a run trained before the commit is trained again, never reused).
* **Pilots** (every other study): for each task they share with a confirmatory config found under
  ``confirmatory_scan`` (default ``configs/``), :func:`check_pilot` requires another data seed and another dataset
  folder. The dataset manifest check (:func:`studies.reproduce.pipeline.check_dataset`: a study reads only a dataset
  generated with its own seed and settings) then makes it impossible for a pilot to score the confirmatory test split.

A refusal is a :class:`ValueError` whose one-line message names the config; the runner prints it as
``python -m studies.reproduce: error: ...`` with exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from studies.reproduce import pipeline as repro
from studies.reproduce.pipeline import StudyConfig


def _git(repo: Path, *args: str) -> str:
    """Stdout of ``git -C repo ARGS`` (stripped).

    Raises:
        RuntimeError: git failed (its first stderr line), or is not installed.
    """
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError("git is not installed") from e
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"git {' '.join(args)} failed"])[0])
    return done.stdout.strip()


def _inside(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` in git's spelling, or None when it lies outside."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def confirmatory_record(config_path: str | Path, cfg: StudyConfig, given: StudyConfig | None = None) -> dict[str, Any]:
    """Check that a confirmatory config may run, and return what the report records about it.

    Args:
        config_path: the study YAML.
        cfg: the config as the run will use it.
        given: the config as the file alone gives it (None: read ``config_path``); any difference from ``cfg`` is a
            command-line override, which a confirmatory study refuses.

    Returns:
        ``{"config", "blob", "commit", "commit_date", "checked_at"}``: the path inside the repository, the git blob
        hash of the file, the commit that last changed it, that commit's date, and the time of this check (UTC).

    Raises:
        ValueError: one line naming the config and the rule it breaks.
    """
    where = f"confirmatory config {config_path}"
    given = given if given is not None else repro.load_config(config_path)
    changed = _differences(given, cfg)
    if changed:
        raise ValueError(f"{where}: the command line changes {', '.join(changed)}; a confirmatory study runs as is")
    path = Path(config_path).resolve()
    try:
        root = Path(_git(path.parent, "rev-parse", "--show-toplevel")).resolve()
    except RuntimeError:
        raise ValueError(f"{where}: not inside a git repository; commit it, alone, before any run") from None
    rel = _inside(path, root)
    try:
        _git(root, "ls-files", "--error-unmatch", "--", rel)
    except RuntimeError:
        raise ValueError(f"{where}: not committed in git; commit it, alone, before any run") from None
    if _git(root, "status", "--porcelain", "--", rel):
        raise ValueError(f"{where}: changed since its last commit; commit the final design, alone, before any run")
    commit = _git(root, "log", "-1", "--format=%H", "--", rel)
    blob = _git(root, "rev-parse", f"{commit}:{rel}")
    results = _inside(Path(cfg.results_dir), root)
    if results is not None:
        held = _git(root, "ls-tree", "-r", "--name-only", commit, "--", results).splitlines()
        if held:
            raise ValueError(
                f"{where}: its commit {commit[:12]} already holds result files of the study ({held[0]}); the config "
                "must be committed before any of its results, in an earlier commit"
            )
    return {
        "config": rel,
        "blob": blob,
        "commit": commit,
        "commit_date": _git(root, "show", "-s", "--format=%cI", commit),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _differences(a: StudyConfig, b: StudyConfig) -> list[str]:
    """Top-level keys whose values differ between two configs."""
    da, db = (json.loads(json.dumps(dataclasses.asdict(c), default=str)) for c in (a, b))
    return [k for k in da if da[k] != db.get(k)]


def confirmatory_configs(scan: str | Path) -> list[tuple[Path, StudyConfig]]:
    """Every study YAML under ``scan`` (recursively) that sets ``confirmatory: true``, typed."""
    out = []
    for f in sorted(Path(scan).rglob("*.yaml")):
        try:
            raw = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError):
            continue  # not a study config (train.py configs live here too); a broken study config fails when run
        if isinstance(raw, dict) and raw.get("confirmatory") is True:
            out.append((f, repro.load_config(f)))
    return out


def check_pilot(config_path: str | Path, cfg: StudyConfig) -> list[str]:
    """Check that a pilot (non-confirmatory study) keeps off the data of every confirmatory config of its tasks.

    Returns:
        The confirmatory configs it was checked against (paths), for the report.

    Raises:
        ValueError: a shared task with the same data seed or the same dataset folder (one line naming both configs).
    """
    checked = []
    for path, other in confirmatory_configs(cfg.confirmatory_scan):
        shared = [t for t in cfg.tasks if t in other.tasks]
        if not shared:
            continue
        checked.append(str(path))
        for task in shared:
            seed = cfg.tasks[task].seed
            if seed == other.tasks[task].seed:
                raise ValueError(
                    f"pilot {config_path}: tasks.{task}.seed {seed} is the data seed of confirmatory config {path}; a "
                    "pilot uses another seed, so it never sees the confirmatory test split"
                )
            if repro.data_path(cfg, task).resolve() == repro.data_path(other, task).resolve():
                raise ValueError(
                    f"pilot {config_path}: tasks.{task} reads {repro.data_path(cfg, task)}, the dataset folder of "
                    f"confirmatory config {path}; give the pilot another data_dir"
                )
    return checked


def protocol_record(config_path: str | Path, cfg: StudyConfig, given: StudyConfig | None = None) -> dict[str, Any]:
    """Run the checks that apply to this study (:func:`confirmatory_record` or :func:`check_pilot`).

    Returns:
        ``{"confirmatory": True, **confirmatory_record}`` or ``{"confirmatory": False, "checked_against": [...]}``.
    """
    if cfg.confirmatory:
        return {"confirmatory": True, **confirmatory_record(config_path, cfg, given)}
    return {"confirmatory": False, "checked_against": check_pilot(config_path, cfg)}
