"""Numpy building blocks shared by the training-free grounding methods.

Grids are 2-D float arrays ``(gh, gw)`` over ONE image's LLM visual-token grid (the family's map grid), row-major;
one cell is one visual token. Boxes come in two units:

* cell boxes ``(r0, c0, r1, c1)``: integer grid rows/columns, end-exclusive (cells ``r0 <= r < r1``,
  ``c0 <= c < c1``);
* pixel boxes ``(x0, y0, x1, y1)``: floats in ORIGINAL image pixels. Where a cell is in the original image is its
  token's footprint (:class:`klal.geometry.Footprint`, from the model family:
  :meth:`klal.models.family.VLMFamily.map_footprint`); the unit changes take one in place of ``grid_hw``. Given only
  ``(gh, gw)``, a cell is ``W / gw`` px wide and ``H / gh`` px tall (equal cells over the whole image: exact on the
  Qwen families, whose processors resize the whole image by one scale per axis into 28-px tokens, 32 px on Qwen3-VL
  and Qwen3.5).

Nothing here touches a model: the functions take and return numpy arrays and python numbers, so they are cheap to test
and reuse (localization heads, EGG, ViCrop, LASER). Bad input raises ``ValueError`` naming the argument at fault.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from klal.geometry import Footprint, ImageGrid

CellBox = tuple[int, int, int, int]
PixelBox = tuple[float, float, float, float]

# Tolerance for float -> cell conversions: cells_to_pixels followed by pixels_to_cells must give the same cells even
# though c * (W / gw) * (gw / W) is not exactly c in floating point.
_CELL_EPS = 1e-9

_SMOOTH_MODES = ("nearest", "reflect", "mirror", "wrap", "constant")


class CropTooSmallError(ValueError):
    """The image is smaller than the minimum crop side on some axis, so no crop of that size fits."""


@dataclass
class Region:
    """A connected region of a relevance grid.

    Attributes:
        box: ``(r0, c0, r1, c1)`` in grid cells, end-exclusive (after any aspect cap, so it may extend beyond or cut
            into ``mask``).
        mass: raw (unsmoothed) relevance summed over the component's cells.
        mask: bool ``(gh, gw)``, the component's cells.
    """

    box: CellBox
    mass: float
    mask: np.ndarray = field(repr=False)


# ----------------------------------------------------------------------------------------------------------- checks


def _as_grid(grid: np.ndarray, name: str = "grid") -> np.ndarray:
    """``grid`` as a finite 2-D float64 array, or ValueError naming ``name``."""
    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (gh, gw) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def _check_grid_hw(grid_hw: Sequence[int]) -> tuple[int, int]:
    vals = tuple(grid_hw)
    if len(vals) != 2 or any(int(v) != v or v <= 0 for v in vals):
        raise ValueError(f"grid_hw must be two positive integers (gh, gw), got {vals}")
    return int(vals[0]), int(vals[1])


def _check_image_wh(image_wh: Sequence[float]) -> tuple[float, float]:
    vals = tuple(float(v) for v in image_wh)
    if len(vals) != 2 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"image_wh must be two positive finite sizes (width, height), got {tuple(image_wh)}")
    return vals[0], vals[1]


def _check_cell_box(box: Sequence[int], grid_hw: tuple[int, int] | None = None) -> CellBox:
    if len(box) != 4:
        raise ValueError(f"cell box must be (r0, c0, r1, c1), got {box!r}")
    if any(int(v) != v for v in box):
        raise ValueError(f"cell box must have integer coordinates, got {tuple(box)}")
    r0, c0, r1, c1 = (int(v) for v in box)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"cell box {tuple(box)} is empty (need r1 > r0 and c1 > c0)")
    if grid_hw is not None:
        gh, gw = grid_hw
        if r0 < 0 or c0 < 0 or r1 > gh or c1 > gw:
            raise ValueError(f"cell box {tuple(box)} lies outside the grid {grid_hw}")
    return r0, c0, r1, c1


def _check_pixel_box(box_px: Sequence[float]) -> PixelBox:
    if len(box_px) != 4:
        raise ValueError(f"pixel box must be (x0, y0, x1, y1), got {box_px!r}")
    x0, y0, x1, y1 = (float(v) for v in box_px)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"pixel box {tuple(box_px)} has a NaN or inf coordinate")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"pixel box {tuple(box_px)} has x1 < x0 or y1 < y0")
    return x0, y0, x1, y1


# ------------------------------------------------------------------------------------------------------------ elbow


def chord_elbow(values: Sequence[float] | np.ndarray) -> int:
    """Index of the elbow of a curve by the chord method.

    The curve is ``(i, values[i])``. Both axes are rescaled to ``[0, 1]`` (index by ``n - 1``, values by their range)
    so the answer does not depend on units; the elbow is the point with the largest perpendicular distance from the
    straight line (chord) through the first and last points. Ties go to the lowest index.

    Args:
        values: 1-D finite curve, in the order given (callers sort it if they want a sorted curve).

    Returns:
        An index into ``values``. Curves with fewer than 3 points have no interior point and give 0, as does a
        curve with no point off the chord (a flat or straight curve).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values contains NaN or inf")
    n = v.size
    if n < 3:
        return 0
    x = np.arange(n, dtype=np.float64) / (n - 1)
    span = v.max() - v.min()
    y = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    # Distance from the line through p0 and p1: |cross(p1 - p0, p - p0)| / |p1 - p0|. |p1 - p0| >= 1 because the
    # x extent is 1, so there is no division by zero.
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    dist = np.abs(dx * (y - y[0]) - dy * (x - x[0])) / math.hypot(dx, dy)
    # Round off float noise so that "equal" distances tie exactly and the lowest index wins.
    dist = np.round(dist, 12)
    if dist.max() <= 0:
        return 0
    return int(np.argmax(dist))


