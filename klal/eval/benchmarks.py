"""Benchmark scores of an evaluation: each public benchmark's own metric per method, beside the grounding metrics.

A row belongs to a benchmark by its ``meta["benchmark"]`` (``vstar``, ``textvqa``, ``pope``; written by
:mod:`klal.data.vstar`, :mod:`klal.data.textvqa`, :mod:`klal.data.pope`) or, for rows of
:mod:`klal.data.refcoco`, by their ``ref_id``/``bbox_source`` meta; rows of other datasets get no benchmark score.
Per-sample scores come from :mod:`klal.eval.benchmark_scores`; here they are attached to each sample record
(``bench``: the score, whether it counts as right, what was parsed, and the sample's pointing and evidence mass) and
averaged per method and task (and per ``category`` for V* and POPE).

Metrics (value in [0, 1]; ``count`` = samples the method answered):

* ``vstar``: ``acc`` (option letter, lmms-eval's parse) and ``acc_text`` (letter, else the option's text);
* ``textvqa``: ``vqa_acc`` (VQA soft accuracy);
* ``pope``: ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (POPE's yes/no reading);
* ``refcoco``: ``acc@0.5`` (IoU of the answer's box with the gold box >= 0.5), ``iou`` (mean), ``center_acc``; an
  answer without a box scores IoU 0 (as lmms-eval's ``[0, 0, 0, 0]``).

Two reference rows are scored on the same samples from the gold answers alone: ``most frequent answer`` (per task,
every sample answered with the task's most frequent gold answer; RefCOCO: the whole image as the box) and ``chance``
(expected accuracy of a uniform guess: ``1 / #options`` for V*, a fair yes/no coin for POPE; not defined for TextVQA
and RefCOCO).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from klal.data.targets import evidence_cells
from klal.eval.answers import answer_correct
from klal.eval.benchmark_scores import (
    answer_box_to_original,
    box_center_inside,
    mc_choice,
    mc_letter,
    parse_answer_box,
    pope_label,
    pope_metrics,
    vqa_soft_accuracy,
)
from klal.eval.scores import box_iou, evidence_mass, pointing_score

logger = logging.getLogger(__name__)

BENCHMARK_METRICS: dict[str, tuple[str, ...]] = {
    "vstar": ("acc", "acc_text"),
    "textvqa": ("vqa_acc",),
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    "refcoco": ("acc@0.5", "iou", "center_acc"),
}
"""Each benchmark's metrics, in table order."""

BASELINE_ROWS = ("chance", "most frequent answer")
"""The reference rows scored from the gold answers alone."""


def benchmark_of(task: str, meta: Mapping[str, Any]) -> str | None:
    """The benchmark a row belongs to (module docstring), or None."""
    name = meta.get("benchmark")
    if name in BENCHMARK_METRICS:
        return str(name)
    if "ref_id" in meta and "bbox_source" in meta:
        return "refcoco"
    return None


