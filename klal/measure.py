"""Measure a KLAL module on a data loader: loss parts, target attention mass, answer-token accuracy, and the
captured attention maps themselves (for pictures)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from klal.data.collate import IGNORE_INDEX


@torch.no_grad()
def measure(module: Any, loader: Any, max_batches: int | None = None, desc: str = "measure") -> dict[str, float]:
    """Sample-weighted means of ``ntp``, ``klal``, ``target_mass`` and teacher-forced answer-token accuracy.

    Args:
        module: a configured :class:`klal.module.KLALModule`.
        loader: an iterable of collated batches.
        max_batches: stop after this many batches.
        desc: progress-bar label.
    """
    was_training = module.training
    module.eval()
    device = next(module.model.parameters()).device
    sums: dict[str, float] = {"ntp": 0.0, "klal": 0.0, "target_mass": 0.0, "token_acc": 0.0}
    n = n_map = 0
    try:
        for i, batch in enumerate(tqdm(loader, desc=desc, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out, request = module(batch, capture=True)
            res = module.klal_result(request, batch)
            b = batch["input_ids"].shape[0]
            m = res.num_with_map
            sums["ntp"] += float(out.loss) * b
            sums["klal"] += float(res.klal) * m
            sums["target_mass"] += float(res.target_mass) * m
            sums["token_acc"] += _token_accuracy(out.logits, batch["labels"]) * b
            n += b
            n_map += m
    finally:
        module.train(was_training)
    return {
        "ntp": sums["ntp"] / max(n, 1),
        "klal": sums["klal"] / max(n_map, 1),
        "target_mass": sums["target_mass"] / max(n_map, 1),
        "token_acc": sums["token_acc"] / max(n, 1),
        "samples": float(n),
        "samples_with_map": float(n_map),
    }


def _token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of supervised tokens whose teacher-forced argmax is right (mean over the batch's samples)."""
    pred = logits[:, :-1].argmax(-1)
    lab = labels[:, 1:]
    mask = lab != IGNORE_INDEX
    per = ((pred == lab) & mask).sum(-1).float() / mask.sum(-1).clamp_min(1)
    return float(per.mean())


@torch.no_grad()
def attention_grids(module: Any, batch: dict[str, Any], layers_mean: bool = True) -> list[list[np.ndarray]]:
    """Captured attention of the module's query tokens, per sample and image, reshaped to each image's token grid.

    Returns:
        ``maps[b][j]``: ``(gh, gw)`` attention of sample ``b`` over image ``j`` (mean over supervised layers and
        selected queries; the whole sample's attention sums to 1 over all its images).
    """
    was_training = module.training
    module.eval()
    device = next(module.model.parameters()).device
    try:
        batch_d = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        _, request = module(batch_d, capture=True)
        q = request.stacked().exp()  # (L, B, A, V)
        qv = request.query_valid.to(q.dtype)  # (B, A)
        q = (q * qv[None, :, :, None]).sum(2) / qv.sum(-1).clamp_min(1)[None, :, None]  # (L, B, V)
        q = q.mean(0).cpu().numpy() if layers_mean else q[-1].cpu().numpy()
        request.clear()
    finally:
        module.train(was_training)
    out: list[list[np.ndarray]] = []
    for b, grids in enumerate(batch["grids"]):
        off, maps = 0, []
        for gh, gw in grids:
            maps.append(q[b, off : off + gh * gw].reshape(gh, gw))
            off += gh * gw
        out.append(maps)
    return out
