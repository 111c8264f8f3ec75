"""Checkpoints that survive crashes and load safely: atomic writes, weights-only loading, compatibility checks, RNG.

- :class:`AtomicCheckpointIO` (installed by ``train.py``) writes each checkpoint to a temporary file in the target's
  folder, fsyncs it and renames it over the target, so ``last.ckpt`` is always either the previous complete checkpoint
  or the new one, never a torn file. Before the rename it checks that the file loads with ``weights_only=True``;
  loading always uses ``weights_only=True``, admitting only klal's own config dataclasses besides tensors and plain
  containers (:func:`safe_load`).
- :func:`base_fingerprint` / :func:`lora_fingerprint` describe what a checkpoint's LoRA weights belong to;
  :func:`check_compatible` refuses a checkpoint of another base model or LoRA configuration, naming both.
- :func:`gather_rng_states` / :func:`restore_rng_states` carry the torch, CUDA, numpy and Python RNG states of every
  rank through a checkpoint (Lightning does not), so dropout after a resume draws what it would have drawn.
- :func:`resolve_ckpt_path` makes ``--ckpt_path last`` find the newest ``last*.ckpt`` of earlier runs (Lightning's
  own ``last`` only looks in the new run's folder, which a fresh logger version makes empty).
- :func:`atomic_save_dir` / :func:`save_adapter` write the peft adapter folder the same all-or-nothing way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from klal.models.lora import resolve_targets

__all__ = [
    "ADAPTER_INFO",
    "ARCH_KEYS",
    "AtomicCheckpointIO",
    "UnsafeCheckpointError",
    "atomic_save_dir",
    "atomic_torch_save",
    "base_fingerprint",
    "capture_rng_state",
    "check_compatible",
    "check_trainable_keys",
    "find_last_checkpoint",
    "gather_rng_states",
    "lora_fingerprint",
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
ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
ADAPTER_INFO = "klal_adapter.json"
"""File written next to the peft adapter: the backbone and LoRA settings it was trained with."""
_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


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


def atomic_torch_save(obj: Any, path: str | os.PathLike, check_weights_only: bool = True) -> None:
    """``torch.save`` to ``path`` so that ``path`` is never a partial file.

    Writes ``.<name>.<random>.tmp`` in the same folder, fsyncs it, optionally checks it would load with
    ``weights_only=True``, and renames it over ``path``. On any failure the temporary file is removed and ``path``
    keeps its previous content.

    Raises:
        UnsafeCheckpointError: ``check_weights_only`` and ``obj`` holds objects weights-only loading refuses.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        if check_weights_only:
            _allowed_globals(tmp, shown=path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(parent)


def atomic_save_dir(write: Callable[[str], None], path: str | os.PathLike) -> None:
    """Fill a folder with ``write(tmp_dir)`` and move it to ``path`` only when ``write`` succeeded.

    An existing ``path`` is swapped out by two renames and then deleted; a crash between the renames leaves the old
    folder as ``.<name>.<random>.tmp.old`` next to it.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(path)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if os.path.isdir(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


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
    with safe_globals(_allowed_globals(path)):
        return torch.load(path, map_location=map_location, weights_only=True)


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
def base_fingerprint(backbone: Any, text_config: Any) -> dict[str, Any]:
    """The base model a LoRA checkpoint applies to: its name (plus seed/sizes for ``tiny``) and text architecture.

    Args:
        backbone: the :class:`~klal.models.loader.ModelConfig` of the run.
        text_config: the loaded model's language config.
    """
    fp: dict[str, Any] = {"name_or_path": str(backbone.name_or_path)}
    if backbone.name_or_path == "tiny":
        fp["tiny_seed"] = int(backbone.tiny_seed)
        fp["tiny_overrides"] = {str(k): v for k, v in sorted((backbone.tiny_overrides or {}).items())}
    fp["architecture"] = {k: getattr(text_config, k, None) for k in ARCH_KEYS}
    return fp


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


def _same_model_name(a: str, b: str) -> bool:
    # A hub id and a local copy of it (".../Qwen2.5-VL-3B-Instruct") name the same model; the architecture check
    # below still has to pass.
    if a == b:
        return True
    tail = lambda s: os.path.basename(os.path.normpath(s))  # noqa: E731
    return "tiny" not in (a, b) and tail(a) == tail(b)


def _describe(fp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fp.items())


def check_compatible(
    checkpoint: dict[str, Any], base: dict[str, Any], lora: dict[str, Any], source: str = "checkpoint"
) -> None:
    """Refuse a checkpoint whose weights belong to another base model or another LoRA configuration.

    Checkpoints without fingerprints (written before klal stored them) are checked by base-model name only.

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
    if saved_name is not None and not _same_model_name(str(saved_name), base["name_or_path"]):
        raise ValueError(
            f"{source} was trained on base model {saved_name!r}, but this run uses {base['name_or_path']!r}"
        )
    if saved_base is not None:
        diff = [k for k in base if k != "name_or_path" and saved_base.get(k) != base[k]]
        if diff:
            raise ValueError(
                f"{source} was trained on another base model ({', '.join(diff)} differ): checkpoint "
                f"[{_describe(saved_base)}], this run [{_describe(base)}]"
            )
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


def _search_roots(trainer: Any) -> list[str]:
    roots: list[str] = []
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(cb, "dirpath", None):
            roots.append(str(cb.dirpath))
    for logger in getattr(trainer, "loggers", []):
        with contextlib.suppress(Exception):  # loggers without a local folder raise or return None
            if logger.root_dir:
                roots.append(str(logger.root_dir))
    roots.append(str(trainer.default_root_dir))
    return [r for r in roots if _is_local(r)]


def resolve_ckpt_path(ckpt_path: str | None, trainer: Any) -> str | None:
    """``ckpt_path``, except that ``last`` becomes the newest ``last*.ckpt`` under the trainer's checkpoint folders,
    logger folders and ``default_root_dir`` (``last`` is kept when there is none: Lightning then warns and starts
    fresh)."""
    if ckpt_path != "last":
        return ckpt_path
    return find_last_checkpoint(_search_roots(trainer)) or ckpt_path


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
        if state_dict is not None:
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        with open(os.path.join(tmp, ADAPTER_INFO), "w") as f:
            json.dump(info, f, indent=2, default=list)

    atomic_save_dir(write, path)


def read_adapter_info(path: str) -> dict[str, Any] | None:
    """:data:`ADAPTER_INFO` of an adapter folder, or None when it has none (an adapter from elsewhere)."""
    file = os.path.join(path, ADAPTER_INFO)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)
