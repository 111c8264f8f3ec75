"""Compare grounding methods on klal datasets: fine-tuned attention (a LoRA adapter), the base model's attention and
the training-free methods, on the same samples, in one table.

:func:`evaluate` runs every :class:`MethodSpec` over every dataset, scores each sample with
:class:`klal.metrics.GroundingMetrics` and writes ``results.json``, ``results.md`` (one table: rows are methods,
columns are per-task metrics with their sample counts, plus each method's cost per sample) and a gallery PNG per
method. ``evaluate.py`` is the command-line front end.

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
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from klal.grounding import GroundingError, GroundingModel, build_method
from klal.grounding.base import image_rows
from klal.metrics import METRIC_NAMES, METRIC_RANGES, GroundingMetrics
from klal.models.loader import ModelConfig
from klal.targets import TargetSpec

logger = logging.getLogger(__name__)


@dataclass
class MethodSpec:
    """One row of the comparison: a grounding method, its options, and which weights it runs on."""

    name: str
    """Registered method: attention_probe, localization_heads, entropy_gradient, vicrop_rel_att, vicrop_grad_att,
    laser."""
    label: str | None = None
    """Row label (default: the name, with " (adapter)" when it runs on the adapter)."""
    weights: Literal["base", "adapter"] = "base"
    """Run on the base weights or on base + adapter (needs ``adapter``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the method (see its class docstring)."""

    @property
    def row(self) -> str:
        """The table row label."""
        return self.label or (f"{self.name} (adapter)" if self.weights == "adapter" else self.name)


def default_methods(with_adapter: bool) -> list[MethodSpec]:
    """The base model's answer-token attention and, with an adapter, the fine-tuned model's."""
    probe = {"query": "generated_last"}
    rows = [MethodSpec("attention_probe", "base model attention", "base", dict(probe))]
    if with_adapter:
        rows.append(MethodSpec("attention_probe", "KLAL fine-tuned attention", "adapter", dict(probe)))
    return rows


@dataclass
class EvalConfig:
    """What to evaluate and where to write it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model: ``tiny``, a hub id or a local checkpoint directory."""
    adapter: str | None = None
    """peft adapter directory trained on ``model`` (rows with ``weights: adapter`` use it)."""
    data: list[str] = field(default_factory=list)
    """Dataset directories (``save_to_disk``, klal schema)."""
    split: str = "test"
    """Split to evaluate."""
    max_samples: int | None = None
    """Evaluate the first N samples of each dataset (text-only rows among them are skipped and counted)."""
    methods: list[MethodSpec] | None = None
    """Rows of the table (default: base attention, and fine-tuned attention when an adapter is given)."""
    prepare_split: str = "train"
    """Split whose samples methods that need preparation (localization-head discovery) see; falls back to ``split``."""
    prepare_samples: int = 64
    """How many samples that preparation sees (image rows only: text-only rows are passed over)."""
    target: TargetSpec = field(default_factory=TargetSpec)
    """Target maps for the KL metric (as in training)."""
    batch_size: int = 1
    """Samples per forward pass for the methods that batch (``attention_probe`` with ``prompt_last`` or
    ``answer_last``, ``localization_heads``); the others decode, crop or backpropagate per sample and run one at a
    time."""
    gallery_size: int = 6
    """Samples drawn in each method's gallery PNG (0: none)."""
    out: str = "runs/eval"
    """Output directory."""
    progress: bool = True
    """Show a progress bar."""


# -- inputs ---------------------------------------------------------------------------------------------------------


def load_split(path: str, split: str, max_samples: int | None = None) -> Any:
    """One split of a klal dataset on disk, checked for the schema's columns.

    Raises:
        FileNotFoundError: no dataset directory at ``path``.
        ValueError: missing split or columns (the message names the dataset).
    """
    import datasets

    from klal.data.schema import check_columns

    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset directory not found: {path}")
    dd = datasets.load_from_disk(path)
    if isinstance(dd, datasets.Dataset):
        raise ValueError(f"{path} is a single Dataset; klal expects a DatasetDict with splits (train/validation/test)")
    if split not in dd:
        raise ValueError(f"{path} has no split {split!r} (has {list(dd)})")
    ds = dd[split]
    check_columns(ds, f"{path} [{split}]")
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def check_config(cfg: EvalConfig) -> list[MethodSpec]:
    """Validate everything that can be checked before loading a model; returns the resolved method rows.

    Raises:
        GroundingError: unknown method or options, adapter rows without an adapter, duplicate row labels, or an
            evaluated image smaller than a cropping method's ``min_crop``.
        ValueError / FileNotFoundError: no datasets, a dataset that is missing or lacks columns, bad ``batch_size``.
    """
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    methods = cfg.methods if cfg.methods else default_methods(bool(cfg.adapter))
    methods = [m if isinstance(m, MethodSpec) else MethodSpec(**m) for m in methods]
    built = []
    for m in methods:
        built.append(build_method(m.name, **m.options))  # unknown names and options fail here, before any model
        if m.weights not in ("base", "adapter"):
            raise GroundingError(f"method row {m.row!r}: 'weights' must be base or adapter, got {m.weights!r}")
        if m.weights == "adapter" and not cfg.adapter:
            raise GroundingError(f"method row {m.row!r} runs on the adapter, but no --adapter was given")
    labels = [m.row for m in methods]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise GroundingError(f"duplicate method row labels {dupes}: give each row a distinct 'label'")
    if not cfg.data:
        raise ValueError("no datasets given (--data DIR [DIR ...])")
    for path in cfg.data:
        load_split(path, cfg.split, 1)
    croppers = [(m, float(b.min_crop)) for m, b in zip(methods, built) if getattr(b, "min_crop", None)]
    if croppers:
        for path in cfg.data:
            # Text-only rows are 0 x 0 px by the schema; they are skipped, not cropped, so they are not checked.
            check_crop_sizes(image_rows(load_split(path, cfg.split, cfg.max_samples))[0], path, croppers)
    return methods


def check_crop_sizes(ds: Any, path: str, croppers: Sequence[tuple[MethodSpec, float]]) -> None:
    """Refuse a dataset with an image smaller than a cropping method's ``min_crop`` before any model runs.

    Reads only the ``id``, ``width`` and ``height`` columns (image 0's size, as the schema records it). Give it image
    rows only (:func:`klal.grounding.base.image_rows`): a text-only row's 0 x 0 would be refused.

    Raises:
        GroundingError: naming the method row, the option, the dataset and the first sample that is too small.
    """
    ids, widths, heights = ds["id"], ds["width"], ds["height"]
    for spec, min_crop in croppers:
        for sid, w, h in zip(ids, widths, heights):
            if w < min_crop or h < min_crop:
                raise GroundingError(
                    f"{spec.row}: sample {sid!r} of {path} has an image of {w} x {h} px, smaller than option "
                    f"min_crop={min_crop:g} px on at least one axis; lower min_crop or leave the sample out"
                )


@contextlib.contextmanager
def _weights(gm: GroundingModel, on: str) -> Iterator[None]:
    disable = getattr(gm.model, "disable_adapter", None)
    if on == "base" and callable(disable):
        with disable():
            yield
    else:
        yield


# -- the run ----------------------------------------------------------------------------------------------------------


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
    methods = check_config(cfg)
    if gm is None:
        gm = GroundingModel.load(cfg.model, cfg.adapter)
    splits: dict[str, Any] = {}
    text_only: dict[str, int] = {}
    for path in cfg.data:
        loaded = load_split(path, cfg.split, cfg.max_samples)
        # Chunks for run_batch are cut from the image rows, so a dataset with text rows mixed in batches (and scores)
        # its image rows exactly as a dataset of those image rows alone would.
        splits[path], text_only[path] = image_rows(loaded)
        if text_only[path]:
            logger.warning(
                "%s [%s]: skipping %d text-only row(s) of %d (no image to ground); evaluating %d",
                path,
                cfg.split,
                text_only[path],
                len(loaded),
                len(splits[path]),
            )
    metrics = GroundingMetrics(spec=cfg.target)
    cost: dict[str, dict[str, float]] = {}
    per_sample: dict[str, list[dict[str, Any]]] = {}
    galleries: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    total = sum(len(ds) for ds in splits.values())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    for spec in methods:
        method = build_method(spec.name, **spec.options)
        with _weights(gm, spec.weights):
            prepare = getattr(method, "prepare", None)
            if callable(prepare):
                prepare(gm, _prepare_rows(cfg))
            bar = tqdm(total=total, desc=spec.row, disable=not cfg.progress, leave=False)
            if any(text_only.values()):
                bar.set_postfix_str(f"{sum(text_only.values())} text-only rows skipped")
            sums = {"forward": 0.0, "backward": 0.0, "seconds": 0.0}
            n = 0
            rows_out: list[dict[str, Any]] = []
            gallery: list[tuple[dict[str, Any], Any]] = []
            run_batch = getattr(method, "run_batch", None) if cfg.batch_size > 1 else None
            for path, ds in splits.items():
                for start in range(0, len(ds), cfg.batch_size):
                    chunk = [ds[i] for i in range(start, min(start + cfg.batch_size, len(ds)))]
                    try:
                        results = run_batch(gm, chunk) if callable(run_batch) else [method.run(gm, r) for r in chunk]
                    except GroundingError as e:
                        ids = ", ".join(repr(r.get("id")) for r in chunk)
                        raise GroundingError(f"{spec.row} on {path} sample(s) {ids}: {e}") from e
                    for row, res in zip(chunk, results):
                        metrics.update_result(spec.row, res, row)
                        _check_finite_maps(res, spec.row, row)
                        sums["forward"] += res.passes.get("forward", 0)
                        sums["backward"] += res.passes.get("backward", 0)
                        sums["seconds"] += res.seconds
                        n += 1
                        rows_out.append(
                            {
                                "id": row["id"],
                                "task": row["task"],
                                "dataset": path,
                                "answer": res.answer,
                                "gold": row["answer"],
                                "boxes": [list(map(float, b)) for b in res.boxes],
                                "passes": res.passes,
                                "seconds": res.seconds,
                            }
                        )
                        if len(gallery) < cfg.gallery_size:
                            gallery.append((row, res))
                        bar.update(1)
            bar.close()
        cost[spec.row] = {f"{k}_per_sample": v / max(n, 1) for k, v in sums.items()}
        per_sample[spec.row] = rows_out
        galleries[spec.row] = gallery

    scores = metrics.compute()
    results = {
        "model": cfg.model.name_or_path,
        "adapter": cfg.adapter,
        "split": cfg.split,
        "datasets": list(cfg.data),
        "text_only_skipped": text_only,
        "methods": [asdict(m) | {"row": m.row} for m in methods],
        "metrics": scores,
        "cost": cost,
        "samples": per_sample,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    table = markdown_table(scores, cost, [m.row for m in methods], text_only)
    (out / "results.md").write_text(table + "\n")
    for row_label, gallery in galleries.items():
        if gallery:
            save_gallery(gallery, out / f"gallery_{slug(row_label)}.png", title=row_label)
    return results


def _prepare_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Rows a method may prepare on (localization-head discovery): the first image rows of the prepare split, else of
    the evaluated split. Discovery runs over image-text pairs, so text-only rows are passed over (and logged)."""
    rows: list[dict[str, Any]] = []
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


def _check_finite_maps(res: Any, label: str, row: dict[str, Any]) -> None:
    for j, m in enumerate(res.maps):
        if not np.all(np.isfinite(np.asarray(m, dtype=np.float64))):
            raise FloatingPointError(f"{label}: non-finite relevance map for image {j} of sample {row.get('id')!r}")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def slug(text: str) -> str:
    """A file-name-safe version of a row label."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "method"


# -- reporting ------------------------------------------------------------------------------------------------------

SHORT = {
    "pointing_game": "point",
    "evidence_mass": "mass",
    "target_kl": "KL",
    "box_iou": "IoU",
    "box_accuracy": "Acc@0.5",
    "answer_accuracy": "answer",
}


def markdown_table(
    scores: dict[str, Any],
    cost: dict[str, dict[str, float]],
    rows: Sequence[str],
    text_only_skipped: dict[str, int] | None = None,
) -> str:
    """Rows are methods; columns are ``task: metric`` as ``value (n)``, metrics without samples left out; then cost.

    Args:
        scores: :meth:`klal.metrics.GroundingMetrics.compute` output.
        cost: per-row ``forward_per_sample``, ``backward_per_sample``, ``seconds_per_sample``.
        rows: row order.
        text_only_skipped: per dataset, text-only rows left out; datasets with any get a line under the table.
    """
    tasks = sorted({t for r in rows for t in scores.get(r, {})})
    cols = [
        (t, name)
        for t in tasks
        for name in METRIC_NAMES
        if any(scores.get(r, {}).get(t, {}).get(name, {}).get("count", 0) > 0 for r in rows)
    ]
    head = ["method", *[f"{t}: {SHORT[n]}" for t, n in cols], "fwd/sample", "bwd/sample", "s/sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r]
        for t, name in cols:
            s = scores.get(r, {}).get(t, {}).get(name, {})
            cells.append(f"{s['value']:.3f} ({s['count']})" if s.get("count", 0) > 0 else "-")
        c = cost.get(r, {})
        cells += [
            f"{c.get('forward_per_sample', 0):.1f}",
            f"{c.get('backward_per_sample', 0):.1f}",
            f"{c.get('seconds_per_sample', 0):.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    legend = ", ".join(f"{v} = {k}" for k, v in SHORT.items())
    text = "\n".join(lines) + f"\n\nValues are means over the samples counted in brackets ({legend}).\n"
    skipped = {path: n for path, n in (text_only_skipped or {}).items() if n}
    if skipped:
        listed = "; ".join(f"{path}: {n}" for path, n in skipped.items())
        text += f"\nText-only rows skipped (no image to ground; in no count above): {listed}.\n"
    return text


def save_gallery(items: Sequence[tuple[dict[str, Any], Any]], path: Path, title: str = "") -> None:
    """One panel per sample: the method's map over image 0, its top box (red), the evidence (green), the answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from klal.grounding.base import sample_images
    from klal.viz import overlay

    n = len(items)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (row, res) in zip(axes.flat, items):
        image = sample_images(row)[0]
        said = f" | said {_clip(res.answer, 14)!r}" if res.answer is not None else ""
        panel = f"{_clip(str(row['id']), 24)}: gold {row['answer']!r}{said}"
        overlay(ax, image, res.maps[0] if res.maps else None, title=panel)
        ev = row.get("evidence") or {}
        for x0, y0, x1, y1 in ev.get("boxes") or []:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
        for x, y in ev.get("points") or []:
            ax.plot([x], [y], marker="+", color="lime", ms=10, mew=2)
        for line in ev.get("polylines") or []:
            xs, ys = zip(*line)
            ax.plot(xs, ys, color="lime", lw=1, alpha=0.8)
        for x0, y0, x1, y1 in res.boxes[:1]:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red", lw=1.5, ls="--"))
    fig.suptitle(f"{title}  (map: heat, method box: red dashed, evidence: green)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _clip(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters (ending in "..." when cut), so panel titles do not run into each other."""
    return text if len(text) <= n else text[: n - 3] + "..."


def check_ranges(scores: dict[str, Any]) -> list[str]:
    """Metric values outside their documented range (an empty list when everything is in range)."""
    bad = []
    for method, tasks in scores.items():
        for task, ms in tasks.items():
            for name, s in ms.items():
                lo, hi = METRIC_RANGES[name]
                v = s["value"]
                if not (lo - 1e-9 <= v <= hi + 1e-9) or math.isnan(v):
                    bad.append(f"{method}/{task}/{name} = {v}")
    return bad


__all__ = [
    "EvalConfig",
    "MethodSpec",
    "check_config",
    "check_ranges",
    "default_methods",
    "evaluate",
    "load_split",
    "markdown_table",
    "save_gallery",
]
