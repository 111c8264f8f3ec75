"""Write a task's samples to disk as a klal dataset (``datasets.DatasetDict`` in the schema of klal.data.schema).

Layout and guarantees:
    * Sample ``i`` is ``task.sample(seed, i)``; rows are written in index order whatever the number of workers, so
      the same ``(task config, num, seed, splits)`` gives byte-identical Arrow files for 1 or N worker processes.
    * Splits are consecutive index ranges: ``train`` = ``[0, n_train)``, ``validation`` = ``[n_train, n_train +
      n_val)``, ``test`` = the rest. The sizes are the fractions of ``num`` rounded by largest remainder, then
      raised to at least 1 per split (taken from the largest split), so every split is non-empty for ``num >= 3``.
    * Row ids are ``f"{task}-{seed}-{i:06d}"``; images are stored as PNG.
    * The dataset is built in a hidden temporary directory beside ``out`` (``.NAME.partial-*``) and renamed into
      place only when complete; on any error or KeyboardInterrupt the temporary directory is removed and ``out`` is
      left as it was. The directory records its owner (:data:`OWNER_NAME`: host, pid, process start time), so a run
      killed with SIGKILL, which cannot clean up, leaves a folder that the next run of the same ``out`` removes once
      it sees the owner is dead. Worker processes die with their parent (a parent-death signal on Linux, a watchdog
      thread elsewhere), and Ctrl-C stops them at once instead of waiting for their current jobs. An existing
      ``out`` is refused unless ``overwrite=True``, in which case it is replaced only after the new dataset is
      complete (and only if it looks like a dataset directory or is empty, so a mistyped path cannot wipe a folder).
    * ``klal_dataset.json`` in the dataset directory records the task, seed, num, split ranges, config and versions.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

import klal
from data_gen.base import GenerationError, Task
from klal.data.schema import FEATURES, SPLITS, make_record

MANIFEST_NAME = "klal_dataset.json"
"""File written into every generated dataset directory."""
FORMAT_VERSION = 1
"""Version of the on-disk layout written here (bumped on incompatible changes)."""
OWNER_NAME = "owner.json"
"""File in a ``.NAME.partial-*`` build folder naming the process that builds it (removed with the folder)."""


class DatasetWriteError(ValueError):
    """Bad writer arguments or output path; the message names the argument or path at fault."""


def split_sizes(num: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """Sizes of the ``train``/``validation``/``test`` splits of ``num`` samples.

    Args:
        num: total number of samples (at least one per split).
        fractions: positive shares of the three splits, summing to 1.

    Raises:
        DatasetWriteError: wrong number of fractions, a non-positive fraction, a sum other than 1, or
            ``num < 3``.
    """
    if len(fractions) != len(SPLITS):
        raise DatasetWriteError(f"splits needs {len(SPLITS)} fractions ({', '.join(SPLITS)}), got {list(fractions)}")
    if any(not f > 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DatasetWriteError(f"splits must be positive fractions summing to 1, got {list(fractions)}")
    if num < len(SPLITS):
        raise DatasetWriteError(f"num={num} is too small: need at least {len(SPLITS)} samples, one per split")
    raw = [f * num for f in fractions]
    sizes = [math.floor(r) for r in raw]
    # Largest remainder, ties to the earlier split, so sizes sum to num.
    for k in sorted(range(len(raw)), key=lambda k: (sizes[k] - raw[k], k))[: num - sum(sizes)]:
        sizes[k] += 1
    for k in range(len(sizes)):
        if sizes[k] == 0:
            sizes[max(range(len(sizes)), key=lambda j: sizes[j])] -= 1
            sizes[k] = 1
    return dict(zip(SPLITS, sizes))


def sample_row(task: Task, seed: int, index: int) -> dict[str, Any]:
    """Row ``index`` of the dataset: ``task.sample(seed, index)`` in the schema, the image as a PIL image."""
    try:
        s = task.sample(seed, index)
    except GenerationError as e:
        raise GenerationError(f"task {task.name!r}, seed {seed}, sample {index}: {e}") from e
    return make_record(
        id=f"{task.name}-{seed}-{index:06d}",
        task=task.name,
        image=s.image,
        question=s.question,
        answer=s.answer,
        evidence=s.evidence,
        meta=s.meta,
    )


def sample_record(task: Task, seed: int, index: int) -> dict[str, Any]:
    """:func:`sample_row` with the image encoded as PNG bytes, as the dataset stores it."""
    rec = sample_row(task, seed, index)
    image = rec["image"]
    # Encode here (in the worker when there are several) so PNG compression runs in parallel and only bytes are
    # sent back; PIL's encoder is deterministic, so the bytes do not depend on the process.
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    rec["image"] = {"bytes": buf.getvalue(), "path": None}
    return rec


# Worker-process state, set once by the pool initializer so the task is pickled once per worker, not per chunk.
_WORKER_TASK: Task | None = None


def _die_with_parent(parent: int) -> None:
    """End this worker when the process ``parent`` ends, even by SIGKILL (which gives the parent no chance to)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _init_worker(task: Task, parent: int) -> None:
    global _WORKER_TASK
    _WORKER_TASK = task
    # Ctrl-C reaches the whole process group; the parent handles it and stops the pool, so workers ignore it
    # instead of each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)


