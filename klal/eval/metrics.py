"""Grounding and answer metrics (torchmetrics) for the evaluation of grounding methods and fine-tuned models.

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

Inputs. Relevance maps are per-image grids ``(gh, gw)`` over the model family's map grid (row-major, one cell per
visual token; :meth:`klal.models.family.VLMFamily.map_grid`); they must be finite and non-negative, at any scale:
the metrics normalise them to sum to 1 (an all-zero map reads as uniform, "no information"). The evidence is laid on
the map through its tokens' footprints (:class:`klal.geometry.Footprint`: what each token's patches saw in the
original image, from :meth:`klal.models.family.VLMFamily.map_footprint`, given per sample or by ``footprint_of``);
without one, the map's cells are taken as equal cells covering the whole image, which is exact on the Qwen families
(28-px tokens of the resized image on Qwen2/2.5-VL, 32 px on Qwen3-VL and Qwen3.5) and not on LLaVA-OneVision.
Boxes are ``(x0, y0, x1, y1)`` in ORIGINAL image pixels. A sample with several images has one map per image, but its
evidence refers to image 0 (the schema's ``width``/``height`` are image 0's), so the grounding metrics use map 0
only.

Metrics (names as in :data:`METRIC_RANGES` and :meth:`GroundingMetrics.compute`):

* ``pointing_game`` (:class:`PointingGame`): 1 when the map's peak cell is an evidence cell. Ties: when several cells
  share the peak (within a relative 1e-9), the score is the fraction of them inside the evidence, i.e. the expected hit
  under random tie-breaking; a flat map therefore scores the evidence's share of the grid (the chance level), not 1.
* ``evidence_mass`` (:class:`EvidenceMass`): share of the normalised map inside the evidence cells.
* ``target_kl`` (:class:`TargetKL`): ``KL(P_eps || Q_eps)`` with ``P`` the klal target map of the evidence
  (:func:`klal.data.targets.build_target_map`, default :class:`~klal.data.targets.TargetSpec` unless another is
  given) and ``Q``
  the normalised map, both smoothed like the training loss smooths ``P`` (:mod:`klal.loss`):
  ``X_eps = (1 - eps) * X + eps / V`` over the ``V`` cells of the grid. Smoothing ``Q`` too keeps the KL finite for
  maps with exact zeros (ReLU'd relevance); for a softmax attention map it changes the value by ``O(eps)``.
* ``box_iou`` (:class:`BoxIoU`): IoU of the top-ranked predicted box with the best-matching gt box
  (``evidence["boxes"]``), in original pixels.
* ``box_accuracy`` (:class:`BoxAccuracy`): 1 when that IoU is at least ``iou_threshold`` (0.5).
* ``answer_accuracy`` (:class:`AnswerAccuracy`): :func:`~klal.eval.answers.answer_correct` of prediction and gold.

Box metrics count every sample that has gt boxes and a box prediction list: a method that returns an empty list for a
sample scores IoU 0 there (state ``no_prediction`` counts those), while ``None`` means "this method does not predict
boxes" and the sample is skipped. Samples without gt boxes are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from klal.data.targets import TargetSpec, build_target_map, evidence_cells, evidence_parts
from klal.eval.answers import answer_correct
from klal.eval.scores import as_grid, best_box_iou, evidence_mass, pointing_score, sample_prefix, target_kl
from klal.geometry import Footprint

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
            target: ``(gh, gw)`` target distribution (:func:`klal.data.targets.build_target_map`), or None when the
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
            raise ValueError(f"{sample_prefix(sample_id)}{e}") from e
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
            raise ValueError(f"{sample_prefix(sample_id)}{e}") from e
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
        spec: target-map settings for ``target_kl`` (default :class:`~klal.data.targets.TargetSpec`).
        epsilon: smoothing of ``target_kl``.
        iou_threshold: IoU for ``box_accuracy``.
        device: where the metric states live (e.g. the CUDA device for an NCCL sync); default CPU.
        footprint_of: ``(height, width) -> Footprint`` of the map grid of an image of that size (e.g. the family's
            :meth:`~klal.models.family.VLMFamily.map_footprint` with its processor), used when :meth:`update` is not
            given one; None: equal cells over the whole image.
    """

    def __init__(
        self,
        spec: TargetSpec | None = None,
        epsilon: float = 1e-4,
        iou_threshold: float = 0.5,
        device: torch.device | str | None = None,
        footprint_of: Callable[[int, int], Footprint] | None = None,
    ) -> None:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"GroundingMetrics epsilon must be in (0, 1), got {epsilon}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"GroundingMetrics iou_threshold must be in (0, 1], got {iou_threshold}")
        self.spec = spec or TargetSpec()
        self.epsilon = epsilon
        self.iou_threshold = iou_threshold
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.footprint_of = footprint_of
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
        footprint: Footprint | None = None,
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
            record: the dataset row (needs ``id``, ``answer``, ``width``, ``height``, ``evidence``). The evidence
                is laid on map 0's grid through ``footprint``.
            footprint: the footprint of map 0's grid in image 0 (default ``footprint_of``, else equal cells over
                the whole image).

        Raises:
            ValueError: a record missing a key, malformed evidence, boxes
                or maps (:class:`~klal.data.targets.TargetMapError` is a ValueError); messages name the sample id.
        """
        missing = [k for k in ("id", "answer", "width", "height", "evidence") if k not in record]
        if missing:
            raise ValueError(f"record {record.get('id', '?')!r} lacks key(s) {missing} needed for metrics")
        sid = str(record["id"])
        orig_hw = (float(record["height"]), float(record["width"]))
        grid = as_grid(maps[0], sid) if maps is not None and len(maps) > 0 else None
        cells = target = None
        if grid is not None:
            try:
                if footprint is None and self.footprint_of is not None:
                    footprint = self.footprint_of(int(record["height"]), int(record["width"]))
                if footprint is not None and footprint.shape != grid.shape:
                    raise ValueError(f"map 0 is {grid.shape} but its footprint is of a {footprint.shape} grid")
                on = footprint if footprint is not None else grid.shape
                cells = evidence_cells(record["evidence"], orig_hw, on)
                target = build_target_map(record["evidence"], orig_hw, on, self.spec)
            except ValueError as e:
                raise type(e)(f"{sample_prefix(sid)}{e}") from e
        ms = self.metrics(method, task)
        ms["pointing_game"].update(grid, cells, sample_id=sid)
        ms["evidence_mass"].update(grid, cells, sample_id=sid)
        ms["target_kl"].update(grid, target, sample_id=sid)
        gt_boxes = evidence_parts(record["evidence"])["boxes"]
        ms["box_iou"].update(boxes, gt_boxes, sample_id=sid)
        ms["box_accuracy"].update(boxes, gt_boxes, sample_id=sid)
        ms["answer_accuracy"].update(answer, str(record["answer"]), sample_id=sid)

    def update_result(
        self,
        method: str,
        result: Any,
        record: Mapping[str, Any],
        predicts_boxes: bool = True,
        footprint: Footprint | None = None,
    ) -> None:
        """:meth:`update` from a ``GroundingResult``-like object (``.maps``, ``.boxes``, ``.answer``), task from
        ``record["task"]``.

        Args:
            method: grounding method name.
            result: the method's result for this sample.
            record: the dataset row.
            predicts_boxes: False for a method that never predicts boxes: its (empty) ``boxes`` are then passed as
                None, so the box metrics skip its samples instead of scoring them IoU 0.
            footprint: as for :meth:`update`.
        """
        boxes = result.boxes if predicts_boxes else None
        self.update(method, str(record["task"]), result.maps, boxes, result.answer, record, footprint)

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


def pooled(scores: Mapping[str, Any], method: str, metric: str) -> dict[str, float | int]:
    """One metric of one method over all its tasks, from a :meth:`GroundingMetrics.compute` result.

    Returns:
        ``{"value", "count", "skipped"}``: the count-weighted mean of the per-task values (0.0 with no scored sample)
        and the summed counts.
    """
    per_task = [ms[metric] for ms in scores.get(method, {}).values()]
    count = sum(int(s["count"]) for s in per_task)
    total = sum(float(s["value"]) * int(s["count"]) for s in per_task)
    skipped = sum(int(s["skipped"]) for s in per_task)
    return {"value": total / count if count else 0.0, "count": count, "skipped": skipped}


__all__ = [
    "METRIC_NAMES",
    "METRIC_RANGES",
    "AnswerAccuracy",
    "BoxAccuracy",
    "BoxIoU",
    "EvidenceMass",
    "GroundingMetrics",
    "PointingGame",
    "TargetKL",
    "pooled",
]
