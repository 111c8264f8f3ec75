"""The RNG states of every rank through a checkpoint (Lightning does not carry them):
:func:`gather_rng_states` / :func:`restore_rng_states` save and restore the torch, CUDA, numpy and Python RNGs, so
dropout after a resume draws what it would have drawn."""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch


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
