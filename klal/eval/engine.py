"""The one evaluation loop: grounding methods over dataset rows, scored by :class:`~klal.eval.metrics.GroundingMetrics`.

:func:`run_method` is the loop every caller shares: ``evaluate.py`` (:func:`evaluate`), the
:class:`~klal.callbacks.GroundingProbes` callback, the reproduction study and the demo. It calls ``method.prepare``
once on the rows it is given for preparation, then ``method.run_batch`` (``method.run`` per row when batches are one
row), updates the metrics, checks the maps, and collects one record per sample, the gallery items and the cost.

:func:`evaluate` runs every :class:`~klal.eval.config.MethodSpec` over every dataset and writes ``results.json``,
``results.md`` (one table: rows are methods, columns are per-task metrics with their sample counts, plus each method's
cost per sample) and a gallery PNG per method. Each dataset is loaded and filtered once, each method built once, and
everything that can be checked (options, rows, data, crop sizes, a writable ``--out``) is checked before any model
loads. The outputs are written all or none: into a temporary folder moved into ``--out`` at the end
(:func:`klal.atomic.atomic_output_dir`), so a full disk or Ctrl-C leaves nothing half-written, and an OS error
names the output folder.

The base model is loaded once. With an adapter, methods marked ``weights: adapter`` run on the LoRA model and the
others on the same weights with the adapter switched off (peft's ``disable_adapter``), so base and fine-tuned rows share
every other setting.

Text-only rows (``image`` None, see :mod:`klal.data.schema`) have nothing to ground: they are left out of every
method's run, of the crop-size check and of the rows methods prepare on, and never silently. Per dataset, the number
left out is logged, recorded as ``text_only_skipped`` in ``results.json`` and stated under the table in ``results.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from klal.atomic import atomic_output_dir, check_writable
from klal.data.io import load_split, read_row
from klal.eval.benchmarks import benchmark_table, score_evaluation
from klal.eval.config import EvalConfig, MethodSpec
from klal.eval.html_report import write_html_report
from klal.eval.metrics import GroundingMetrics
from klal.eval.report import json_default, markdown_table, save_gallery, slug
from klal.grounding import GroundingError, GroundingModel, build_method
from klal.grounding.base import GroundingMethod
from klal.session import image_rows

logger = logging.getLogger(__name__)

Row = dict[str, Any]


@dataclass
class MethodRun:
    """What one method row gave over the rows it ran on."""

    row: str
    """The row label (the metrics' method key)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """One JSON-ready record per sample: ``id``, ``task``, ``dataset``, ``answer``, ``gold``, ``boxes``, ``passes``,
    ``seconds``."""
    gallery: list[tuple[Row, Any]] = field(default_factory=list)
    """The first ``gallery_size`` ``(row, GroundingResult)`` pairs."""
    results: list[Any] = field(default_factory=list)
    """Every ``GroundingResult`` in sample order (kept only with ``keep_results``)."""
    totals: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0, "seconds": 0.0})

    @property
    def cost(self) -> dict[str, float]:
        """``forward_per_sample``, ``backward_per_sample``, ``seconds_per_sample``."""
        n = max(len(self.samples), 1)
        return {f"{k}_per_sample": v / n for k, v in self.totals.items()}


def run_method(
    gm: GroundingModel,
    label: str,
    method: GroundingMethod,
    datasets: Mapping[str, Sequence[Row]],
    metrics: GroundingMetrics,
    prepare_rows: Sequence[Row] = (),
    batch_size: int = 1,
    gallery_size: int = 0,
    progress: bool = False,
    keep_results: bool = False,
) -> MethodRun:
    """Run one method over every dataset's rows and score each sample into ``metrics`` under ``label``.

    Args:
        gm: the model, on the weights the method should see (see :func:`adapter_weights`).
        label: row label: the metrics' method key and the name in error messages.
        method: a built method.
        datasets: dataset name -> image rows (text-only rows already left out, see :func:`image_datasets`).
        metrics: where the scores go.
        prepare_rows: rows ``method.prepare`` sees (localization-head discovery), image rows only.
        batch_size: rows per ``method.run_batch`` call; 1 runs ``method.run`` row by row.
        gallery_size: how many ``(row, result)`` pairs to keep for a picture.
        progress: show a progress bar.
        keep_results: also keep every result (:attr:`MethodRun.results`).

    Raises:
        GroundingError: a method's error, prefixed with the row label, dataset and sample ids.
        FloatingPointError: a method returned a non-finite map.
    """
    out = MethodRun(label)
    # A method that never predicts boxes (the teacher-forced attention) is skipped by the box metrics, not scored 0.
    boxes = method.predicts_boxes
    method.prepare(gm, list(prepare_rows))
    bar = tqdm(total=sum(len(rows) for rows in datasets.values()), desc=label, disable=not progress, leave=False)
    try:
        for name, rows in datasets.items():
            for start in range(0, len(rows), batch_size):
                chunk = [read_row(rows, i, name) for i in range(start, min(start + batch_size, len(rows)))]
                try:
                    results = method.run_batch(gm, chunk) if batch_size > 1 else [method.run(gm, r) for r in chunk]
                except GroundingError as e:
                    ids = ", ".join(repr(r.get("id")) for r in chunk)
                    raise GroundingError(f"{label} on {name} sample(s) {ids}: {e}") from e
                for row, res in zip(chunk, results):
                    _record(out, name, row, res, metrics, boxes, gallery_size, keep_results)
                bar.update(len(chunk))
    finally:
        bar.close()
    return out


def _record(
    out: MethodRun, name: str, row: Row, res: Any, metrics: GroundingMetrics, boxes: bool, gallery_size: int, keep: bool
) -> None:
    metrics.update_result(out.row, res, row, predicts_boxes=boxes)
    for j, m in enumerate(res.maps):
        if not np.all(np.isfinite(np.asarray(m, dtype=np.float64))):
            raise FloatingPointError(f"{out.row}: non-finite relevance map for image {j} of sample {row.get('id')!r}")
    out.totals["forward"] += res.passes.get("forward", 0)
    out.totals["backward"] += res.passes.get("backward", 0)
    out.totals["seconds"] += res.seconds
    out.samples.append(
        {
            "id": row["id"],
            "task": row["task"],
            "dataset": name,
            "answer": res.answer,
            "gold": row["answer"],
            "boxes": [list(map(float, b)) for b in res.boxes],
            "passes": res.passes,
            "seconds": res.seconds,
        }
    )
    if len(out.gallery) < gallery_size:
        out.gallery.append((row, res))
    if keep:
        out.results.append(res)


@contextlib.contextmanager
def adapter_weights(gm: GroundingModel, on: str) -> Iterator[None]:
    """Run the block on the base weights (``on="base"``: a peft model's adapter switched off) or as loaded."""
    disable = getattr(gm.model, "disable_adapter", None)
    if on == "base" and callable(disable):
        with disable():
            yield
    else:
        yield


# -- evaluate.py ------------------------------------------------------------------------------------------------------


@dataclass
class EvalPlan:
    """An evaluation checked and ready to run: its method rows built once and its datasets loaded once."""

    specs: list[MethodSpec]
    methods: list[GroundingMethod]
    datasets: dict[str, Any]
    """Dataset path -> its image rows (a ``datasets.Dataset``, images not decoded yet)."""
    text_only: dict[str, int]
    """Dataset path -> text-only rows left out."""


def image_datasets(paths: Sequence[str], split: str, max_samples: int | None) -> tuple[dict[str, Any], dict[str, int]]:
    """Each dataset's split (first ``max_samples`` rows) with its text-only rows left out (and logged).

    Returns:
        ``(rows, skipped)``: path -> image rows, path -> text-only rows left out.
    """
    rows: dict[str, Any] = {}
    skipped: dict[str, int] = {}
    for path in paths:
        loaded = load_split(path, split, max_samples)
        # Chunks for run_batch are cut from the image rows, so a dataset with text rows mixed in batches (and scores)
        # its image rows exactly as a dataset of those image rows alone would.
        rows[path], skipped[path] = image_rows(loaded)
        if skipped[path]:
            logger.warning(
                "%s [%s]: skipping %d text-only row(s) of %d (no image to ground); evaluating %d",
                path,
                split,
                skipped[path],
                len(loaded),
                len(rows[path]),
            )
    return rows, skipped


def check_config(cfg: EvalConfig) -> EvalPlan:
    """Validate everything that can be checked before loading a model; load the datasets and build the methods.

    Raises:
        GroundingError: unknown method or options, adapter rows without an adapter, duplicate row labels, or an
            evaluated image smaller than a cropping method's minimum crop.
        ValueError / FileNotFoundError: no datasets, a dataset that is missing or lacks columns, bad ``batch_size``.
    """
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    cfg.check_adapter_rows()
    specs = cfg.method_rows()
    methods = []
    for m in specs:
        methods.append(build_method(m.name, **m.options))  # unknown names and options fail here, before any model
        if m.weights not in ("base", "adapter"):
            raise GroundingError(f"method row {m.row!r}: 'weights' must be base or adapter, got {m.weights!r}")
    labels = [m.row for m in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise GroundingError(f"duplicate method row labels {dupes}: give each row a distinct 'label'")
    if not cfg.data:
        raise ValueError("no datasets given (--data DIR, or a list: --data '[DIR, DIR]')")
    datasets, text_only = image_datasets(cfg.data, cfg.split, cfg.max_samples)
    for path, rows in datasets.items():
        # Only the id/width/height columns are read (image 0's size, as the schema records it); text-only rows, 0 x 0
        # px by the schema, are not among the rows, as they are skipped rather than cropped.
        sizes = list(zip(rows["id"], rows["width"], rows["height"]))
        for spec, method in zip(specs, methods):
            try:
                method.check_sizes(sizes, path)
            except GroundingError as e:
                # The method names itself; a row with its own label is named too.
                raise (GroundingError(f"{spec.row}: {e}") if spec.row != method.name else e) from None
    return EvalPlan(specs, methods, datasets, text_only)


def prepare_rows(cfg: EvalConfig) -> list[Row]:
    """Rows a method may prepare on (localization-head discovery): the first image rows of the prepare split, else of
    the evaluated split, spread over the datasets. Discovery runs over image-text pairs, so text-only rows are passed
    over (and logged)."""
    rows: list[Row] = []
    per = max(1, math.ceil(cfg.prepare_samples / max(len(cfg.data), 1)))
    for path in cfg.data:
        split = cfg.prepare_split
        try:
            ds = load_split(path, split)
        except ValueError:
            split = cfg.split
            ds = load_split(path, split)
        kept, skipped = image_rows(ds, per)
        if skipped:
            logger.info("%s [%s]: preparation passed over %d text-only row(s)", path, split, skipped)
        rows.extend(kept)
    return rows[: cfg.prepare_samples]


def evaluate(cfg: EvalConfig, gm: GroundingModel | None = None) -> dict[str, Any]:
    """Run every method over every dataset; write ``results.json``, ``results.md`` and gallery PNGs to ``cfg.out``.

    Args:
        cfg: the evaluation.
        gm: an already loaded model (default: load ``cfg.model`` + ``cfg.adapter``).

    Text-only rows of the evaluated rows are skipped: they reach no method and no metric, and their number per
    dataset is logged, stored as ``text_only_skipped`` and stated in ``results.md``.

    Returns:
        The dict written to ``results.json``.
    """
    plan = check_config(cfg)
    # An unwritable --out fails at once, before the (long) run; nothing is written until the run is done.
    check_writable(cfg.out, "--out")
    if gm is None:
        gm = GroundingModel.load(cfg.model, cfg.adapter)
    prep = prepare_rows(cfg)
    # The evidence is laid on each map through its tokens' footprints in the original image (the family's geometry).
    metrics = GroundingMetrics(spec=cfg.target, footprint_of=lambda h, w: gm.family.map_footprint(gm.processor, h, w))
    runs: dict[str, MethodRun] = {}
    for spec, method in zip(plan.specs, plan.methods):
        with adapter_weights(gm, spec.weights):
            runs[spec.row] = run_method(
                gm,
                spec.row,
                method,
                plan.datasets,
                metrics,
                prepare_rows=prep,
                batch_size=cfg.batch_size,
                gallery_size=cfg.gallery_size,
                progress=cfg.progress,
                keep_results=True,  # the maps of report.html and the per-sample pointing / mass
            )
    scores = metrics.compute()
    bench = score_evaluation(runs, plan.datasets, gm, cfg.model)
    cost = {row: run.cost for row, run in runs.items()}
    results = {
        "model": cfg.model.name_or_path,
        "adapter": cfg.adapter,
        "split": cfg.split,
        "datasets": list(cfg.data),
        "text_only_skipped": plan.text_only,
        "methods": [asdict(m) | {"row": m.row} for m in plan.specs],
        "metrics": scores,
        "benchmark_metrics": bench["metrics"],
        "benchmarks": bench["benchmarks"],
        "cost": cost,
        "samples": {row: run.samples for row, run in runs.items()},
    }
    table = markdown_table(scores, cost, [m.row for m in plan.specs], plan.text_only)
    paper = benchmark_table(bench, scores, [m.row for m in plan.specs])
    table = f"{paper}\n{table}" if paper else table

    def write(folder: str) -> None:
        out = Path(folder)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=json_default))
        (out / "results.md").write_text(table + "\n")
        write_html_report(out / "report.html", results, runs, plan.datasets)
        for row, run in runs.items():
            if run.gallery:
                save_gallery(run.gallery, out / f"gallery_{slug(row)}.png", title=row)

    # All outputs or none: written in a temporary folder and moved into --out at the end, so a full disk or Ctrl-C
    # leaves no results.json without its table, and no half-drawn gallery.
    atomic_output_dir(write, cfg.out)
    return results


__all__ = [
    "EvalPlan",
    "MethodRun",
    "adapter_weights",
    "check_config",
    "evaluate",
    "image_datasets",
    "prepare_rows",
    "run_method",
]
