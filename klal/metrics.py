"""Grounding and answer metrics for the evaluation of grounding methods and fine-tuned models.

Every metric is a :class:`torchmetrics.Metric` whose states are sums (``dist_reduce_fx="sum"``), so a DDP sync adds
the ranks' states and gives exactly the single-process result over all their samples. Each metric keeps:

* ``total``: the sum of the per-sample scores,
* ``count``: the samples scored,
* ``skipped``: the samples given to ``update`` that the metric could not score (no map, no evidence cells, no target
  map, no gt box, no predicted answer...). Nothing is dropped silently: the counts say how many samples a value rests
  on and how many were left out.

``compute()`` returns the mean ``total / count`` as a float64 scalar tensor; with no scored sample (``count == 0``) it
returns ``0.0`` rather than NaN, and the zero count is what tells a table the value is empty. ``summary()`` returns the
value with the (synced) counts as plain Python numbers.

Inputs. Relevance maps are per-image grids ``(gh, gw)`` over the model's visual-token grid (row-major, one token per
28 x 28 px cell of the *resized* image, see :mod:`klal.targets`); they must be finite and non-negative, at any scale:
the metrics normalise them to sum to 1 (an all-zero map reads as uniform, "no information"). Boxes are
``(x0, y0, x1, y1)`` in ORIGINAL image pixels. A sample with several images has one map per image, but its evidence
refers to image 0 (the schema's ``width``/``height`` are image 0's), so the grounding metrics use map 0 only.

Metrics (names as in :data:`METRIC_RANGES` and :meth:`GroundingMetrics.compute`):

* ``pointing_game`` (:class:`PointingGame`): 1 when the map's peak cell is an evidence cell. Ties: when several cells
  share the peak (within a relative 1e-9), the score is the fraction of them inside the evidence, i.e. the expected hit
  under random tie-breaking; a flat map therefore scores the evidence's share of the grid (the chance level), not 1.
* ``evidence_mass`` (:class:`EvidenceMass`): share of the normalised map inside the evidence cells.
* ``target_kl`` (:class:`TargetKL`): ``KL(P_eps || Q_eps)`` with ``P`` the klal target map of the evidence
  (:func:`klal.targets.build_target_map`, default :class:`~klal.targets.TargetSpec` unless another is given) and ``Q``
  the normalised map, both smoothed like the training loss smooths ``P`` (:mod:`klal.loss`):
  ``X_eps = (1 - eps) * X + eps / V`` over the ``V`` cells of the grid. Smoothing ``Q`` too keeps the KL finite for
  maps with exact zeros (ReLU'd relevance); for a softmax attention map it changes the value by ``O(eps)``.
* ``box_iou`` (:class:`BoxIoU`): IoU of the top-ranked predicted box with the best-matching gt box
  (``evidence["boxes"]``), in original pixels.
* ``box_accuracy`` (:class:`BoxAccuracy`): 1 when that IoU is at least ``iou_threshold`` (0.5).
* ``answer_accuracy`` (:class:`AnswerAccuracy`): :func:`answer_correct` of the predicted answer against the gold one.

Box metrics count every sample that has gt boxes and a box prediction list: a method that returns an empty list for a
sample scores IoU 0 there (state ``no_prediction`` counts those), while ``None`` means "this method does not predict
boxes" and the sample is skipped. Samples without gt boxes are skipped.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics import Metric

from klal.data.schema import Evidence
from klal.targets import (
    TOKEN_PX,
    TargetMapError,
    TargetSpec,
    box_map,
    build_target_map,
    mask_map,
    point_map,
    polyline_map,
)

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "pointing_game": (0.0, 1.0),
    "evidence_mass": (0.0, 1.0),
    "target_kl": (0.0, math.inf),
    "box_iou": (0.0, 1.0),
    "box_accuracy": (0.0, 1.0),
    "answer_accuracy": (0.0, 1.0),
}
"""Range of every metric's value, by name (``target_kl`` is unbounded above)."""

