"""What an evaluation writes: the markdown table, the gallery PNGs, the range check of the scores, file names.

:func:`markdown_table` lays out :meth:`klal.eval.metrics.GroundingMetrics.compute` scores (rows: methods; columns:
``task: metric`` with sample counts; then cost per sample), :func:`save_gallery` draws one panel per sample (the
method's map over image 0, its top box, the evidence, gold and predicted answer), :func:`check_ranges` lists values
outside their documented range and :func:`slug` makes a row label file-name safe.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from klal.eval.metrics import METRIC_NAMES, METRIC_RANGES


def slug(text: str) -> str:
    """A file-name-safe version of a row label."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "method"


def json_default(o: Any) -> Any:
    """``json.dumps`` ``default=`` for numpy scalars and arrays."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
        scores: :meth:`klal.eval.metrics.GroundingMetrics.compute` output.
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

    from klal.session import sample_images
    from klal.viz import overlay

    n = len(items)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (row, res) in zip(axes.flat, items):
        image = sample_images(row)[0]
        said = f" | said {clip_text(res.answer, 14)!r}" if res.answer is not None else ""
        panel = f"{clip_text(str(row['id']), 24)}: gold {row['answer']!r}{said}"
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


def clip_text(text: str, n: int) -> str:
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


__all__ = ["SHORT", "check_ranges", "clip_text", "json_default", "markdown_table", "save_gallery", "slug"]
