"""Lightning's checkpoint IO, made atomic: :class:`AtomicCheckpointIO` (installed by ``train.py``,
:func:`use_atomic_checkpoint_io`) writes each checkpoint to a temporary file in the target's folder, fsyncs it, checks
that it loads with ``weights_only=True`` and renames it over the target (:func:`atomic_torch_save`), so ``last.ckpt``
is always either the previous complete checkpoint or the new one, never a torn file; it loads weights-only
(:func:`klal.checkpoint.loading.safe_load`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from klal.atomic import fsync_dir, naming_path, remove_stale_temps, temp_prefix
from klal.checkpoint.loading import UnsafeCheckpointError, allowed_globals, safe_load


class _RecordedWrites:
    """A binary file that remembers the OSError of a failed write: torch's native writer turns it into a
    ``RuntimeError`` such as ``unexpected pos 704 vs 598``, which says nothing about a full disk."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike, check_weights_only: bool = True) -> None:
    """``torch.save`` to ``path`` so that ``path`` is never a partial file.

    Writes ``.<name>.<random>.tmp`` in the same folder, fsyncs it, optionally checks it would load with
    ``weights_only=True``, and renames it over ``path``. On any failure the temporary file is removed and ``path``
    keeps its previous content.

    Raises:
        UnsafeCheckpointError: ``check_weights_only`` and ``obj`` holds objects weights-only loading refuses.
        OSError: the file cannot be written (a full disk, no permission); the message names ``path``.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise naming_path(e, parent) from None
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=parent)
    except OSError as e:
        raise naming_path(e, path) from None
    writes = None
    try:
        with os.fdopen(fd, "wb") as f:
            writes = _RecordedWrites(f)
            torch.save(obj, writes)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        if check_weights_only:
            allowed_globals(tmp, shown=path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        named = naming_path(writes.error if writes is not None and writes.error is not None else e, path)
        if named is not None and not isinstance(e, UnsafeCheckpointError):
            raise named from None
        raise
    fsync_dir(parent)


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on this machine (a plain path or a ``file://`` URL), not an fsspec URL such as ``s3://``."""
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """The plain path of a local ``path`` (``file://`` removed)."""
    text = os.fspath(path)
    return text[len("file://") :] if text.startswith("file://") else text


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic, fsynced writes of weights-only-loadable checkpoints; weights-only loading.

    Remote paths (``s3://`` and other fsspec URLs) fall back to Lightning's writer (an fsspec transaction) and are
    loaded with ``weights_only=True`` too.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, local_path(path))

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            # An explicit request (e.g. ``trainer.fit(..., weights_only=False)``) for a trusted file of another origin.
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        if not is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_load(local_path(path), map_location=map_location)


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a non-default CheckpointIO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
