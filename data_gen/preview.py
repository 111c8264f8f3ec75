"""Preview a klal dataset: a PNG grid of samples with question, answer, evidence and target map.

Each panel shows the original image with

* the evidence: boxes as green rectangles, points as green crosses, polylines as green lines;
* the target map the trainer would use (:func:`klal.data.targets.build_target_map`), computed on the token grid of the
  image as the model family's processor resizes it (``smart_resize`` with ``min_pixels``/``max_pixels``, 28 px per
  token on Qwen2.5-VL) and
  stretched back over the original image as a semi-transparent heat map, with the token grid as faint dotted lines;
* the question (wrapped) above and the answer, row id and token-grid size below.

A text-only row (no image) is drawn as a card with its question and answer.

Run it as ``python -m data_gen preview DIR --out preview.png [--split train] [--num 8]``; drawing uses matplotlib's
Agg canvas directly, so no display is needed and the global pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from klal.data.io import load_split, read_row
from klal.data.schema import Evidence
from klal.data.targets import TargetSpec
from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from klal.models.family import DEFAULT_MODEL_TYPE, family_for_type

EVIDENCE_COLOUR = "#00e000"


class PreviewError(ValueError):
    """The dataset, split or row range cannot be previewed; the message names the one at fault."""


def _draw_evidence(ax: Any, evidence: Evidence) -> None:
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in evidence.boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=EVIDENCE_COLOUR, linewidth=1.5))
    if evidence.points:
        pts = np.asarray(evidence.points, dtype=float)
        ax.plot(
            pts[:, 0], pts[:, 1], linestyle="none", marker="x", markersize=8, markeredgewidth=2, color=EVIDENCE_COLOUR
        )
    for line in evidence.polylines:
        p = np.asarray(line, dtype=float)
        ax.plot(p[:, 0], p[:, 1], color=EVIDENCE_COLOUR, linewidth=1.5)


def _target_map(evidence: Evidence, h: int, w: int, grid: tuple[int, int], spec: Any) -> tuple[np.ndarray | None, str]:
    """(map or None, note) for one image on its token ``grid``."""
    from klal.data.targets import TargetMapError, build_target_map_with_reason

    try:
        m, reason = build_target_map_with_reason(evidence, orig_hw=(h, w), grid=grid, spec=spec)
    except TargetMapError as e:
        return None, f"bad evidence: {e}"
    if m is None:
        return None, f"no map: {reason}"
    return np.asarray(m, dtype=float), f"map {m.shape[0]}x{m.shape[1]} tokens"


def render_preview(
    dataset: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    num: int = 8,
    start: int = 0,
    cols: int = 4,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model_type: str = DEFAULT_MODEL_TYPE,
    spec: TargetSpec | None = None,
    alpha: float = 0.4,
) -> Path:
    """Draw rows ``start .. start+num-1`` of ``split`` of the dataset at ``dataset`` into the PNG ``out``.

    Args:
        dataset: directory written by ``save_to_disk`` (a DatasetDict or a single Dataset).
        out: PNG path to write (its parent directory is created).
        split: split of a DatasetDict to draw from.
        num: number of samples (fewer when the split ends first).
        start: first row drawn.
        cols: panels per row of the figure.
        min_pixels: ``min_pixels`` of the processor resize the target map is computed for.
        max_pixels: ``max_pixels`` of that resize.
        model_type: the model family whose token grid the map is drawn on (``qwen2_5_vl``: 28-px tokens; ``qwen3_vl``:
            32 px; :data:`klal.models.family.FAMILY_MODULES` lists them).
        spec: how evidence becomes the target map (None: the defaults).
        alpha: opacity of the target-map heat map where the map is at its maximum (it fades to 0 with the value).

    Returns:
        The path of the written PNG.

    Raises:
        PreviewError: bad drawing options or an empty row range.
        FileNotFoundError / ValueError: a missing dataset or split (:func:`klal.data.io.load_split`).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if num < 1 or cols < 1 or start < 0:
        raise PreviewError(f"need num >= 1, cols >= 1, start >= 0; got num={num}, cols={cols}, start={start}")
    if min_pixels < 1 or min_pixels > max_pixels:
        raise PreviewError(f"need 1 <= min_pixels <= max_pixels; got min_pixels={min_pixels}, max_pixels={max_pixels}")
    try:
        family = family_for_type(model_type)
    except ValueError as e:
        raise PreviewError(str(e)) from None
    ds = load_split(dataset, split)
    if start >= len(ds):
        raise PreviewError(f"start={start} is past the end of split {split!r} ({len(ds)} rows)")
    rows = [read_row(ds, i, f"{dataset} [{split}]") for i in range(start, min(start + num, len(ds)))]
    spec = spec if spec is not None else TargetSpec()
    cmap = colormaps["turbo"]

    ncols = min(cols, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    titles = [textwrap.fill(str(r["question"]), width=44) for r in rows]
    title_lines = max(t.count("\n") + 1 for t in titles)
    panel_w, panel_h = 3.6, 3.6 + 0.13 * title_lines + 0.45
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows), dpi=100)
    for k, (row, title) in enumerate(zip(rows, titles)):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        if row.get("image") is None:  # a text-only row: a card with its question and answer, no image or map
            ax.text(0.5, 0.5, "text-only sample\n(no image, no target map)", ha="center", va="center", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7, loc="left")
            ax.set_xlabel(f"A: {row['answer']}\n" + textwrap.fill(f"{row['id']}, text-only", width=52), fontsize=7)
            continue
        image = row["image"]  # RGB and upright already (read_row)
        w, h = image.size
        evidence = Evidence.from_dict(row["evidence"])
        ax.imshow(image)
        gh, gw = family.grids_for_size(h, w, min_pixels, max_pixels)[0]
        m, note = _target_map(evidence, h, w, (gh, gw), spec)
        if m is not None:
            # Opacity grows with the map value, so cells without mass leave the image untouched; the processor keeps
            # the aspect ratio up to rounding to whole tokens, so stretching the token grid over the original image puts
            # each cell over the pixels it was made from.
            norm = m / max(float(m.max()), 1e-12)
            rgba = cmap(norm)
            rgba[..., 3] = alpha * norm
            ax.imshow(rgba, interpolation="nearest", extent=(0, w, h, 0))
        # The token grid, faint and dotted so it is not mistaken for lines of the image.
        for x in np.arange(1, gw) * w / gw:
            ax.axvline(x, color="tab:blue", linewidth=0.4, linestyle=":", alpha=0.4)
        for y in np.arange(1, gh) * h / gh:
            ax.axhline(y, color="tab:blue", linewidth=0.4, linestyle=":", alpha=0.4)
        _draw_evidence(ax, evidence)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7, loc="left")
        info = textwrap.fill(f"{row['id']}, {w}x{h} px -> {note}", width=52)
        ax.set_xlabel(f"A: {row['answer']}\n{info}", fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
