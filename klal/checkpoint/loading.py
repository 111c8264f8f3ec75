"""Weights-only loading: :func:`safe_load` is ``torch.load(weights_only=True)`` that admits klal's own config
dataclasses besides tensors and plain containers, and names a damaged file; :func:`checkpoint_state` reads a
checkpoint file or a DeepSpeed checkpoint folder that way."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import os
from typing import Any

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

# Modules whose dataclasses may be rebuilt by weights-only loading (configs stored as hyperparameters).
SAFE_MODULE_PREFIXES = ("klal.", "data_gen.")


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated by a full disk or an interrupted copy); names the file."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects that weights-only loading does not rebuild."""


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


def allowed_globals(path: str, shown: str | None = None) -> list[type]:
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
        with safe_globals(allowed_globals(path)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        # torch's reader says "failed finding central directory" (a cut zip) or "unexpected EOF" here.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(
            f"checkpoint {path} cannot be read ({detail.split('. ')[0]}): the file is truncated or damaged, e.g. by "
            "a full disk or an interrupted copy; resume from another checkpoint or start the run afresh"
        ) from None


def checkpoint_state(path: str) -> dict[str, Any] | None:
    """The checkpoint dict at ``path`` (weights-only loading): a file, or the client state of a DeepSpeed checkpoint
    folder (its ``*model_states.pt``); None when a folder holds none that loads weights-only."""
    if os.path.isfile(path):
        return safe_load(path)
    for state in sorted(glob.glob(os.path.join(glob.escape(path), "**", "*model_states.pt"), recursive=True)):
        with contextlib.suppress(UnsafeCheckpointError):
            return safe_load(state)
    return None