def elbow_threshold(values: Sequence[float] | np.ndarray) -> float:
    """Value at the chord elbow of ``values`` sorted in ascending order (the authors' ``elbow_chord``).

    The sorted curve is ``(i, v_i)``; the elbow is the point farthest from the chord through its first and last
    points (:func:`chord_elbow`; the distance to a line only scales when an axis is rescaled, so raw and normalised
    axes pick the same point). On exact ties the lowest value wins, and two or fewer values give the smallest, as in
    the entropy-gradient-grounding release. A flat curve gives its (only) value.

    Args:
        values: finite values of any shape (flattened); at least one.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values is empty; elbow_threshold needs at least one value")
    ascending = np.sort(v)
    return float(ascending[chord_elbow(ascending)])


# ------------------------------------------------------------------------------------------------- maps and blobs


def gaussian_smooth(grid: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    """Gaussian-smooth a grid (``scipy.ndimage.gaussian_filter``).

    ``mode`` is scipy's boundary mode. ``"nearest"`` (klal's default) replicates the border cells outward, so evidence
    at the image border is not dimmed relative to evidence in the middle. ``"reflect"`` (scipy's default, which the
    entropy-gradient-grounding release uses) mirrors the grid about its edge; ``"constant"`` pads with zeros and
    leaks border mass into the padding.

    Args:
        grid: finite 2-D grid.
        sigma: standard deviation in cells; 0 returns a copy.
        mode: ``"nearest"``, ``"reflect"``, ``"mirror"``, ``"wrap"`` or ``"constant"``.
    """
    arr = _as_grid(grid)
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if mode not in _SMOOTH_MODES:
        raise ValueError(f"mode must be one of {', '.join(_SMOOTH_MODES)}, got {mode!r}")
    if sigma == 0:
        return arr.copy()
    return ndimage.gaussian_filter(arr, sigma=sigma, mode=mode)


def connected_components(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Label the connected components of a 2-D bool mask.

    Args:
        mask: 2-D array, truthy cells are foreground.
        connectivity: 4 (edge neighbours) or 8 (edges and corners).

    Returns:
        ``(labels, n)``: int array of the mask's shape with 0 for background and 1..n for the components (numbered
        in row-major order of their first cell), and the number of components.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n = ndimage.label(m, structure=structure)
    return labels.astype(np.int64, copy=False), int(n)


def spatial_entropy_count(grid: np.ndarray, mean_scale: float = 1.0, floor: float = 1e-3) -> tuple[float, int]:
    """Spatial entropy of a map and the number of components it counts (see :func:`spatial_entropy`)."""
    a = _as_grid(grid)
    b = np.maximum(a - float(mean_scale) * a.mean(), 0.0)
    total = float(b.sum())
    if not total > 0:
        return math.inf, 0
    labels, n = connected_components(b > float(floor), connectivity=8)
    if n == 0:
        return 0.0, 0
    p = np.asarray(ndimage.sum_labels(b, labels, index=np.arange(1, n + 1)), dtype=np.float64) / total
    p = p[p > 0]
    # + 0.0 turns the -0.0 of a single component into 0.0.
    return float(-(p * np.log(p)).sum()) + 0.0, int(n)


def spatial_entropy(grid: np.ndarray, mean_scale: float = 1.0, floor: float = 1e-3) -> float:
    """Spatial entropy of a map, as the localization-heads and entropy-gradient-grounding releases compute it.

    ``B = ReLU(A - mean_scale * mean(A))``; the connected components (8-connectivity) of the cells with
    ``B > floor`` get ``p_i = (sum of B over component i) / (sum of B over ALL cells)``, and
    ``H = -sum_i p_i log p_i`` (natural log). The shares need not sum to 1: B below the floor counts in the
    denominator only. One component holding all of B gives 0; k equal components holding all of it give ``log k``.

    ``floor`` is absolute, in the units of ``grid`` (localization heads: 0.001 on raw attention; EGG's stopping
    statistic: the chord elbow of the map itself).

    Args:
        grid: finite 2-D map.
        mean_scale: multiple of the mean subtracted (1 for localization heads, 2 for EGG's stopping statistic).
        floor: cells of ``B`` must exceed this to count.

    Returns:
        The entropy in nats; ``+inf`` when ``B`` sums to 0 (e.g. a flat map), and ``0`` when ``B`` is positive
        somewhere but no cell exceeds the floor (:func:`spatial_entropy_count` tells that case from one component).
    """
    return spatial_entropy_count(grid, mean_scale, floor)[0]


def mask_to_box(mask: np.ndarray) -> CellBox | None:
    """Tightest cell box ``(r0, c0, r1, c1)`` (end-exclusive) around the truthy cells of a 2-D mask; None if empty."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _grow_interval(lo: int, hi: int, length: int, limit: int) -> tuple[int, int]:
    """Grow ``[lo, hi)`` to ``length`` around its centre, shifted to stay inside ``[0, limit)`` (length <= limit)."""
    extra = length - (hi - lo)
    start = lo - extra // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def _shrink_interval(lo: int, hi: int, length: int, centre: float) -> tuple[int, int]:
    """Shrink ``[lo, hi)`` to ``length`` cells centred near ``centre``, staying inside ``[lo, hi)``."""
    start = int(math.floor(centre - length / 2 + 0.5))
    start = min(max(start, lo), hi - length)
    return start, start + length


def cap_aspect(
    box: Sequence[int],
    max_aspect: float,
    grid_hw: Sequence[int],
    center: tuple[float, float] | None = None,
) -> CellBox:
    """Cap a cell box's aspect ratio (long side / short side) at ``max_aspect``.

    The short side grows to ``ceil(long / max_aspect)`` cells around its centre, shifted to stay inside the grid. If
    the grid is too small on that axis, the short side takes the whole axis and the long side shrinks to
    ``floor(max_aspect * short)`` cells, centred as near as possible on ``center`` and kept inside the original box.

    Args:
        box: ``(r0, c0, r1, c1)`` inside the grid, non-empty.
        max_aspect: largest allowed long/short ratio, >= 1.
        grid_hw: ``(gh, gw)``.
        center: ``(row, col)`` in cell units (cell ``(i, j)`` spans ``[i, i + 1] x [j, j + 1]``) to keep when
            shrinking, e.g. the region's mass centre; default the box centre.

    Returns:
        The capped box (the input box if its aspect is already within the cap).
    """
    gh, gw = _check_grid_hw(grid_hw)
    r0, c0, r1, c1 = _check_cell_box(box, (gh, gw))
    max_aspect = float(max_aspect)
    if not math.isfinite(max_aspect) or max_aspect < 1:
        raise ValueError(f"max_aspect must be a finite number >= 1, got {max_aspect}")
    h, w = r1 - r0, c1 - c0
    if max(h, w) <= max_aspect * min(h, w):
        return r0, c0, r1, c1
    cy, cx = center if center is not None else ((r0 + r1) / 2, (c0 + c1) / 2)
    if h < w:
        need = math.ceil(w / max_aspect)
        r0, r1 = _grow_interval(r0, r1, min(need, gh), gh)
        if need > gh:
            c0, c1 = _shrink_interval(c0, c1, max(1, math.floor(max_aspect * gh)), cx)
    else:
        need = math.ceil(h / max_aspect)
        c0, c1 = _grow_interval(c0, c1, min(need, gw), gw)
        if need > gw:
            r0, r1 = _shrink_interval(r0, r1, max(1, math.floor(max_aspect * gw)), cy)
    return r0, c0, r1, c1


def cap_aspect_px(box_px: Sequence[float], max_aspect: float, image_wh: Sequence[float]) -> PixelBox:
    """Cap a pixel box's aspect ratio at ``max_aspect``: grow the short side about the centre, then clip.

    The entropy-gradient-grounding release's rule: a box wider than ``max_aspect`` times its height gets height
    ``w / max_aspect`` (a box taller than ``max_aspect`` times its width gets width ``h / max_aspect``), centred on
    the box centre; the grown box is then clipped at the image edge, not shifted back inside, so a box at the edge
    keeps its centre and may end up below the cap.

    Args:
        box_px: ``(x0, y0, x1, y1)`` in pixels, non-empty.
        max_aspect: largest allowed long/short ratio, >= 1.
        image_wh: ``(W, H)`` of the image the box lies in.
    """
    width, height = _check_image_wh(image_wh)
    x0, y0, x1, y1 = _check_pixel_box(box_px)
    max_aspect = float(max_aspect)
    if not math.isfinite(max_aspect) or max_aspect < 1:
        raise ValueError(f"max_aspect must be a finite number >= 1, got {max_aspect}")
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise ValueError(f"pixel box {tuple(box_px)} is empty")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if w > max_aspect * h:
        h = w / max_aspect
    elif h > max_aspect * w:
        # The release widens a too-tall box to h * max_aspect (3:1 the other way); the cap asks for h / max_aspect.
        w = h / max_aspect
    return max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(width, cx + w / 2), min(height, cy + h / 2)


def extract_regions(
    relevance: np.ndarray,
    sigma: float = 1.5,
    top_k: int | None = 2,
    connectivity: int = 4,
    max_aspect: float | None = 3.0,
    smooth_mode: str = "nearest",
    strict: bool = False,
) -> list[Region]:
    """Relevance grid -> the top-k boxed regions (Entropy-Gradient Grounding's region step).

    1. Smooth with :func:`gaussian_smooth` (``sigma`` cells, boundary ``smooth_mode``).
    2. Threshold at ``t = elbow_threshold`` of all smoothed values. With ``strict`` (the entropy-gradient-grounding
       release) keep the cells whose smoothed value is ``> t``: a flat grid then has no region. Otherwise (klal's
       earlier rule, still used by the attention probe) keep ``>= t``, except that when ``t`` is the grid's minimum
       (a step-shaped curve, e.g. a block on an exactly-zero background, whose elbow is the first point of the
       flat tail) only the cells strictly above it are kept; a flat grid is then one region covering the grid.
    3. Label the kept cells' connected components (``connectivity``).
    4. Rank components by their RAW relevance mass (sum of the unsmoothed grid over the component), descending;
       smoothing only decides the shape, so a broad weak blob cannot outrank a small strong one. Ties keep the
       raster order of the components' first cells.
    5. Keep ``top_k`` (None: all), box each (:func:`mask_to_box`) and, unless ``max_aspect`` is None, cap its aspect
       in cells (:func:`cap_aspect`, shrinking around the component's raw mass centre when needed). EGG caps in
       pixels instead (:func:`cap_aspect_px`) and passes ``max_aspect=None`` here.

    Args:
        relevance: finite 2-D relevance grid (non-negative in practice: gradient norms, attention).
        sigma: smoothing in cells (0 = none).
        top_k: number of regions to keep, >= 1; None keeps every region.
        connectivity: 4 or 8.
        max_aspect: aspect cap in cells; None disables it.
        smooth_mode: boundary mode of the smoothing (:func:`gaussian_smooth`).
        strict: keep cells strictly above the elbow value (see step 2).

    Returns:
        Up to ``top_k`` regions, best first.
    """
    rel = _as_grid(relevance, "relevance")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, got {top_k!r}")
    smooth = gaussian_smooth(rel, sigma, smooth_mode)
    thr = elbow_threshold(smooth)
    keep = smooth > thr if strict else smooth >= thr
    if not strict and thr == smooth.min() < smooth.max():
        # A step-like curve (e.g. a block on an exactly-zero background) has its chord elbow on the first point of
        # the flat tail; ">=" would then keep the whole grid, so keep only the cells above the tail.
        keep = smooth > thr
    labels, n = connected_components(keep, connectivity)
    idx = np.arange(1, n + 1)
    masses = np.asarray(ndimage.sum_labels(rel, labels, index=idx), dtype=np.float64)
    order = np.argsort(-masses, kind="stable")[: None if top_k is None else int(top_k)]
    gh, gw = rel.shape
    rows, cols = np.mgrid[0:gh, 0:gw]
    regions: list[Region] = []
    for k in order:
        comp = labels == idx[k]
        box = mask_to_box(comp)
        assert box is not None  # every label has at least one cell
        if max_aspect is not None:
            w = np.clip(rel[comp], 0.0, None)
            if w.sum() > 0:
                centre = (float((rows[comp] * w).sum() / w.sum()) + 0.5, float((cols[comp] * w).sum() / w.sum()) + 0.5)
            else:
                centre = None
            box = cap_aspect(box, max_aspect, (gh, gw), center=centre)
        regions.append(Region(box=box, mass=float(masses[k]), mask=comp))
    return regions


# ---------------------------------------------------------------------------------------------------------- windows


def best_window(grid: np.ndarray, sizes: Iterable[tuple[int, int]]) -> tuple[CellBox, float]:
    """Best axis-aligned window over a few sizes, by attention sum.

    For each ``(h_cells, w_cells)`` in ``sizes`` (clipped to the grid) the window with the largest sum is found with
    an integral image (ties: the top-most, then left-most). Across sizes the window with the largest
    ``sum / sqrt(area)`` wins (ties: the earlier size): the raw sum always prefers the biggest window and the mean
    always prefers the smallest, while ``sum / sqrt(area)`` picks a larger window only if it gains attention faster
    than its side grows.

    Args:
        grid: finite 2-D attention grid.
        sizes: window sizes in cells, each positive.

    Returns:
        ``(box, score)``: the winning cell box ``(r0, c0, r1, c1)`` and its ``sum / sqrt(area)``.
    """
    g = _as_grid(grid)
    gh, gw = g.shape
    size_list = [tuple(s) for s in sizes]
    if not size_list:
        raise ValueError("sizes is empty; best_window needs at least one (h_cells, w_cells)")
    integral = np.zeros((gh + 1, gw + 1), dtype=np.float64)
    integral[1:, 1:] = g.cumsum(axis=0).cumsum(axis=1)
    best: tuple[CellBox, float] | None = None
    for size in size_list:
        if len(size) != 2 or any(int(v) != v or v < 1 for v in size):
            raise ValueError(f"window size must be two positive integers (h_cells, w_cells), got {size!r}")
        h, w = min(int(size[0]), gh), min(int(size[1]), gw)
        sums = integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]
        r, c = np.unravel_index(int(np.argmax(sums)), sums.shape)
        score = float(sums[r, c]) / math.sqrt(h * w)
        if best is None or score > best[1]:
            best = ((int(r), int(c), int(r) + h, int(c) + w), score)
    assert best is not None
    return best


