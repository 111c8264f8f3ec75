"""Per-sample grounding scores: one relevance map (or box list) of one sample against its evidence.

Relevance maps are per-image grids ``(gh, gw)`` over the model family's map grid (row-major, one cell per visual
token, whatever pixels it covers: :class:`klal.geometry.Footprint`); they must be finite and non-negative, at any
scale: the scores normalise them to sum to 1 (an all-zero map reads as uniform, "no information"). Boxes are
``(x0, y0, x1, y1)`` in ORIGINAL image pixels. Evidence cells come from :func:`klal.data.targets.evidence_cells`,
target maps from :func:`klal.data.targets.build_target_map`, both laid on the map through its tokens' footprints;
:mod:`klal.eval.metrics` averages these scores over samples.

* :func:`pointing_score`: 1 when the map's peak cell is an evidence cell. Ties: when several cells share the peak
  (within a relative 1e-9), the score is the fraction of them inside the evidence, i.e. the expected hit under random
  tie-breaking; a flat map therefore scores the evidence's share of the grid (the chance level), not 1.
* :func:`evidence_mass`: share of the normalised map inside the evidence cells.
* :func:`target_kl`: ``KL(P_eps || Q_eps)`` of the target map ``P`` and the normalised map ``Q``, both smoothed like
  the training loss smooths ``P`` (:mod:`klal.loss`): ``X_eps = (1 - eps) * X + eps / V`` over the ``V`` cells.
  Smoothing ``Q`` too keeps the KL finite for maps with exact zeros (ReLU'd relevance); for a softmax attention map it
  changes the value by ``O(eps)``.
* :func:`box_iou` / :func:`best_box_iou`: IoU of the top-ranked predicted box with the best-matching gt box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from klal.data.schema import parse_box

_TIE_RTOL = 1e-9


def sample_prefix(sample_id: str | None) -> str:
    """``"sample ID: "`` to start an error message with (empty without an id)."""
    return f"sample {sample_id!r}: " if sample_id is not None else ""


def as_grid(relevance: Any, sample_id: str | None = None) -> np.ndarray:
    """A relevance map as a float64 numpy ``(gh, gw)`` array (tensors of any dtype/device accepted).

    Raises:
        ValueError: not 2-D, empty, non-finite or negative values (clip relevance at 0 before scoring).
    """
    if isinstance(relevance, torch.Tensor):
        # bfloat16 has no numpy dtype: go through float64 on the CPU.
        arr = relevance.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(relevance, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        where = sample_prefix(sample_id)
        raise ValueError(f"{where}a relevance map must be a non-empty 2-D (gh, gw) grid, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{sample_prefix(sample_id)}relevance map contains NaN or inf")
    if arr.min() < 0:
        raise ValueError(f"{sample_prefix(sample_id)}relevance map has negative values (min {arr.min()}); clip it at 0")
    return arr


def normalize_map(relevance: Any, sample_id: str | None = None) -> np.ndarray:
    """The map as a distribution over its cells (sums to 1); an all-zero map becomes uniform."""
    arr = as_grid(relevance, sample_id)
    total = arr.sum()
    if not total > 0:
        return np.full(arr.shape, 1.0 / arr.size)
    return arr / total


def _check_cells(grid: np.ndarray, cells: Any, sample_id: str | None) -> np.ndarray:
    mask = np.asarray(cells, dtype=bool)
    if mask.shape != grid.shape:
        raise ValueError(
            f"{sample_prefix(sample_id)}evidence cells {mask.shape} do not match the relevance map's grid {grid.shape} "
            "(were they laid on the grid of image 0?)"
        )
    return mask


def pointing_score(relevance: Any, cells: Any, sample_id: str | None = None) -> float:
    """Pointing-game score of one map: fraction of its peak cells (ties within a relative 1e-9) inside ``cells``.

    Args:
        relevance: ``(gh, gw)`` non-negative map.
        cells: ``(gh, gw)`` bool evidence cells.
        sample_id: named in error messages.
    """
    p = normalize_map(relevance, sample_id)
    mask = _check_cells(p, cells, sample_id)
    peak = p >= p.max() * (1.0 - _TIE_RTOL)
    return float((peak & mask).sum() / peak.sum())


def evidence_mass(relevance: Any, cells: Any, sample_id: str | None = None) -> float:
    """Share of the normalised map inside ``cells`` (bool ``(gh, gw)``)."""
    p = normalize_map(relevance, sample_id)
    mask = _check_cells(p, cells, sample_id)
    return float(p[mask].sum())


def target_kl(relevance: Any, target: Any, epsilon: float = 1e-4, sample_id: str | None = None) -> float:
    """``KL(P_eps || Q_eps)`` of a map ``Q`` against a target distribution ``P`` on the same grid.

    ``X_eps = (1 - epsilon) * X + epsilon / V`` for both, ``V`` the number of cells; natural log (nats).

    Args:
        relevance: ``(gh, gw)`` non-negative map (normalised here).
        target: ``(gh, gw)`` target distribution (normalised here too, so any positive scale works).
        epsilon: smoothing weight in ``(0, 1)``; it keeps the KL finite (at most ``log(V / epsilon)``).
        sample_id: named in error messages.
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"target_kl epsilon must be in (0, 1), got {epsilon}")
    q = normalize_map(relevance, sample_id)
    p = as_grid(target, sample_id)
    if p.shape != q.shape:
        raise ValueError(f"{sample_prefix(sample_id)}target map {p.shape} does not match the relevance map {q.shape}")
    if not p.sum() > 0:
        raise ValueError(f"{sample_prefix(sample_id)}target map has no mass")
    p = p / p.sum()
    v = p.size
    pe = (1.0 - epsilon) * p + epsilon / v
    qe = (1.0 - epsilon) * q + epsilon / v
    # Both are strictly positive, so the log ratio is finite everywhere; clamp rounding noise below 0.
    return max(float(np.sum(pe * (np.log(pe) - np.log(qe)))), 0.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes; 0 when the union has no area."""
    ax0, ay0, ax1, ay1 = parse_box(a, "box a")
    bx0, by0, bx1, by1 = parse_box(b, "box b")
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def best_box_iou(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """IoU of the top-ranked (first) predicted box with the gt box it overlaps best; 0 with no predicted box.

    Raises:
        ValueError: no gt box, or a malformed box.
    """
    gts = [parse_box(g, f"gt box {k}") for k, g in enumerate(gt_boxes)]
    if not gts:
        raise ValueError("best_box_iou needs at least one gt box")
    if len(pred_boxes) == 0:
        return 0.0
    top = parse_box(pred_boxes[0], "predicted box 0")
    return max(box_iou(top, g) for g in gts)


__all__ = [
    "as_grid",
    "best_box_iou",
    "box_iou",
    "evidence_mass",
    "normalize_map",
    "pointing_score",
    "sample_prefix",
    "target_kl",
]