def _work(seed: int, start: int, stop: int) -> list[dict[str, Any]]:
    assert _WORKER_TASK is not None, "worker not initialised"
    return [sample_record(_WORKER_TASK, seed, i) for i in range(start, stop)]


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds with everything imported; elsewhere (macOS, Windows) spawn is the safe one.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextmanager
def record_stream(
    task: Task, seed: int, start: int, stop: int, workers: int = 1, chunk_size: int | None = None
) -> Iterator[Iterator[dict[str, Any]]]:
    """Context manager giving an iterator over the records of indices ``start..stop-1``, in index order.

    With ``workers > 1`` the records are made by a process pool, which is started (and its first jobs submitted) on
    entering, before the caller starts any thread such as a progress bar, and shut down on exit; jobs not yet started
    are cancelled when the caller leaves early (error, KeyboardInterrupt).

    Args:
        task: the task to sample.
        seed: dataset seed.
        start: first index.
        stop: one past the last index.
        workers: number of worker processes (1 generates in this process).
        chunk_size: indices per job; the default gives each worker about 8 jobs, capped at 64 indices.
    """
    if workers <= 1:
        yield (sample_record(task, seed, i) for i in range(start, stop))
        return
    chunk = chunk_size or max(1, min(64, math.ceil((stop - start) / (workers * 8))))
    todo = iter([(a, min(a + chunk, stop)) for a in range(start, stop, chunk)])
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(task, os.getpid())
    )
    stopped = False
    try:
        # A bounded window of jobs in flight keeps memory flat for large datasets; results are taken in submission
        # (= index) order, so the output does not depend on which worker finishes first.
        pending: deque[Future] = deque(pool.submit(_work, seed, a, b) for a, b in islice(todo, 2 * workers))

        def ordered() -> Iterator[dict[str, Any]]:
            while pending:
                recs = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_work, seed, *nxt))
                yield from recs

        yield ordered()
    except BaseException:
        # Ctrl-C or an error: the running jobs' results are not wanted, so the workers are stopped now rather than
        # after their current chunk (seconds with large images).
        stopped = True
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=not stopped, cancel_futures=True)


