"""Checkpoints that survive crashes and load safely: atomic writes, weights-only loading, compatibility checks, RNG.

- :class:`AtomicCheckpointIO` (installed by ``train.py``) writes each checkpoint to a temporary file in the target's
  folder, fsyncs it and renames it over the target, so ``last.ckpt`` is always either the previous complete checkpoint
  or the new one, never a torn file. Before the rename it checks that the file loads with ``weights_only=True``;
  loading always uses ``weights_only=True``, admitting only klal's own config dataclasses besides tensors and plain
  containers (:func:`safe_load`).
- :func:`base_fingerprint` / :func:`lora_fingerprint` describe what a checkpoint's LoRA weights belong to (the base
  model by content, :mod:`klal.models.identity`); :func:`check_compatible` refuses a checkpoint of another base model
  or LoRA configuration and :func:`check_adapter_base` an adapter of another base model, naming both sides.
- :func:`gather_rng_states` / :func:`restore_rng_states` carry the torch, CUDA, numpy and Python RNG states of every
  rank through a checkpoint (Lightning does not), so dropout after a resume draws what it would have drawn.
- Resuming: :func:`resolve_ckpt_path` makes ``--ckpt_path last`` the newest ``last*.ckpt`` of the run's own logger
  version (and points the logger at that version), :func:`continue_csv_metrics` keeps its ``metrics.csv``, and
  :func:`check_resume_hparams` refuses a command line that differs from the checkpoint's settings.
- :func:`atomic_save_dir` / :func:`save_adapter` write the peft adapter folder the same all-or-nothing way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import importlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from klal.models.family import TINY_ALIASES
from klal.models.identity import TEXT_KEYS, base_identity, check_same_base, same_name
from klal.models.lora import resolve_targets

__all__ = [
    "ADAPTER_INFO",
    "ARCH_KEYS",
    "AtomicCheckpointIO",
    "UnsafeCheckpointError",
    "atomic_output_dir",
    "atomic_save_dir",
    "atomic_torch_save",
    "base_fingerprint",
    "capture_rng_state",
    "check_adapter_base",
    "check_ckpt_path",
    "check_writable",
    "check_compatible",
    "changed_hparams",
    "check_resume_hparams",
    "check_trainable_keys",
    "checkpoint_state",
    "continue_csv_metrics",
    "flush_csv_metrics",
    "find_last_checkpoint",
    "gather_rng_states",
    "lora_fingerprint",
    "naming_path",
    "read_adapter_info",
    "resolve_ckpt_path",
    "restore_rng_state",
    "restore_rng_states",
    "safe_load",
    "save_adapter",
    "use_atomic_checkpoint_io",
]

# Modules whose dataclasses may be rebuilt by weights-only loading (configs stored as hyperparameters).
SAFE_MODULE_PREFIXES = ("klal.", "data_gen.")
# Text-backbone config fields that must agree for LoRA weights to mean the same thing.
ARCH_KEYS = TEXT_KEYS
ADAPTER_INFO = "klal_adapter.json"
"""File written next to the peft adapter: the backbone and LoRA settings it was trained with."""
_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated by a full disk or an interrupted copy); names the file."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects that weights-only loading does not rebuild."""