# -------------------------------------------------------------------------------------------------- unit changes


def cells_to_pixels(box: Sequence[int], grid_hw: Sequence[int] | Footprint, image_wh: Sequence[float]) -> PixelBox:
    """Cell box ``(r0, c0, r1, c1)`` -> pixel box ``(x0, y0, x1, y1)`` in the original image: the hull of what its
    tokens saw.

    Args:
        box: cell box, end-exclusive, inside the grid.
        grid_hw: the grid's :class:`~klal.geometry.Footprint`, or ``(gh, gw)`` for equal cells (``W / gw`` px wide,
            ``H / gh`` px tall, :class:`klal.geometry.ImageGrid`).
        image_wh: original ``(W, H)``.
    """
    width, height = _check_image_wh(image_wh)
    if isinstance(grid_hw, Footprint):
        _check_footprint(grid_hw, width, height)
        return grid_hw.cells_to_pixels(_check_cell_box(box, grid_hw.shape))
    gh, gw = _check_grid_hw(grid_hw)
    return ImageGrid(height, width, gh, gw).cells_to_pixels(_check_cell_box(box, (gh, gw)))


def _check_footprint(fp: Footprint, width: float, height: float) -> None:
    if abs(fp.width - width) > 1e-6 * width or abs(fp.height - height) > 1e-6 * height:
        raise ValueError(f"footprint of a {fp.width:g} x {fp.height:g} image, not {width:g} x {height:g} (W x H)")