def _process_start(pid: int) -> str | None:
    """An id of process ``pid``'s start (its start time in clock ticks, Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _claim(work: Path) -> None:
    """Record this process as the owner of the build folder ``work``."""
    pid = os.getpid()
    owner = {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}
    (work / OWNER_NAME).write_text(json.dumps(owner) + "\n")


def _owner_dead(work: Path) -> bool:
    """Whether the build folder ``work`` belongs to a process of this host that no longer runs. A folder without a
    readable owner, or of another host (a shared file system), is never called dead."""
    try:
        owner = json.loads((work / OWNER_NAME).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if owner.get("host") != socket.gethostname():
        return False
    if not _pid_alive(pid):
        return True
    start = _process_start(pid)
    return start is not None and owner.get("start") is not None and start != owner["start"]  # pid reused


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the ``.NAME.partial-*`` build folders of ``out`` whose owner is dead (a run killed by SIGKILL or a
    power cut); returns the folders removed."""
    removed = []
    for work in out.parent.glob(f".{out.name}.partial-*"):
        if work.is_dir() and not work.is_symlink() and _owner_dead(work):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def _looks_like_dataset(path: Path) -> bool:
    return path.is_dir() and (
        not any(path.iterdir()) or (path / MANIFEST_NAME).exists() or (path / "dataset_dict.json").exists()
    )


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise DatasetWriteError(f"output {str(out)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.is_symlink() or not out.is_dir():
        raise DatasetWriteError(f"output {str(out)!r} exists and is not a directory; refusing to replace it")
    if not _looks_like_dataset(out):
        raise DatasetWriteError(
            f"output {str(out)!r} is a non-empty directory that is not a dataset (no {MANIFEST_NAME} or "
            "dataset_dict.json); refusing to replace it"
        )


def generate_dataset(
    task: Task,
    num: int,
    seed: int,
    out: str | os.PathLike,
    workers: int = 1,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    overwrite: bool = False,
    progress: bool = True,
) -> datasets.DatasetDict:
    """Generate ``num`` samples of ``task`` with ``seed`` and save them as a DatasetDict at ``out``.

    Args:
        task: a constructed (validated) task.
        num: number of samples, at least 3 (one per split).
        seed: non-negative dataset seed.
        out: output directory; must not exist unless ``overwrite``.
        workers: worker processes; the output does not depend on it.
        splits: train/validation/test fractions (positive, summing to 1).
        overwrite: replace an existing dataset at ``out`` once the new one is complete.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The saved dataset, loaded back from ``out``.

    Raises:
        DatasetWriteError: bad num/seed/workers/splits or output path.
        GenerationError: the task could not draw a sample (the message names the sample index).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DatasetWriteError(f"num must be a positive integer, got {num!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetWriteError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DatasetWriteError(f"workers must be a positive integer, got {workers!r}")
    sizes = split_sizes(num, splits)
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    if not out.parent.is_dir():
        raise DatasetWriteError(f"parent directory of output {str(out)!r} does not exist")

    check_disk_space(task, seed, num, out)

    ranges: dict[str, tuple[int, int]] = {}
    start = 0
    for name, n in sizes.items():
        ranges[name] = (start, start + n)
        start += n

    try:
        remove_stale_partials(out)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise _write_error(out, e) from None
    previous_sigterm = _raise_on_sigterm()
    try:
        _claim(work)
        scratch = work / "scratch"
        scratch.mkdir()
        parts: dict[str, datasets.Dataset] = {}
        # Enter the record stream (which starts the worker pool) before the progress bar starts its thread.
        with (
            record_stream(task, seed, 0, num, workers=workers) as records,
            tqdm(total=num, desc=task.name, unit="sample", disable=not progress, dynamic_ncols=True) as bar,
        ):
            for name, (a, b) in ranges.items():
                path = scratch / f"{name}.arrow"
                writer = ArrowWriter(features=FEATURES, path=str(path))
                try:
                    for rec in islice(records, b - a):
                        writer.write(rec)
                        bar.update(1)
                    writer.finalize()
                finally:
                    writer.close()
                parts[name] = datasets.Dataset.from_file(str(path), split=name)
        staged = work / "dataset"
        # Our own bar already showed progress; the library's per-split "Saving the dataset" bars are noise.
        bars_were_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            datasets.DatasetDict(parts).save_to_disk(str(staged))
        finally:
            if not bars_were_disabled:
                datasets.enable_progress_bars()
        manifest = {
            "task": task.name,
            "seed": seed,
            "num": num,
            "splits": {name: list(r) for name, r in ranges.items()},
            "config": asdict(task.config),
            "generator_version": str(getattr(task, "version", "1")),
            "klal_version": klal.__version__,
            "format_version": FORMAT_VERSION,
        }
        (staged / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        del parts  # the memory-mapped scratch files are deleted with ``work``

        # Re-check: another process may have created ``out`` meanwhile.
        _check_out(out, overwrite)
        if out.exists():
            old = work / "previous"
            os.replace(out, old)
            try:
                os.replace(staged, out)
            except BaseException:
                os.replace(old, out)
                raise
        else:
            os.replace(staged, out)
    except OSError as e:
        raise _write_error(out, e) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return datasets.load_from_disk(str(out))


ESTIMATE_SAMPLES = 4
"""Samples drawn to estimate the dataset's size before it is written (:func:`check_disk_space`)."""
BUILD_COPIES = 2
"""Copies of the data on disk at once while a dataset is built: the scratch Arrow files and the staged dataset."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during :func:`generate_dataset`: it stops like Ctrl-C (the build folder is removed, workers stop), with
    exit status 143 (128 + SIGTERM, :func:`klal.cli.user_errors`)."""

    exit_status = 143


def _raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` (the default action kills the process before any clean-up); returns
    the previous handler to restore, or None off the main thread (where signals cannot be caught)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def check_disk_space(task: Task, seed: int, num: int, out: Path) -> None:
    """Refuse ``num`` samples that would not fit on the disk of ``out``.

    The size of a sample is measured on the first :data:`ESTIMATE_SAMPLES` samples (their PNG bytes and text); the
    build needs :data:`BUILD_COPIES` copies at once.

    Raises:
        DatasetWriteError: the estimate exceeds the free space, naming the folder, the sizes and ``--num``.
    """
    k = min(num, ESTIMATE_SAMPLES)
    recs = [sample_record(task, seed, i) for i in range(k)]
    per_sample = sum(len(r["image"]["bytes"]) + len(json.dumps({**r, "image": None})) for r in recs) / k
    need = per_sample * num * BUILD_COPIES
    folder = next((p for p in (out.parent, *out.parent.parents) if p.exists()), out.parent)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write will name what is wrong with the folder
    if need > free:
        raise DatasetWriteError(
            f"--num {num}: {task.name} samples take about {_size(per_sample)} each, so building {out} needs about "
            f"{_size(need)} of disk space ({BUILD_COPIES} copies while it is built) but {folder} has {_size(free)} "
            "free; lower --num or write elsewhere"
        )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def parent_folders(out: str | os.PathLike) -> Iterator[None]:
    """Create the missing folders above ``out`` (``--out data/grid_patch`` in a fresh checkout, where ``data/`` does
    not exist yet) for the block, and remove the ones it created again if the block fails, so a failed command leaves
    no empty folders behind.

    Raises:
        DatasetWriteError: a folder cannot be created (naming it).
    """
    parent = Path(out).expanduser().absolute().parent
    top = parent
    while not top.parent.exists():
        top = top.parent
    created = not parent.exists()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = e.strerror or str(e)
        raise DatasetWriteError(f"cannot create the folder {str(parent)!r} for {str(out)!r}: {what}") from None
    try:
        yield
    except BaseException:
        if created:
            folder = parent
            while True:  # only empty folders, and only the ones made here
                with suppress(OSError):
                    folder.rmdir()
                if folder == top:
                    break
                folder = folder.parent
        raise


def _write_error(out: Path, e: OSError) -> DatasetWriteError:
    """A full disk, a read-only or virtual file system, missing permissions: one line naming ``out``."""
    what = e.strerror or str(e)
    at = f" ({e.filename})" if e.filename and os.path.dirname(str(e.filename)) != str(out.parent) else ""
    return DatasetWriteError(
        f"cannot write the dataset {str(out)!r} in {str(out.parent)!r}: {what}{at}; nothing was written"
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The ``klal_dataset.json`` of a generated dataset directory.

    Raises:
        DatasetWriteError: the file is missing or not valid JSON.
    """
    f = Path(path) / MANIFEST_NAME
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise DatasetWriteError(f"{str(f)!r} not found: {str(path)!r} is not a generated klal dataset") from None
    except json.JSONDecodeError as e:
        raise DatasetWriteError(f"{str(f)!r} is not valid JSON: {e}") from None


def generate_for_klal(settings: Any) -> None:
    """Write the dataset a ``KLALDataModule``'s ``data.generate`` asks for (klal finds this function through the
    ``klal.generators`` entry point, so the library never imports ``data_gen``).

    Nodes that share a file system may generate the same folder at the same time. The writer renames a complete
    dataset into place, and the same settings give the same dataset, so a process that loses the race uses the
    winner's copy instead of failing.

    Args:
        settings: a :class:`klal.datamodule.GenerateSettings` (task, num, seed, image_size, preset, out, workers).
    """
    from data_gen.tasks import build_task

    os.makedirs(os.path.dirname(os.path.abspath(settings.out)), exist_ok=True)
    task = build_task(settings.task, preset=settings.preset, overrides={"image_size": settings.image_size})
    try:
        generate_dataset(task, num=settings.num, seed=settings.seed, out=settings.out, workers=settings.workers)
    except (DatasetWriteError, OSError):
        # Another process finished the same dataset first (its manifest is written before the rename).
        if not os.path.isfile(os.path.join(settings.out, MANIFEST_NAME)):
            raise