# -- atomic writes ---------------------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; some filesystems do not allow opening a directory, which is not an error here.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _remove_stale_temps(path: str) -> None:
    """Delete temporary files a killed writer of ``path`` left behind (one writer per path at a time)."""
    parent = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(_temp_prefix(path)) + "*.tmp")):
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
    _remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
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
            _allowed_globals(tmp, shown=path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        named = naming_path(writes.error if writes is not None and writes.error is not None else e, path)
        if named is not None and not isinstance(e, UnsafeCheckpointError):
            raise named from None
        raise
    _fsync_dir(parent)


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
    _fsync_dir(os.path.dirname(path))


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
    _fsync_dir(path)


@contextlib.contextmanager
def _staging(write: Callable[[str], None], path: str) -> Iterator[str]:
    """A temporary folder next to ``path``, filled by ``write`` and fsynced, for the block to move into place.

    On any failure (in ``write`` or in the block) the folder is removed, and a file-system error is raised as one that
    names ``path`` (:func:`naming_path`).
    """
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_temps(path)
        tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
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


# -- weights-only loading --------------------------------------------------------------------------------------------
def _resolve_safe_global(name: str) -> type | None:
    """The class ``name`` (``module.Qualname``) if it is a dataclass of a klal module, else None (nothing imported)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        if not (module_name + ".").startswith(SAFE_MODULE_PREFIXES):
            return None
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj if isinstance(obj, type) and dataclasses.is_dataclass(obj) else None
    return None


def _allowed_globals(path: str, shown: str | None = None) -> list[type]:
    """The classes beyond torch's weights-only allowlist that ``path`` needs, all klal config dataclasses.

    Raises:
        UnsafeCheckpointError: it needs anything else.
    """
    names = get_unsafe_globals_in_checkpoint(path)
    resolved = {n: _resolve_safe_global(n) for n in names}
    refused = sorted(n for n, cls in resolved.items() if cls is None)
    if refused:
        raise UnsafeCheckpointError(
            f"checkpoint {shown or path} holds objects that weights_only loading refuses: {refused}. klal checkpoints "
            "may hold tensors, plain Python values/containers and klal config dataclasses only"
        )
    return [cls for cls in resolved.values() if cls is not None]


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, admitting klal's config dataclasses (nothing else is unpickled).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file holds other Python objects (e.g. a full pickled model).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with safe_globals(_allowed_globals(path)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        # torch's reader says "failed finding central directory" (a cut zip) or "unexpected EOF" here.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(
            f"checkpoint {path} cannot be read ({detail.split('. ')[0]}): the file is truncated or damaged, e.g. by "
            "a full disk or an interrupted copy; resume from another checkpoint or start the run afresh"
        ) from None


def _is_local(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def _local(path: str | os.PathLike) -> str:
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
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, _local(path))

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            # An explicit request (e.g. ``trainer.fit(..., weights_only=False)``) for a trusted file of another origin.
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_load(_local(path), map_location=map_location)


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with a non-default CheckpointIO."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# -- what a checkpoint belongs to ------------------------------------------------------------------------------------
def base_fingerprint(backbone: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The base model a LoRA checkpoint applies to, by content (:func:`klal.models.identity.base_identity`): its
    name (plus seed and sizes for ``tiny``), architecture and a sample of weights that training leaves unchanged.

    Args:
        backbone: the :class:`~klal.models.loader.ModelConfig` of the run.
        model: the loaded base model (bare or peft-wrapped), its weights not yet sharded.
    """
    tiny = None
    if backbone.is_tiny:
        overrides = {str(k): v for k, v in sorted((backbone.tiny_overrides or {}).items())}
        tiny = {"tiny_seed": int(backbone.tiny_seed), "tiny_overrides": overrides}
    return base_identity(model, str(backbone.name_or_path), tiny)


def lora_fingerprint(lora: Any, num_layers: int) -> dict[str, Any]:
    """The LoRA configuration that decides what the trainable weights are: rank, alpha, wrapped projections and layers
    (resolved, so ``layers=None`` and an explicit list of every layer agree). Dropout is not part of it.

    Args:
        lora: the :class:`~klal.models.lora.LoraSettings` of the run.
        num_layers: the language model's layer count.
    """
    every = lora.layers is None
    layers = list(range(num_layers)) if every else sorted({int(i) % num_layers for i in lora.layers})
    return {
        "r": int(lora.r),
        "alpha": lora.alpha,
        "targets": list(resolve_targets(lora.targets)),
        "layers": layers,
    }


def _describe(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fp.items())


def check_compatible(
    checkpoint: dict[str, Any], base: dict[str, Any], lora: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Refuse a checkpoint whose weights belong to another base model or another LoRA configuration.

    The base model is compared by content (:func:`klal.models.identity.identity_mismatch`), so any path to the same
    model is accepted. Checkpoints without fingerprints (written before klal stored them) are checked by base-model
    name only.

    Args:
        checkpoint: the loaded checkpoint dict (``klal_base_model``, ``klal_fingerprint``).
        base: :func:`base_fingerprint` of this run.
        lora: :func:`lora_fingerprint` of this run.
        source: how to name the checkpoint in messages (its path).

    Raises:
        ValueError: naming what the checkpoint was trained with and what this run uses.
    """
    saved_name = checkpoint.get("klal_base_model")
    fp = checkpoint.get("klal_fingerprint") or {}
    saved_base = fp.get("base")
    here_name = str(base["name_or_path"])
    named_other = saved_name is not None and (
        saved_base is None or (str(saved_name) in TINY_ALIASES) != (here_name in TINY_ALIASES)
    )
    if named_other and not same_name(str(saved_name), here_name):
        raise ValueError(f"{source} was trained on base model {saved_name!r}, but this run uses {here_name!r}")
    if saved_base is not None:
        check_same_base(saved_base, base, source)
    saved_lora = fp.get("lora")
    if saved_lora is not None:
        diff = [k for k in lora if saved_lora.get(k) != lora[k]]
        if diff:
            detail = ", ".join(f"{k} {saved_lora.get(k)} vs {lora[k]}" for k in diff)
            raise ValueError(
                f"{source} was trained with another LoRA config ({detail}; checkpoint vs this run): checkpoint "
                f"[{_describe(saved_lora)}], this run [{_describe(lora)}]"
            )


def check_trainable_keys(
    state_dict: dict[str, Any], expected: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Refuse a checkpoint state dict that does not hold exactly this run's trainable weights, with their shapes.

    Lightning loads klal checkpoints non-strictly (they lack the frozen base), so without this a mismatch would load
    nothing and continue silently.

    Raises:
        ValueError: missing, unexpected or differently shaped weights (a few names are listed).
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} trainable weights missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights this run does not train (e.g. {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} weights with other shapes (e.g. {k}: {tuple(state_dict[k].shape)} vs "
            f"{tuple(expected[k].shape)})"
        )
    if problems:
        raise ValueError(f"{source} does not match this run's LoRA weights: " + "; ".join(problems))


# -- RNG -------------------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, in a weights-only-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNGs from :func:`capture_rng_state`'s output."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by global rank (a collective under an initialised process group with several
    ranks: call it on all ranks, as Lightning does with checkpoint hooks)."""
    local = capture_rng_state()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, local)
        return out
    return [local]


def restore_rng_states(states: list[dict[str, Any]], rank: int) -> None:
    """Restore this rank's entry of :func:`gather_rng_states`'s output.

    With another world size than the checkpoint's, ranks beyond the saved ones take rank 0's state (a warning says
    the continuation is not bit-identical then).
    """
    if not states:
        return
    if rank >= len(states):
        warnings.warn(
            f"checkpoint holds RNG states of {len(states)} ranks; rank {rank} continues from rank 0's", stacklevel=2
        )
        rank = 0
    restore_rng_state(states[rank])


# -- finding the last checkpoint -------------------------------------------------------------------------------------
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
        return [d for d in explicit if _is_local(d)], None
    logger = getattr(trainer, "logger", None)
    root = None
    with contextlib.suppress(Exception):  # loggers without a local folder raise or return None
        root = logger.root_dir if logger is not None else None
    if root and _is_local(root) and hasattr(logger, "_version"):
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
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or not _is_local(ckpt_path):
        return ckpt_path
    path = _local(ckpt_path)
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


def checkpoint_state(path: str) -> dict[str, Any] | None:
    """The checkpoint dict at ``path`` (weights-only loading): a file, or the client state of a DeepSpeed checkpoint
    folder (its ``*model_states.pt``); None when a folder holds none that loads weights-only."""
    if os.path.isfile(path):
        return safe_load(path)
    for state in sorted(glob.glob(os.path.join(glob.escape(path), "**", "*model_states.pt"), recursive=True)):
        with contextlib.suppress(UnsafeCheckpointError):
            return safe_load(state)
    return None


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
        if not isinstance(logger, CSVLogger) or not _is_local(logger.log_dir):
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


RUN_HPARAMS = ("lora", "klal_weight", "klal_query", "klal_layers", "klal_epsilon", "klal_image_mode", "optim")
"""Module hyperparameters that change what a resumed run computes (refused when changed, unless allowed)."""
MODEL_OPTIONS = ("backbone",)
"""Module hyperparameters that choose the model (refused when they differ from the checkpoint's)."""
DATA_KEEP_FREE = ("num_workers", "pin_memory", "eval_batch_size", "max_val_samples", "val_split", "test_split")
"""Data options a resumed run may change: they do not change the training batches."""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=lambda o: _plain(o) if dataclasses.is_dataclass(o) else str(o)))


