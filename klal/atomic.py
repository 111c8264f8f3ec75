"""All-or-nothing outputs: a folder is written into a temporary folder next to it and moved into place only when
complete, so a crash, a full disk or Ctrl-C leaves the previous output (or nothing), never a half-written one.

Used by every writer of a finished output: the adapter and checkpoint writers (:mod:`klal.checkpoint`), ``klal
export``, ``evaluate.py``'s results, the replica snapshots and the studies. It imports nothing of klal, so any module
may use it. A file-system error is raised as one that names the output the user asked for (:func:`naming_path`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator


def fsync_dir(path: str) -> None:
    """fsync the folder ``path``, so that a rename inside it survives a crash."""
    # Makes the rename itself durable; some filesystems do not allow opening a directory, which is not an error here.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_prefix(path: str) -> str:
    """The name prefix of the temporary files and folders of ``path`` (``.<name>.``, see :func:`remove_stale_temps`)."""
    return f".{os.path.basename(path)}."


def remove_stale_temps(path: str) -> None:
    """Delete temporary files a killed writer of ``path`` left behind (one writer per path at a time)."""
    parent = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(temp_prefix(path)) + "*.tmp")):
        with contextlib.suppress(OSError):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            else:
                os.remove(stale)


def naming_path(error: BaseException, path: str) -> OSError | None:
    """``error`` as an OSError that names ``path``, or None when it is no file-system error.

    A write to an open file (``torch.save`` into a temporary file, a library writing into a temporary folder) reports
    ``[Errno 28] No space left on device`` without any path, or, from a native writer, only the OS error's text; the
    user needs to know which output did not fit. ``path`` is what the user asked for, not the temporary file.
    """
    if isinstance(error, OSError):
        if error.errno is None:
            return OSError(f"{path}: {error}")
        return type(error)(error.errno, error.strerror or str(error), path)
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return None


def atomic_save_dir(write: Callable[[str], None], path: str | os.PathLike) -> None:
    """Fill a folder with ``write(tmp_dir)`` and move it to ``path`` only when ``write`` succeeded.

    An existing ``path`` is swapped out by two renames and then deleted; a crash between the renames leaves the old
    folder as ``.<name>.<random>.tmp.old`` next to it.

    Raises:
        OSError: the folder cannot be written (a full disk, no permission); the message names ``path``, and nothing
            is left behind.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder")
    with _staging(write, path) as tmp:
        os.chmod(tmp, 0o755)
        if os.path.isdir(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def atomic_output_dir(write: Callable[[str], None], path: str | os.PathLike) -> None:
    """Fill an output folder with ``write(tmp_dir)`` so that a failure leaves nothing: the files are written into a
    temporary folder next to ``path`` and moved into place only when ``write`` succeeded.

    A missing or empty ``path`` becomes the temporary folder by one rename (:func:`atomic_save_dir`). An existing
    folder with other files in it keeps them: each written file is moved over its namesake (``os.replace``, so every
    file is whole, old or new); nothing else in the folder is touched.

    Raises:
        OSError: the output cannot be written (a full disk, no permission, ``path`` is a file); the message names
            ``path``, and nothing is left behind.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path) or not os.listdir(path):
        atomic_save_dir(write, path)
        return
    with _staging(write, path) as tmp:
        for root, _, files in os.walk(tmp):
            for name in files:
                src = os.path.join(root, name)
                dst = os.path.join(path, os.path.relpath(src, tmp))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.chmod(src, 0o644)
                os.replace(src, dst)
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(path)


@contextlib.contextmanager
def _staging(write: Callable[[str], None], path: str) -> Iterator[str]:
    """A temporary folder next to ``path``, filled by ``write`` and fsynced, for the block to move into place.

    On any failure (in ``write`` or in the block) the folder is removed, and a file-system error is raised as one that
    names ``path`` (:func:`naming_path`).
    """
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(path)
        tmp = tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=parent)
    except OSError as e:
        raise naming_path(e, path) from None
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = naming_path(e, path)
        if named is not None:
            raise named from None
        raise


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Fail at once, before a long run, when the output folder ``path`` could not be written at its end.

    Raises:
        NotADirectoryError: ``path`` is a file.
        PermissionError: the folder (or the nearest existing folder above it) is not writable.
    """
    where = os.path.abspath(os.fspath(path))
    if os.path.exists(where) and not os.path.isdir(where):
        raise NotADirectoryError(f"{option} {os.fspath(path)} is a file, not a folder")
    existing = where
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {os.fspath(path)}: cannot write into {existing}")