METRIC_NAMES: tuple[str, ...] = tuple(METRIC_RANGES)
"""The metric names :class:`GroundingMetrics` reports, in table order."""

AnswerKind = Literal["integer", "yes_no", "row_column", "text"]

_LINE_THICKNESS = 1e-6
"""Brush side (tokens) for rasterising evidence polylines: thin enough that only the cells the line runs through get
mass (a line exactly on a cell border marks both neighbours)."""
_LINE_MIN_LENGTH = 1e-3
"""A polyline marks a cell when it runs at least this far (tokens) inside it, so a line through a cell corner does
not mark the cells it only touches (those get mass of order thickness squared)."""
_TIE_RTOL = 1e-9


# -- evidence geometry -------------------------------------------------------------------------------------------------


def _evidence_lists(evidence: Evidence | Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """Evidence elements by kind (``boxes``, ``points``, ``polylines``, ``masks``); unknown keys raise."""
    keys = ("boxes", "points", "polylines", "masks")
    if evidence is None:
        return {k: [] for k in keys}
    if isinstance(evidence, Evidence):
        return {"boxes": evidence.boxes, "points": evidence.points, "polylines": evidence.polylines, "masks": []}
    if not isinstance(evidence, Mapping):
        raise TargetMapError(f"evidence must be an Evidence or a dict, got {type(evidence).__name__}")
    unknown = sorted(set(evidence) - set(keys))
    if unknown:
        raise TargetMapError(f"unknown evidence key(s) {unknown}; expected some of {list(keys)}")
    out: dict[str, list[Any]] = {}
    for k in keys:
        value = evidence.get(k)
        if value is None:
            out[k] = []
        elif k == "masks" and isinstance(value, np.ndarray) and value.ndim == 2:
            out[k] = [value]
        elif isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            raise TargetMapError(f"evidence {k!r} must be a list, got {type(value).__name__}")
        else:
            out[k] = list(value)
    return out


def evidence_cells(
    evidence: Evidence | Mapping[str, Any] | None,
    orig_hw: tuple[float, float],
    processed_hw: tuple[int, int],
) -> np.ndarray | None:
    """Token cells that hold evidence, on the grid of an image resized to ``processed_hw``.

    Built with :mod:`klal.targets`, so the geometry (resize scale per axis, cell ``(i, j)`` covering
    ``[j, j + 1] x [i, i + 1]`` in token units) is the training target's:

    * box: every cell the box overlaps with positive area (``area`` box mode > 0); a box edge lying exactly on a cell
      border does not mark the next cell, and a zero-area box marks nothing (as it gives no target mass);
    * point: the cell containing it (``nearest`` point mode; a point on the right/bottom border belongs to the last
      cell);
    * polyline: the cells the line runs through, at least 1e-3 token widths inside the cell (a polyline drawn with a
      1e-6-token brush); a line exactly on a cell border marks both neighbours, a line through a cell corner does not
      mark the cells it only touches;
    * mask (``masks`` key, not in the stored schema): the cells the mask covers with positive weight.

    Args:
        evidence: an :class:`~klal.data.schema.Evidence` or an ``evidence`` column dict, in original pixels.
        orig_hw: original image ``(height, width)``.
        processed_hw: resized image ``(height, width)``, multiples of 28.

    Returns:
        ``(gh, gw)`` bool array, or None when the evidence marks no cell (empty, outside the image or zero area).

    Raises:
        TargetMapError: malformed evidence or sizes (the message names the element).
    """
    parts = _evidence_lists(evidence)
    gh, gw = _grid_of(processed_hw)
    cells = np.zeros((gh, gw), dtype=bool)
    if parts["boxes"]:
        cells |= box_map(parts["boxes"], orig_hw, processed_hw, mode="area") > 0
    if parts["points"]:
        cells |= point_map(parts["points"], orig_hw, processed_hw, mode="nearest") > 0
    if parts["polylines"]:
        mass = polyline_map(parts["polylines"], orig_hw, processed_hw, thickness=_LINE_THICKNESS)
        # Mass in a cell = line length inside it x thickness (token units).
        cells |= mass >= _LINE_MIN_LENGTH * _LINE_THICKNESS
    for k, mask in enumerate(parts["masks"]):
        arr = np.asarray(mask, dtype=np.float64)
        if arr.ndim == 2 and arr.shape != (int(orig_hw[0]), int(orig_hw[1])):
            raise TargetMapError(f"masks[{k}]: shape {arr.shape} does not match the image size {tuple(orig_hw)}")
        cells |= mask_map(arr, processed_hw) > 0
    return cells if cells.any() else None


def _grid_of(processed_hw: Sequence[int]) -> tuple[int, int]:
    try:
        ph, pw = (int(v) for v in processed_hw)
    except (TypeError, ValueError) as e:
        raise TargetMapError(f"processed_hw must be (height, width), got {processed_hw!r}") from e
    if ph <= 0 or pw <= 0 or ph % TOKEN_PX or pw % TOKEN_PX:
        raise TargetMapError(f"processed_hw must be positive multiples of {TOKEN_PX}, got {tuple(processed_hw)}")
    return ph // TOKEN_PX, pw // TOKEN_PX


# -- per-sample scores -------------------------------------------------------------------------------------------------


def _where(sample_id: str | None) -> str:
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
        raise ValueError(f"{_where(sample_id)}a relevance map must be a non-empty 2-D (gh, gw) grid, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{_where(sample_id)}relevance map contains NaN or inf")
    if arr.min() < 0:
        raise ValueError(f"{_where(sample_id)}relevance map has negative values (min {arr.min()}); clip it at 0")
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
            f"{_where(sample_id)}evidence cells {mask.shape} do not match the relevance map's grid {grid.shape} "
            "(is processed_hw the size of image 0?)"
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
        raise ValueError(f"{_where(sample_id)}target map {p.shape} does not match the relevance map {q.shape}")
    if not p.sum() > 0:
        raise ValueError(f"{_where(sample_id)}target map has no mass")
    p = p / p.sum()
    v = p.size
    pe = (1.0 - epsilon) * p + epsilon / v
    qe = (1.0 - epsilon) * q + epsilon / v
    # Both are strictly positive, so the log ratio is finite everywhere; clamp rounding noise below 0.
    return max(float(np.sum(pe * (np.log(pe) - np.log(qe)))), 0.0)


def _parse_box(box: Any, where: str) -> tuple[float, float, float, float]:
    try:
        arr = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: a box is 4 numbers (x0, y0, x1, y1), got {box!r}") from e
    if arr.shape != (4,):
        raise ValueError(f"{where}: a box is 4 numbers (x0, y0, x1, y1), got {box!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: box has NaN or inf ({arr.tolist()})")
    x0, y0, x1, y1 = (float(v) for v in arr)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{where}: box needs x0 <= x1 and y0 <= y1 (x0, y0, x1, y1), got {arr.tolist()}")
    return x0, y0, x1, y1


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes; 0 when the union has no area."""
    ax0, ay0, ax1, ay1 = _parse_box(a, "box a")
    bx0, by0, bx1, by1 = _parse_box(b, "box b")
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
    gts = [_parse_box(g, f"gt box {k}") for k, g in enumerate(gt_boxes)]
    if not gts:
        raise ValueError("best_box_iou needs at least one gt box")
    if len(pred_boxes) == 0:
        return 0.0
    top = _parse_box(pred_boxes[0], "predicted box 0")
    return max(box_iou(top, g) for g in gts)


# -- answers -----------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "  # noqa: SIM905
        "seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"none": 0, "once": 1, "twice": 2, "thrice": 3})
_WORD_ALT = "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True))
# A number: digits with an optional decimal part ("3." is the integer 3 followed by a full stop), or a number word.
# A sign counts only after a non-word character, so "2-3" reads as 2 and 3, not 2 and -3.
_NUMBER_RE = re.compile(rf"(?P<num>(?:(?<![\w.])[-+])?\d+(?:\.\d+)?)|\b(?P<word>{_WORD_ALT})\b")
_NUM_TOKEN = rf"(?:\d+|{_WORD_ALT})\b"
_ROW_RE = re.compile(rf"\brows?\b\s*(?:#|no\.?|number)?\s*(?P<n>{_NUM_TOKEN})")
_COL_RE = re.compile(rf"\b(?:columns?|cols?)\b\s*(?:#|no\.?|number)?\s*(?P<n>{_NUM_TOKEN})")
_YES_NO_RE = re.compile(r"\b(yes|no)\b")
_GOLD_INT_RE = re.compile(r"^[-+]?\d+\.?$")
_GOLD_ROW_COL_RE = re.compile(r"^\(\s*[-+]?\d+\s*,\s*[-+]?\d+\s*\)$")


def _strip_punct(text: str) -> str:
    """Casefold, drop Unicode punctuation, collapse whitespace."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.casefold())
    return " ".join(kept.split())


def answer_kind(gold: str) -> AnswerKind:
    """How answers to this gold answer are compared.

    * ``integer``: gold is an integer (``"3"``);
    * ``yes_no``: gold is yes or no (any case, punctuation ignored);
    * ``row_column``: gold is ``"(row, column)"`` (two integers in parentheses);
    * ``text``: anything else.
    """
    g = gold.strip()
    if _GOLD_INT_RE.match(g):
        return "integer"
    if _strip_punct(g) in ("yes", "no"):
        return "yes_no"
    if _GOLD_ROW_COL_RE.match(g):
        return "row_column"
    return "text"


def _number_value(m: re.Match[str]) -> str:
    if m.group("word") is not None:
        return str(_NUMBER_WORDS[m.group("word")])
    num = m.group("num")
    if "." in num:
        whole, frac = num.split(".")
        # "3.0" is the integer 3; "3.5" stays a decimal and matches no integer answer.
        return str(int(whole)) if set(frac) == {"0"} else num.lstrip("+")
    return str(int(num))


def _token_value(token: str) -> str:
    return str(_NUMBER_WORDS[token]) if token in _NUMBER_WORDS else str(int(token))


def normalize_answer(text: str, gold: str) -> str:
    """Canonical form of ``text`` for comparison with ``gold``, by :func:`answer_kind` of ``gold``.

    * integer: the first number in the text, digits or a word (``"zero"`` to ``"twenty"``, ``"none"``, ``"once"``,
      ``"twice"``, ``"thrice"``), as a plain integer string (``" 3."`` -> ``"3"``, ``"There are three crossings"`` ->
      ``"3"``); a non-integer decimal stays as written (``"3.5"``) and so matches no integer;
    * yes/no: the first standalone ``yes`` or ``no`` word (``"yes!"`` -> ``"yes"``; ``"not"`` is not ``no``);
    * row/column: ``"(r, c)"`` from explicitly labelled ``row N`` and ``column M`` when both are present in any order
      (``"Column 3, row 2"`` -> ``"(2, 3)"``), otherwise the first two numbers (``"(2,3)"`` -> ``"(2, 3)"``);
    * text: casefolded, punctuation removed, whitespace collapsed.

    Returns an empty string when the text holds nothing of the required kind (never a correct answer).
    """
    kind = answer_kind(gold)
    low = text.casefold()
    if kind == "integer":
        m = _NUMBER_RE.search(low)
        return _number_value(m) if m else ""
    if kind == "yes_no":
        m = _YES_NO_RE.search(low)
        return m.group(1) if m else ""
    if kind == "row_column":
        row, col = _ROW_RE.search(low), _COL_RE.search(low)
        if row and col:
            return f"({_token_value(row.group('n'))}, {_token_value(col.group('n'))})"
        nums = [_number_value(m) for m in _NUMBER_RE.finditer(low)][:2]
        return f"({nums[0]}, {nums[1]})" if len(nums) == 2 else ""
    return _strip_punct(text)


def answer_correct(pred: str, gold: str) -> bool:
    """Whether a predicted answer matches the gold one after :func:`normalize_answer` of both.

    Raises:
        ValueError: the gold answer is empty (after normalisation), so nothing could match it.
    """
    want = normalize_answer(gold, gold)
    if not want:
        raise ValueError(f"gold answer {gold!r} is empty after normalisation")
    return normalize_answer(pred, gold) == want


# -- torchmetrics metrics ----------------------------------------------------------------------------------------------


class _MeanMetric(Metric):
    """Mean of per-sample scores with ``total``/``count``/``skipped`` sum states (module docstring)."""

    is_differentiable = False
    higher_is_better: bool | None = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    name: str = ""
    """Key of the metric in :data:`METRIC_RANGES` and in :meth:`GroundingMetrics.compute`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _add(self, score: float | None) -> None:
        """Add one sample's score, or count it as skipped when None."""
        if score is None:
            self.skipped += 1
        else:
            self.total += float(score)
            self.count += 1

    def compute(self) -> torch.Tensor:
        """Mean score over the scored samples (synced across ranks); 0.0 when there are none (see ``count``)."""
        if int(self.count) == 0:
            return torch.tensor(0.0, dtype=torch.float64, device=self.total.device)
        return self.total / self.count

    def _local_summary(self) -> dict[str, float | int]:
        n = int(self.count)
        return {"value": float(self.total) / n if n else 0.0, "count": n, "skipped": int(self.skipped)}

    def summary(self) -> dict[str, float | int]:
        """``{"value", "count", "skipped"}`` (box metrics add ``no_prediction``) over all ranks, as Python numbers.

        In a distributed run every rank must call this (it syncs, like ``compute``).
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            return self._local_summary()


class PointingGame(_MeanMetric):
    """Pointing game: is the map's peak cell an evidence cell? (ties: fraction of the peak cells inside)."""

    name = "pointing_game"

    def update(self, relevance: Any | None, cells: Any | None, sample_id: str | None = None) -> None:
        """Score one sample.

        Args:
            relevance: ``(gh, gw)`` non-negative map (image 0's), or None when the method gave none (skipped).
            cells: ``(gh, gw)`` bool evidence cells (:func:`evidence_cells`), or None when there are none (skipped).
            sample_id: named in error messages.
        """
        if relevance is None or cells is None:
            self._add(None)
        else:
            self._add(pointing_score(relevance, cells, sample_id))


class EvidenceMass(_MeanMetric):
    """Share of the normalised map that falls on evidence cells."""

    name = "evidence_mass"

    def update(self, relevance: Any | None, cells: Any | None, sample_id: str | None = None) -> None:
        """Score one sample; arguments as for :meth:`PointingGame.update`."""
        if relevance is None or cells is None:
            self._add(None)
        else:
            self._add(evidence_mass(relevance, cells, sample_id))


class TargetKL(_MeanMetric):
    """``KL(P_eps || Q_eps)`` between the klal target map and the normalised relevance map (lower is better).

    Args:
        epsilon: smoothing weight in ``(0, 1)`` mixed into both distributions (as klal.loss does for ``P``).
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    name = "target_kl"
    higher_is_better = False
    plot_upper_bound = None

    def __init__(self, epsilon: float = 1e-4, **kwargs: Any) -> None:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"TargetKL epsilon must be in (0, 1), got {epsilon}")
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def update(self, relevance: Any | None, target: Any | None, sample_id: str | None = None) -> None:
        """Score one sample.

        Args:
            relevance: ``(gh, gw)`` non-negative map, or None (skipped).
            target: ``(gh, gw)`` target distribution (:func:`klal.targets.build_target_map`), or None when the
                evidence gives no map (skipped).
            sample_id: named in error messages.
        """
        if relevance is None or target is None:
            self._add(None)
        else:
            self._add(target_kl(relevance, target, self.epsilon, sample_id))


class BoxIoU(_MeanMetric):
    """IoU of the top-ranked predicted box with the best-matching gt box (original pixels).

    A sample with gt boxes and an empty prediction list scores 0 and is counted (also in ``no_prediction``); a
    prediction of None (the method predicts no boxes) or a sample without gt boxes is skipped.
    """

    name = "box_iou"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("no_prediction", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _score(self, iou: float) -> float:
        return iou

    def update(
        self,
        pred_boxes: Sequence[Sequence[float]] | None,
        gt_boxes: Sequence[Sequence[float]] | None,
        sample_id: str | None = None,
    ) -> None:
        """Score one sample.

        Args:
            pred_boxes: ``[(x0, y0, x1, y1), ...]`` ranked best first, or None when the method predicts no boxes.
            gt_boxes: the sample's ``evidence["boxes"]`` (empty or None: skipped).
            sample_id: named in error messages.
        """
        if pred_boxes is None or gt_boxes is None or len(gt_boxes) == 0:
            self._add(None)
            return
        if len(pred_boxes) == 0:
            self.no_prediction += 1
        try:
            iou = best_box_iou(pred_boxes, gt_boxes)
        except ValueError as e:
            raise ValueError(f"{_where(sample_id)}{e}") from e
        self._add(self._score(iou))

    def _local_summary(self) -> dict[str, float | int]:
        return {**super()._local_summary(), "no_prediction": int(self.no_prediction)}


class BoxAccuracy(BoxIoU):
    """Share of samples whose :class:`BoxIoU` is at least ``iou_threshold`` (same counting rules).

    Args:
        iou_threshold: IoU at or above which the box is correct, in ``(0, 1]``.
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    name = "box_accuracy"

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"BoxAccuracy iou_threshold must be in (0, 1], got {iou_threshold}")
        super().__init__(**kwargs)
        self.iou_threshold = iou_threshold

    def _score(self, iou: float) -> float:
        return float(iou >= self.iou_threshold)