def pixels_to_cells(box_px: Sequence[float], grid_hw: Sequence[int] | Footprint, image_wh: Sequence[float]) -> CellBox:
    """Pixel box in the original image -> the smallest cell box covering it (floor the start, ceil the end).

    The box is clipped to the grid and always covers at least one cell (a zero-width box gets the cell it lies in).
    Inverts :func:`cells_to_pixels` exactly (a tolerance absorbs float round-off). With a footprint, the cells are
    those whose footprints overlap the box (the nearest one for a box between footprints).

    Args:
        box_px: ``(x0, y0, x1, y1)`` in original pixels.
        grid_hw: the grid's footprint, or ``(gh, gw)`` for equal cells.
        image_wh: original ``(W, H)``.
    """
    width, height = _check_image_wh(image_wh)
    x0, y0, x1, y1 = _check_pixel_box(box_px)
    if isinstance(grid_hw, Footprint) and not grid_hw.is_uniform:
        _check_footprint(grid_hw, width, height)
        return grid_hw.pixels_to_cells((x0, y0, x1, y1))
    gh, gw = _check_grid_hw(grid_hw.shape if isinstance(grid_hw, Footprint) else grid_hw)

    def axis(lo: float, hi: float, n: int, size: float) -> tuple[int, int]:
        a = math.floor(lo * n / size + _CELL_EPS)
        b = math.ceil(hi * n / size - _CELL_EPS)
        a = min(max(a, 0), n - 1)
        b = min(max(b, a + 1), n)
        return a, b

    c0, c1 = axis(x0, x1, gw, width)
    r0, r1 = axis(y0, y1, gh, height)
    return r0, c0, r1, c1