def dataset_rows(datasets: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(dataset, id) -> {task, gold, meta (parsed), evidence, width, height}`` read without decoding any image."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    cols = ["id", "task", "answer", "meta", "evidence", "width", "height"]
    for name, ds in datasets.items():
        table = (
            ds.select_columns(cols).to_list()
            if hasattr(ds, "select_columns")
            else [{c: r.get(c) for c in cols} for r in ds]
        )
        for r in table:
            meta = r["meta"]
            meta = json.loads(meta) if isinstance(meta, str) and meta else (meta or {})
            out[(name, str(r["id"]))] = {**r, "meta": meta}
    return out


def score_answer(
    bench: str, answer: str, row: Mapping[str, Any], box_convention: str | None, resized_hw: tuple[int, int] | None
) -> dict[str, Any]:
    """One answer's benchmark score: ``{"metrics": {name: value}, "score": main value, "correct": bool, "parsed"}``."""
    meta = row["meta"]
    if bench == "vstar":
        options = list(meta["options"])
        letter, choice = mc_letter(answer, len(options)), mc_choice(answer, options)
        gold = str(meta["label"]).strip().upper()
        m = {"acc": float(letter == gold), "acc_text": float(choice == gold)}
        return {"metrics": m, "score": m["acc"], "correct": m["acc"] == 1.0, "parsed": letter}
    if bench == "textvqa":
        acc = vqa_soft_accuracy(answer, list(meta["answers"]))
        # "Right" in the report: at least two humans gave this answer (0.6 or more).
        return {"metrics": {"vqa_acc": acc}, "score": acc, "correct": acc >= 0.5, "parsed": None}
    if bench == "pope":
        label = pope_label(answer)
        right = label == row["answer"]
        return {"metrics": {}, "score": float(right), "correct": right, "parsed": label}
    if bench == "refcoco":
        h, w = int(row["height"]), int(row["width"])
        gold = row["evidence"]["boxes"][0]
        box = parse_answer_box(answer)
        if box is None:
            iou, center, pred = 0.0, False, None
        else:
            pred = answer_box_to_original(box, box_convention, (h, w), resized_hw)
            iou = box_iou(pred, gold)
            center = box_center_inside(pred, gold)
        m = {"acc@0.5": float(iou >= 0.5), "iou": iou, "center_acc": float(center)}
        return {"metrics": m, "score": iou, "correct": iou >= 0.5, "parsed": None if pred is None else list(pred)}
    raise ValueError(f"unknown benchmark {bench!r}")


def _grounding(res: Any, row: Mapping[str, Any], footprint_of: Any = None) -> dict[str, float | None]:
    """The sample's pointing score and evidence mass on map 0, or None where there is no map or no evidence.

    ``footprint_of(height, width)`` gives the map grid's token footprints (the family's exact geometry); a map on
    another grid, or no ``footprint_of``, is scored on equal cells over the image."""
    if res is None or not getattr(res, "maps", None):
        return {"pointing": None, "mass": None}
    hw = (int(row["height"]), int(row["width"]))
    grid: Any = np.asarray(res.maps[0]).shape
    if footprint_of is not None:
        fp = footprint_of(*hw)
        if (fp.rows, fp.cols) == tuple(grid):
            grid = fp
    cells = evidence_cells(row["evidence"], hw, grid)
    if cells is None:
        return {"pointing": None, "mass": None}
    return {"pointing": pointing_score(res.maps[0], cells), "mass": evidence_mass(res.maps[0], cells)}


class _Pool:
    """Per (method, group) lists of per-sample metric values, and POPE's labels."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.pope: dict[tuple[str, str], tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))

    def add(self, method: str, groups: Sequence[str], bench: str, scored: dict[str, Any], gold: str) -> None:
        for g in groups:
            if bench == "pope":
                preds, golds = self.pope[(method, g)]
                preds.append(scored["parsed"])
                golds.append(gold)
            else:
                for k, v in scored["metrics"].items():
                    self.values[(method, g)][k].append(float(v))

    def result(self) -> dict[str, dict[str, dict[str, dict[str, float | int]]]]:
        out: dict[str, dict[str, dict[str, dict[str, float | int]]]] = defaultdict(dict)
        for (method, g), ms in self.values.items():
            out[method][g] = {k: {"value": float(np.mean(v)), "count": len(v)} for k, v in ms.items()}
        for (method, g), (preds, golds) in self.pope.items():
            out[method][g] = {k: {"value": v, "count": len(preds)} for k, v in pope_metrics(preds, golds).items()}
        return dict(out)


def _groups(task: str, bench: str, meta: Mapping[str, Any]) -> list[str]:
    category = meta.get("category") if bench in ("vstar", "pope") else None
    return [task, f"{task}/{category}"] if category else [task]


def score_benchmarks(
    samples: Mapping[str, list[dict[str, Any]]],
    results: Mapping[str, Sequence[Any]],
    datasets: Mapping[str, Any],
    box_convention: str | None,
    resized_hw: Any = None,
    footprint_of: Any = None,
) -> dict[str, Any]:
    """Score every method's answers by their benchmark and attach ``bench`` to each sample record.

    Args:
        samples: method row -> its sample records (:attr:`klal.eval.engine.MethodRun.samples`), changed in place.
        results: method row -> its ``GroundingResult`` list in sample order (maps for pointing / mass), may be empty.
        datasets: dataset name -> rows (the evaluated image rows).
        box_convention: the model family's box convention (RefCOCO).
        resized_hw: ``(height, width) -> (resized height, resized width)`` of the processor (``resized_pixels``).
        footprint_of: ``(height, width) ->`` the footprint of an image's map grid
            (:meth:`klal.models.family.VLMFamily.map_footprint`); None scores maps on equal cells.

    Returns:
        ``{"metrics": {row: {group: {metric: {"value", "count"}}}}, "benchmarks": {task: benchmark}}``; the rows
        include :data:`BASELINE_ROWS` for the tasks that have them.
    """
    rows = dataset_rows(datasets)
    pool = _Pool()
    tasks: dict[str, str] = {}
    for method, recs in samples.items():
        res_list = list(results.get(method, []))
        for k, rec in enumerate(recs):
            row = rows[(rec["dataset"], str(rec["id"]))]
            bench = benchmark_of(row["task"], row["meta"])
            res = res_list[k] if k < len(res_list) else None
            info: dict[str, Any] = {"benchmark": bench, **_grounding(res, row, footprint_of)}
            answer = rec.get("answer")
            if bench is not None:
                tasks[row["task"]] = bench
            if answer is None:
                info.update(score=None, correct=None)
            elif bench is None:
                ok = answer_correct(answer, row["answer"])
                info.update(score=float(ok), correct=ok)
            else:
                hw = resized_hw(int(row["height"]), int(row["width"])) if resized_hw else None
                scored = score_answer(bench, answer, row, box_convention, hw)
                info.update(score=scored["score"], correct=scored["correct"], parsed=scored["parsed"])
                pool.add(method, _groups(row["task"], bench, row["meta"]), bench, scored, row["answer"])
            rec["bench"] = info
    _baselines(pool, rows, box_convention)
    return {"metrics": pool.result(), "benchmarks": tasks}


def score_evaluation(runs: Mapping[str, Any], datasets: Mapping[str, Any], gm: Any, model_cfg: Any) -> dict[str, Any]:
    """:func:`score_benchmarks` of an evaluation's method runs (:class:`klal.eval.engine.MethodRun`), with the loaded
    model's family convention and the configured pixel budget."""
    family = gm.family
    resize = None
    if family.pixel_bounds:

        def resize(h: int, w: int) -> tuple[int, int]:
            return family.resized_hw(h, w, model_cfg.min_pixels, model_cfg.max_pixels)

    return score_benchmarks(
        {row: run.samples for row, run in runs.items()},
        {row: run.results for row, run in runs.items()},
        datasets,
        family.box_convention,
        resize,
        lambda h, w: family.map_footprint(gm.processor, h, w),
    )


def _baselines(pool: _Pool, rows: Mapping[tuple[str, str], dict[str, Any]], box_convention: str | None) -> None:
    """Score :data:`BASELINE_ROWS` on every benchmark row (each row once, whatever methods ran)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows.values():
        if benchmark_of(row["task"], row["meta"]) is not None:
            by_task[row["task"]].append(row)
    for task, trows in by_task.items():
        frequent = Counter(r["answer"] for r in trows).most_common(1)[0][0]
        for row in trows:
            bench = benchmark_of(task, row["meta"])
            groups = _groups(task, bench, row["meta"])
            if bench == "refcoco":
                whole = f"[0, 0, {int(row['width'])}, {int(row['height'])}]"
                scored = score_answer(bench, whole, row, "original_pixels", None)
                pool.add("most frequent answer", groups, bench, scored, row["answer"])
                continue
            scored = score_answer(bench, frequent, row, None, None)
            pool.add("most frequent answer", groups, bench, scored, row["answer"])
            if bench == "vstar":
                p = 1.0 / len(row["meta"]["options"])
                pool.add("chance", groups, bench, {"metrics": {"acc": p, "acc_text": p}}, row["answer"])
    # POPE's chance row is the expectation of a fair coin: accuracy 0.5, recall 0.5, yes-ratio 0.5, precision = the
    # share of gold yes; computed exactly rather than sampled.
    for (method, g), (_, golds) in list(pool.pope.items()):
        if method != "most frequent answer":
            continue
        pos = golds.count("yes") / len(golds)
        f1 = 2 * pos * 0.5 / (pos + 0.5) if pos else 0.0
        pool.values[("chance", g)] = {
            "accuracy": [0.5] * len(golds),
            "precision": [pos] * len(golds),
            "recall": [0.5] * len(golds),
            "f1": [f1] * len(golds),
            "yes_ratio": [0.5] * len(golds),
        }


def benchmark_columns(scores: Mapping[str, Any], benchmarks: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(group, metric)`` columns of the benchmark table: per task its overall group first, then its categories."""
    groups = sorted({g for per in scores.values() for g in per}, key=lambda g: (g.split("/")[0], "/" in g, g))
    cols = []
    for g in groups:
        bench = benchmarks.get(g.split("/")[0])
        if bench is None:
            continue
        cols += [(g, m) for m in BENCHMARK_METRICS[bench] if any(m in scores.get(r, {}).get(g, {}) for r in scores)]
    return cols


def benchmark_table(bench: Mapping[str, Any], grounding: Mapping[str, Any], rows: Sequence[str]) -> str:
    """The papers' table: method rows (then the reference rows), benchmark metric columns, then each benchmark task's
    pointing and evidence mass (from :class:`klal.eval.metrics.GroundingMetrics`), as ``value (n)``."""
    scores, tasks = bench["metrics"], bench["benchmarks"]
    cols = benchmark_columns(scores, tasks)
    if not cols:
        return ""
    ground = [
        (t, m)
        for t in sorted(tasks)
        for m in ("pointing_game", "evidence_mass")
        if any(grounding.get(r, {}).get(t, {}).get(m, {}).get("count", 0) for r in rows)
    ]
    head = ["method", *[f"{g}: {m}" for g, m in cols], *[f"{t}: {m}" for t, m in ground]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*rows, *[b for b in BASELINE_ROWS if b in scores]]:
        cells = [r]
        for g, m in cols:
            s = scores.get(r, {}).get(g, {}).get(m)
            cells.append(f"{s['value']:.3f} ({s['count']})" if s else "-")
        for t, m in ground:
            s = grounding.get(r, {}).get(t, {}).get(m, {})
            cells.append(f"{s['value']:.3f} ({s['count']})" if s.get("count") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\nBenchmark metrics as each benchmark scores them (docs/benchmarks.md); `-`: the method gives no answer. "
        "Reference rows use the gold answers only (no question-blind model baseline is run).\n"
    )


__all__ = [
    "BASELINE_ROWS",
    "BENCHMARK_METRICS",
    "benchmark_columns",
    "benchmark_of",
    "benchmark_table",
    "dataset_rows",
    "score_answer",
    "score_benchmarks",
    "score_evaluation",
]
