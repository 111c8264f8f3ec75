"""Resuming a run: :func:`resolve_ckpt_path` makes ``--ckpt_path last`` the newest ``last*.ckpt`` of the run's own
logger version (and points the logger at that version), :func:`check_ckpt_path` checks the path names a checkpoint
before anything starts, and :func:`continue_csv_metrics` / :func:`flush_csv_metrics` keep the run's ``metrics.csv``
across the interruption."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import warnings
from collections.abc import Iterable
from typing import Any

from klal.checkpoint.lightning_io import is_local, local_path

_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def _newest_mtime(path: str) -> float:
    """Modification time of a file, or of the newest file in a folder (a DeepSpeed checkpoint is a folder whose files
    are rewritten in place, which need not touch the folder's own time)."""
    if not os.path.isdir(path):
        return os.path.getmtime(path)
    times = [os.path.getmtime(path)]
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                times.append(os.path.getmtime(os.path.join(dirpath, name)))
    return max(times)


def find_last_checkpoint(roots: Iterable[str], max_depth: int = 4) -> str | None:
    """The most recently modified ``last.ckpt`` / ``last-vN.ckpt`` under ``roots`` (at most ``max_depth`` folders
    down, hidden folders skipped), or None. A folder of that name counts too: DeepSpeed writes checkpoints as
    folders; the newest file inside gives its time."""
    found: dict[str, float] = {}
    for root in roots:
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            continue
        base_depth = root.rstrip(os.sep).count(os.sep)
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.rstrip(os.sep).count(os.sep) - base_depth >= max_depth:
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            folders = [d for d in dirnames if _LAST.match(d)]
            dirnames[:] = [d for d in dirnames if d not in folders]  # nothing to find inside a checkpoint folder
            for name in (*filenames, *folders):
                if _LAST.match(name):
                    p = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        found[p] = _newest_mtime(p)
    return max(found, key=found.__getitem__) if found else None


def _version_dir(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _run_dirs(trainer: Any) -> tuple[list[str], Any]:
    """The folders where this run's own checkpoints live, and the logger that numbers runs (or None).

    A ``ModelCheckpoint`` with an explicit ``dirpath`` names the folder itself. Otherwise checkpoints go to the
    logger's ``<save_dir>/<name>/version_N/checkpoints``: with ``version`` given, that version only; without, every
    version of this logger name (one of them is the run being resumed). Without a logger, ``default_root_dir``.
    """
    explicit = [str(cb.dirpath) for cb in getattr(trainer, "checkpoint_callbacks", []) if getattr(cb, "dirpath", None)]
    if explicit:
        return [d for d in explicit if is_local(d)], None
    logger = getattr(trainer, "logger", None)
    root = None
    with contextlib.suppress(Exception):  # loggers without a local folder raise or return None
        root = logger.root_dir if logger is not None else None
    if root and is_local(root) and hasattr(logger, "_version"):
        if logger._version is not None:
            return [os.path.join(root, _version_dir(logger._version))], logger
        versions = sorted(glob.glob(os.path.join(glob.escape(str(root)), "*")))
        return [v for v in versions if os.path.isdir(v)], logger
    return [os.path.join(str(trainer.default_root_dir), "checkpoints")], None


def resolve_ckpt_path(ckpt_path: str | None, trainer: Any) -> str | None:
    """``ckpt_path``, except that ``last`` becomes the newest ``last*.ckpt`` of this run's own folders (see
    :func:`_run_dirs`), never a checkpoint of another run that shares the root folder.

    When the run is numbered by a logger (``version_N``) and no version was given, the logger is set to the version
    the checkpoint belongs to, so the resumed run writes into the same folder (``metrics.csv``, the adapter).

    Raises:
        FileNotFoundError: ``last`` and there is no checkpoint to resume (Lightning would warn and start afresh in a
            new folder, which a resumed job's log then hides); the message names the folders searched.
    """
    if ckpt_path != "last":
        return ckpt_path
    dirs, logger = _run_dirs(trainer)
    found = find_last_checkpoint(dirs)
    if found is None:
        root = getattr(logger, "root_dir", None) if logger is not None else None
        where = ", ".join(dirs) if dirs else str(root or trainer.default_root_dir)
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt to resume in {where}; nothing was started (leave out --ckpt_path to "
            "start a new run, or name a checkpoint file)"
        )
    if logger is not None and logger._version is None:
        root = os.path.abspath(str(logger.root_dir))
        version = os.path.relpath(os.path.abspath(found), root).split(os.sep)[0]
        m = re.fullmatch(r"version_(\d+)", version)
        logger._version = int(m.group(1)) if m else version
    return found


LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")
"""``ckpt_path`` values Lightning resolves itself (``last`` is klal's, :func:`resolve_ckpt_path`)."""


def _deepspeed_folder(path: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(path), "**", "*model_states.pt"), recursive=True))


def check_ckpt_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path`` (after :func:`resolve_ckpt_path`), checked to name a checkpoint before anything starts.

    Raises:
        FileNotFoundError: a local path that does not exist.
        IsADirectoryError: a folder that is not a DeepSpeed checkpoint folder (the message names the newest
            ``last*.ckpt`` inside, if there is one).
    """
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or not is_local(ckpt_path):
        return ckpt_path
    path = local_path(ckpt_path)
    if os.path.isdir(path):
        if _deepspeed_folder(path):
            return ckpt_path
        inside = find_last_checkpoint([path])
        hint = f" (the newest inside is {inside})" if inside else " (it holds no last.ckpt)"
        raise IsADirectoryError(
            f"--ckpt_path {ckpt_path} is a folder, not a checkpoint file{hint}; name a .ckpt file, or give "
            "--ckpt_path last to resume this run's newest checkpoint"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    return ckpt_path


def continue_csv_metrics(trainer: Any, global_step: int | None) -> int:
    """Let a resumed run append to its own ``metrics.csv`` (Lightning's CSV logger deletes an existing one).

    The rows logged before the checkpoint (``step < global_step``) are kept; later rows, which the resumed run logs
    again, are dropped (``global_step`` None: all rows are kept). Returns the number of rows kept (0 without a CSV
    logger or file).
    """
    import csv

    from lightning.pytorch.loggers import CSVLogger

    kept = 0
    if not getattr(trainer, "is_global_zero", True):
        return kept  # only rank 0 writes the CSV; another rank must not touch the file
    for logger in getattr(trainer, "loggers", []):
        if not isinstance(logger, CSVLogger) or not is_local(logger.log_dir):
            continue
        path = os.path.join(logger.log_dir, "metrics.csv")
        if not os.path.isfile(path):
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [
                r
                for r in reader
                if r.get("step", "") != "" and (global_step is None or int(float(r["step"])) < global_step)
            ]
        with warnings.catch_warnings():
            # "Previous log files in this directory will be deleted": they are, and written back below.
            warnings.simplefilter("ignore")
            experiment = logger.experiment
        experiment.metrics_keys = header
        experiment.metrics = [{k: v for k, v in r.items() if v != ""} for r in rows]
        if os.path.isfile(path):
            os.remove(path)
        experiment.save()
        kept += len(rows)
    return kept


def flush_csv_metrics(trainer: Any) -> None:
    """Write CSV-logged rows to disk now, so a run killed later keeps them for :func:`continue_csv_metrics`."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, CSVLogger) and getattr(logger.experiment, "metrics", None):
            logger.save()