def changed_hparams(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> dict[str, tuple]:
    """``{key: (saved, current)}`` for each of ``keys`` whose value differs (dataclasses compared as dicts)."""
    out = {}
    for key in keys:
        a, b = _plain(saved.get(key)), _plain(current.get(key))
        if a != b:
            out[key] = (a, b)
    return out


def check_resume_hparams(checkpoint: dict[str, Any], module: Any, datamodule: Any, source: str, allow: bool) -> None:
    """Refuse resuming ``source`` with settings other than the checkpoint's, naming each difference.

    Model options (:data:`MODEL_OPTIONS`) must always agree: Lightning's CLI used to replace them silently with the
    checkpoint's. Run hyperparameters (:data:`RUN_HPARAMS`) and the data options (all but :data:`DATA_KEEP_FREE`)
    may change only with ``allow`` (``--allow_changed_hparams``), e.g. a deliberate second stage at another learning
    rate. Checkpoints without saved hyperparameters are not checked.

    Raises:
        ValueError: ``"resuming <source>: <key> <saved> in the checkpoint vs <current> now; ..."``.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    current = dict(getattr(module, "hparams", {}) or {})
    # The attention kernel is a machine's choice (flash-attn falls back to sdpa); it does not change the model.
    saved_model = {k: {**_plain(v), "attn_implementation": None} for k, v in saved.items() if k in MODEL_OPTIONS}
    model_now = {k: {**_plain(v), "attn_implementation": None} for k, v in current.items() if k in MODEL_OPTIONS}
    problems = changed_hparams(saved_model, model_now, list(saved_model))
    if not allow:
        problems.update(changed_hparams(saved, current, [k for k in RUN_HPARAMS if k in saved]))
        saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
        data_now = dict(getattr(datamodule, "hparams", {}) or {}) if datamodule is not None else {}
        if saved_data and data_now:
            keys = [k for k in saved_data.keys() | data_now.keys() if k not in DATA_KEEP_FREE]
            problems.update({f"data.{k}": v for k, v in changed_hparams(saved_data, data_now, sorted(keys)).items()})
    if problems:
        detail = "; ".join(f"{k} {a} in the checkpoint vs {b} now" for k, (a, b) in problems.items())
        only_model = set(problems) <= set(MODEL_OPTIONS)
        hint = "" if only_model else " (--allow_changed_hparams true to resume anyway)"
        raise ValueError(f"resuming {source} with other settings than it was trained with: {detail}{hint}")


# -- the exported adapter --------------------------------------------------------------------------------------------
def _as_dict(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(obj)


def save_adapter(
    model: Any,
    path: str,
    backbone: Any,
    lora: Any,
    fingerprint: dict[str, Any] | None = None,
    processor: Any = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the peft adapter of ``model`` to ``path`` atomically, with :data:`ADAPTER_INFO` (the backbone and LoRA
    settings, so ``python -m klal.export`` rebuilds the right base) and optionally the processor.

    ``state_dict``: the model's full weights gathered from a sharded strategy (FSDP); default: the model's own."""
    info = {"backbone": _as_dict(backbone), "lora": _as_dict(lora), "fingerprint": fingerprint}

    def write(tmp: str) -> None:
        embeddings = embedding_layers_trained(model)
        if state_dict is not None:
            model.save_pretrained(tmp, state_dict=state_dict, save_embedding_layers=embeddings)
        else:
            model.save_pretrained(tmp, save_embedding_layers=embeddings)
        if processor is not None:
            processor.save_pretrained(tmp)
        with open(os.path.join(tmp, ADAPTER_INFO), "w") as f:
            json.dump(info, f, indent=2, default=list)

    atomic_save_dir(write, path)


def embedding_layers_trained(model: Any) -> bool:
    """Whether ``model`` trains an embedding matrix (``embed_tokens`` / ``lm_head``, LoRA's ``train_extra``) in full:
    peft's ``save_pretrained(save_embedding_layers=...)``.

    Passed explicitly on every save: peft's default (``"auto"``) looks the base model's ``config.json`` up on the Hub to
    see whether the vocabulary was resized (klal never resizes it), a network request on every adapter save that, for
    the tiny model or a local folder, fails with two warnings.
    """
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    return any(
        p.requires_grad and "lora_" not in name and any(f".{e}." in f".{name}" for e in EMBEDDING_LAYER_NAMES)
        for name, p in model.named_parameters()
    )


def read_adapter_info(path: str) -> dict[str, Any] | None:
    """:data:`ADAPTER_INFO` of an adapter folder, or None when it has none (an adapter from elsewhere)."""
    file = os.path.join(path, ADAPTER_INFO)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def _peft_base_name(adapter: str) -> str | None:
    file = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"adapter {adapter!r} has no adapter_config.json (is it a peft adapter folder?)")
    with open(file) as f:
        return json.load(f).get("base_model_name_or_path")


def check_adapter_base(model: Any, adapter: str, name: str, error: type[Exception] = ValueError) -> None:
    """Refuse loading ``adapter`` onto ``model`` (loaded as ``name``) when it was trained on another base model.

    The check is by content where the adapter records it (:data:`ADAPTER_INFO`, written by klal's training and
    export): architecture plus a sample of frozen weights, so the hub id, its snapshot path and a copied folder are
    all accepted. An adapter from elsewhere is checked by peft's recorded base name
    (:func:`klal.models.identity.same_name`).

    Raises:
        FileNotFoundError: not a peft adapter folder.
        error: another base model, naming both sides.
    """
    recorded = _peft_base_name(adapter)
    saved = ((read_adapter_info(adapter) or {}).get("fingerprint") or {}).get("base")
    name = str(name)
    by_name = saved is None or (str(recorded) in TINY_ALIASES) != (name in TINY_ALIASES)
    if recorded and name and by_name and not same_name(str(recorded), name):
        raise error(f"adapter {adapter!r} was trained on base model {recorded!r}, but the model given is {name!r}")
    if saved is not None:
        check_same_base(saved, base_identity(model, name), f"adapter {adapter}", error=error)
