"""Loss normalisation across data-parallel ranks.

Data parallelism (DDP, FSDP, DeepSpeed) averages gradients over ranks. A rank's loss that is a mean over its own items
(answer tokens for NTP, samples with a map for KLAL) therefore weights ranks equally, not items: with 10 answer tokens
on one rank and 2 on the other, each of the 2 counts five times as much as each of the 10. :func:`global_share` gives
the factor ``world_size x local_count / global_count`` that turns a rank's local mean into its share of the mean over
the whole global batch, so after gradient averaging the update is the one a single process would compute on the same
global batch.
"""

from __future__ import annotations

import torch

__all__ = ["global_share"]


def _process_group_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def global_share(local_counts: torch.Tensor) -> torch.Tensor:
    """``world_size x local / sum_over_ranks(local)`` for each entry of ``local_counts`` (ones without a process group).

    Multiply a rank's mean over its own items by the matching entry and data-parallel gradient averaging gives the
    mean over all items of the global batch; the ranks' logged values then average to that global mean too. An entry
    whose global count is 0 gives 0. A collective: every rank must call it the same number of times.

    Args:
        local_counts: ``(K,)`` item counts of this rank (e.g. supervised tokens, samples with a map).
    """
    world = _process_group_size()
    if world == 1:
        return torch.ones_like(local_counts, dtype=torch.float32)
    local = local_counts.detach().to(torch.float32)
    total = local.clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return world * local / total.clamp_min(1.0)