class AnswerAccuracy(_MeanMetric):
    """Share of predicted answers that match the gold answer (:func:`answer_correct`)."""

    name = "answer_accuracy"

    def update(self, pred: str | None, gold: str, sample_id: str | None = None) -> None:
        """Score one sample.

        Args:
            pred: the predicted answer text, or None when the method does not answer (skipped).
            gold: the gold answer.
            sample_id: named in error messages.
        """
        if pred is None:
            self._add(None)
            return
        try:
            ok = answer_correct(str(pred), str(gold))
        except ValueError as e:
            raise ValueError(f"{_where(sample_id)}{e}") from e
        self._add(float(ok))


# -- all metrics per (method, task) ------------------------------------------------------------------------------------


def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class GroundingMetrics:
    """One set of the six metrics per ``(method, task)``, fed one sample at a time.

    In a distributed run each rank updates its own samples and every rank calls :meth:`compute`, which first agrees
    on the union of the ``(method, task)`` keys seen by any rank (so ranks that saw different tasks still sync the
    same metrics in the same order) and then syncs each metric's sum states.

    Args:
        spec: target-map settings for ``target_kl`` (default :class:`~klal.targets.TargetSpec`).
        epsilon: smoothing of ``target_kl``.
        iou_threshold: IoU for ``box_accuracy``.
        device: where the metric states live (e.g. the CUDA device for an NCCL sync); default CPU.
    """

    def __init__(
        self,
        spec: TargetSpec | None = None,
        epsilon: float = 1e-4,
        iou_threshold: float = 0.5,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"GroundingMetrics epsilon must be in (0, 1), got {epsilon}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"GroundingMetrics iou_threshold must be in (0, 1], got {iou_threshold}")
        self.spec = spec or TargetSpec()
        self.epsilon = epsilon
        self.iou_threshold = iou_threshold
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._sets: dict[tuple[str, str], dict[str, _MeanMetric]] = {}

    def _new_set(self) -> dict[str, _MeanMetric]:
        metrics: dict[str, _MeanMetric] = {
            "pointing_game": PointingGame(),
            "evidence_mass": EvidenceMass(),
            "target_kl": TargetKL(epsilon=self.epsilon),
            "box_iou": BoxIoU(),
            "box_accuracy": BoxAccuracy(iou_threshold=self.iou_threshold),
            "answer_accuracy": AnswerAccuracy(),
        }
        return {k: m.to(self.device) for k, m in metrics.items()}

    def metrics(self, method: str, task: str) -> dict[str, Metric]:
        """The metric objects of one ``(method, task)`` (created empty if new)."""
        key = (str(method), str(task))
        if key not in self._sets:
            self._sets[key] = self._new_set()
        return self._sets[key]

    @property
    def keys(self) -> list[tuple[str, str]]:
        """The ``(method, task)`` pairs updated on this rank, sorted."""
        return sorted(self._sets)

    def update(
        self,
        method: str,
        task: str,
        maps: Sequence[Any] | None,
        boxes: Sequence[Sequence[float]] | None,
        answer: str | None,
        record: Mapping[str, Any],
        processed_hw: tuple[int, int] | None = None,
    ) -> None:
        """Score one sample with every metric of ``(method, task)``.

        Args:
            method: grounding method name.
            task: task name (usually ``record["task"]``).
            maps: one ``(gh, gw)`` relevance map per image of the sample; the grounding metrics use map 0 (the
                evidence is image 0's). None or empty: the method gave no map (map metrics skip the sample).
            boxes: predicted boxes in original pixels of image 0, best first; None when the method predicts no boxes
                (box metrics skip), ``[]`` when it predicted none for this sample (IoU 0).
            answer: predicted answer, or None when the method does not answer.
            record: the dataset row (needs ``id``, ``answer``, ``width``, ``height``, ``evidence``).
            processed_hw: resized size ``(height, width)`` of image 0; default: map 0's grid x 28. When given it must
                agree with map 0's grid.

        Raises:
            ValueError: a record missing a key, a map that does not match ``processed_hw``, malformed evidence, boxes
                or maps (:class:`~klal.targets.TargetMapError` is a ValueError); messages name the sample id.
        """
        missing = [k for k in ("id", "answer", "width", "height", "evidence") if k not in record]
        if missing:
            raise ValueError(f"record {record.get('id', '?')!r} lacks key(s) {missing} needed for metrics")
        sid = str(record["id"])
        orig_hw = (float(record["height"]), float(record["width"]))
        grid = as_grid(maps[0], sid) if maps is not None and len(maps) > 0 else None
        cells = target = None
        if grid is not None:
            if processed_hw is None:
                processed_hw = (grid.shape[0] * TOKEN_PX, grid.shape[1] * TOKEN_PX)
            try:
                expect = _grid_of(processed_hw)
                if grid.shape != expect:
                    raise ValueError(
                        f"map 0 has grid {grid.shape} but processed_hw {tuple(processed_hw)} gives {expect} "
                        f"({TOKEN_PX} px per token)"
                    )
                cells = evidence_cells(record["evidence"], orig_hw, processed_hw)
                target = build_target_map(_target_evidence(record["evidence"]), orig_hw, processed_hw, self.spec)
            except ValueError as e:
                raise type(e)(f"{_where(sid)}{e}") from e
        ms = self.metrics(method, task)
        ms["pointing_game"].update(grid, cells, sample_id=sid)
        ms["evidence_mass"].update(grid, cells, sample_id=sid)
        ms["target_kl"].update(grid, target, sample_id=sid)
        gt_boxes = _evidence_lists(record["evidence"])["boxes"]
        ms["box_iou"].update(boxes, gt_boxes, sample_id=sid)
        ms["box_accuracy"].update(boxes, gt_boxes, sample_id=sid)
        ms["answer_accuracy"].update(answer, str(record["answer"]), sample_id=sid)

    def update_result(
        self,
        method: str,
        result: Any,
        record: Mapping[str, Any],
        processed_hw: tuple[int, int] | None = None,
        predicts_boxes: bool = True,
    ) -> None:
        """:meth:`update` from a ``GroundingResult``-like object (``.maps``, ``.boxes``, ``.answer``), task from
        ``record["task"]``.

        Args:
            method: grounding method name.
            result: the method's result for this sample.
            record: the dataset row.
            processed_hw: as for :meth:`update`.
            predicts_boxes: False for a method that never predicts boxes: its (empty) ``boxes`` are then passed as
                None, so the box metrics skip its samples instead of scoring them IoU 0.
        """
        boxes = result.boxes if predicts_boxes else None
        self.update(method, str(record["task"]), result.maps, boxes, result.answer, record, processed_hw)

    def compute(self) -> dict[str, dict[str, dict[str, dict[str, float | int]]]]:
        """``{method: {task: {metric: {"value", "count", "skipped"[, "no_prediction"]}}}}`` over all ranks.

        Values are Python floats (0.0 with ``count == 0``), counts ints. Every rank must call this in a distributed
        run.
        """
        keys = set(self._sets)
        if _dist_world() > 1:
            gathered: list[Any] = [None] * _dist_world()
            torch.distributed.all_gather_object(gathered, sorted(keys))
            keys = {tuple(k) for ks in gathered for k in ks}
        out: dict[str, dict[str, dict[str, dict[str, float | int]]]] = {}
        for method, task in sorted(keys):
            # A rank may create an empty set here for a key only other ranks saw: it still joins the sync.
            ms = self.metrics(method, task)
            out.setdefault(method, {})[task] = {name: ms[name].summary() for name in METRIC_NAMES}
        return out

    @staticmethod
    def flatten(scores: dict[str, dict[str, dict[str, dict[str, float | int]]]], prefix: str) -> dict[str, float]:
        """``{"<prefix>/<method>/<task>/<metric>": value}`` of a :meth:`compute` result, for loggers; metrics that
        scored no sample are left out (their 0.0 is a placeholder, not a score)."""
        return {
            f"{prefix}/{method}/{task}/{name}": s["value"]
            for method, tasks in scores.items()
            for task, ms in tasks.items()
            for name, s in ms.items()
            if s["count"] > 0
        }

    def reset(self) -> None:
        """Forget all samples and keys."""
        self._sets.clear()

    def to(self, device: torch.device | str) -> GroundingMetrics:
        """Move every metric's states (and later ones) to ``device``."""
        self.device = torch.device(device)
        for ms in self._sets.values():
            for k in ms:
                ms[k] = ms[k].to(self.device)
        return self


def _target_evidence(evidence: Evidence | Mapping[str, Any] | None) -> Evidence | Mapping[str, Any] | None:
    """Evidence for :func:`build_target_map`: dicts with None values (as HF datasets may give) read as empty."""
    if isinstance(evidence, Mapping):
        return {k: v for k, v in evidence.items() if v is not None}
    return evidence


__all__ = [
    "METRIC_NAMES",
    "METRIC_RANGES",
    "AnswerAccuracy",
    "AnswerKind",
    "BoxAccuracy",
    "BoxIoU",
    "EvidenceMass",
    "GroundingMetrics",
    "PointingGame",
    "TargetKL",
    "answer_correct",
    "answer_kind",
    "as_grid",
    "best_box_iou",
    "box_iou",
    "evidence_cells",
    "evidence_mass",
    "normalize_answer",
    "normalize_map",
    "pointing_score",
    "target_kl",
]