def footprint_of(gm: Any, image_wh: Sequence[float]) -> Footprint:
    """The footprint of the map grid of an image of ``image_wh`` (``(W, H)``) under a grounding session ``gm``'s
    family and processor (:meth:`klal.models.family.VLMFamily.map_footprint`)."""
    width, height = (int(v) for v in image_wh)
    return gm.family.map_footprint(gm.processor, height, width)


def expand_box(box_px: Sequence[float], min_side: float, image_wh: Sequence[float]) -> PixelBox:
    """Grow a pixel box to at least ``min_side`` px per axis, keeping it inside the image.

    The box is first clipped to the image; an axis shorter than ``min_side`` grows around its centre to exactly
    ``min_side`` and is shifted back inside the image if it sticks out. Axes already long enough are unchanged.

    Args:
        box_px: ``(x0, y0, x1, y1)`` in original pixels.
        min_side: minimum side in pixels, >= 0.
        image_wh: ``(W, H)``.

    Raises:
        CropTooSmallError: the image is narrower or shorter than ``min_side`` (callers add the sample id).
    """
    width, height = _check_image_wh(image_wh)
    x0, y0, x1, y1 = _check_pixel_box(box_px)
    min_side = float(min_side)
    if not math.isfinite(min_side) or min_side < 0:
        raise ValueError(f"min_side must be a finite number >= 0, got {min_side}")
    if width < min_side or height < min_side:
        raise CropTooSmallError(
            f"image of {width:g} x {height:g} px (W x H) is smaller than min_side={min_side:g} px on at least one axis"
        )

    def axis(lo: float, hi: float, size: float) -> tuple[float, float]:
        lo, hi = min(max(lo, 0.0), size), min(max(hi, 0.0), size)
        if hi - lo >= min_side:
            return lo, hi
        centre = (lo + hi) / 2
        start = min(max(centre - min_side / 2, 0.0), size - min_side)
        return start, start + min_side

    x0, x1 = axis(x0, x1, width)
    y0, y1 = axis(y0, y1, height)
    return x0, y0, x1, y1


def normalize(grid: np.ndarray) -> np.ndarray:
    """``grid / grid.sum()`` as float64; uniform when the sum is not positive and finite (never NaN).

    A grid with a NaN or inf entry has a non-finite sum and therefore also becomes uniform. Inputs are expected to be
    non-negative (attention, relevance); negative entries are divided like the rest.

    Args:
        grid: 2-D array (any array with at least one element works; the shape is kept).
    """
    arr = np.asarray(grid, dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"grid is empty (shape {arr.shape}); cannot normalize")
    with np.errstate(invalid="ignore", over="ignore"):
        total = arr.sum()
    if math.isfinite(total) and total > 0:
        with np.errstate(over="ignore"):
            out = arr / total
        # Only mixed-sign inputs can overflow here; fall back rather than return inf.
        if np.all(np.isfinite(out)):
            return out
    return np.full(arr.shape, 1.0 / arr.size)
