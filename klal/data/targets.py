"""Evidence geometry -> target probability map over one grid of a VLM's visual tokens.

Geometry (:class:`klal.geometry.Footprint`). Each grid comes with its tokens' footprints in the original image, from
the model family (:meth:`klal.models.family.VLMFamily.footprints`): what each token's patches actually saw, padding
and uncovered margins excluded. A plain ``(rows, cols)`` grid means equal cells covering the whole image, which is
exact for the Qwen families (``smart_resize`` scales the whole image per axis; a token is a 28-px square of the
resized image on Qwen2/2.5-VL, 32 px on Qwen3-VL and Qwen3.5), but not for LLaVA-OneVision (a base view whose
patches cover 378 of 384 px, anyres tiles with part-padded edge rows and pooled tile maps). A token's target mass
is the evidence mass inside its footprint.

Evidence is stored in original-image pixels and measured in the grid's nominal token units, ``x_tok = x * cols / W``
and ``y_tok = y * rows / H`` (the resize scale per axis), whatever the footprint. With equal cells, cell ``(i, j)``
covers ``[j, j + 1] x [i, i + 1]`` in token units and its centre is ``(j + 0.5, i + 0.5)``; with a measured
footprint each *source cell* (a feature row/column of a view or tile) covers its own interval, and tokens pooled
from several source cells take their weighted share (:class:`klal.geometry.AxisCells`).

Per evidence element (all sizes in token units; "cell" is a source cell, "its centre" the centre of its interval):

* box, ``area`` mode: each cell gets the area of the (clipped) box that covers it. A box covering exactly one cell is
  one-hot; a half-covered cell gets half the weight of a fully covered one.
* box, ``gaussian`` mode: a separable Gaussian centred on the centre of the clipped box with
  ``sigma_x = box_sigma_scale * box width`` and ``sigma_y = box_sigma_scale * box height``, evaluated at cell centres.
* box, ``centerline`` mode: the box's horizontal centre line (``y = (y0 + y1) / 2`` of the clipped box, from ``x0`` to
  ``x1``) drawn as a band ``centerline_thickness`` tall; each cell gets the band area inside it. Some readers of the
  KLAL paper report this target for RefCOCO; the paper does not say, so it is an option, not the default.
* point, ``gaussian`` mode: an isotropic Gaussian with ``point_sigma`` evaluated at cell centres and normalised over
  the grid (so a point near the border keeps its full mass); ``nearest`` mode: the cell containing the point is one-hot
  (a point on the right/bottom border belongs to the last cell).
* polyline: the polyline clipped to the image, drawn with a ``thickness`` x ``thickness`` square brush: every point of
  the line spreads its length over the cells by the area of the brush square in each cell, i.e. the line measure
  convolved with the square, integrated exactly (Simpson's rule between the points where a brush edge crosses a cell
  border or its mirror image, where the integrand is quadratic). The part of the brush beyond a border is mirrored
  back into the image
  (reflecting boundary), so every point keeps its whole mass and a line running up to the border stays uniform up to
  it. Nothing depends on the image resolution: a horizontal line through the middle of a token row with
  ``thickness < 1`` puts mass only in that row, uniform along it.
* mask (``masks`` key of a dict; not part of the stored schema): the exact fraction of each cell covered by the mask
  (the mask's pixels are box-filtered onto the grid); soft masks in ``[0, 1]`` are weighted by value.

Box, polyline and mask evidence in a margin no token of a grid saw (between a SigLIP view's last patch and its edge)
gives that grid no mass; evidence only there leaves the grid no map (reason ``evidence entirely outside the image``:
outside what the grid saw), and the image's other grids share its mass (:func:`grid_target_maps`). A point there
goes to the nearest token that saw any image (``nearest``), or to the Gaussian at the tokens' centres.

Raw masses (returned by :func:`box_map`, :func:`point_map`, :func:`polyline_map`, :func:`mask_map`, which sum over
their elements) are in token-cell area units: a box's mass is its clipped area, a polyline's is its in-image length
times ``thickness``, a mask's is its area, and each point has mass 1.

Combination (``TargetSpec.combine``): ``element`` (default) gives every element with mass (each box, point, polyline,
mask) an equal share, e.g. line tracing's path polyline and its two node boxes get 1/3 each; ``kind`` gives every
evidence kind present an equal share, split equally among its elements; ``mass`` adds the raw masses (larger boxes and
longer lines weigh more). The result is normalised to sum to 1, is float64 and never contains NaN.

Bad evidence, one rule:

* malformed input raises :class:`TargetMapError` naming the element and what is wrong: a non-numeric or NaN/inf
  coordinate, the wrong number of coordinates, ``x1 < x0`` or ``y1 < y0``, a polyline with fewer than 2 vertices, a
  mask that is not 2-D, has values outside ``[0, 1]`` or does not match the image size, an unknown evidence key, a
  non-positive image size, or a grid that is not two positive integers;
* well-formed evidence that leaves no mass gives ``None`` ("no map": the training loss skips the KLAL term for that
  sample and counts it): empty evidence, evidence entirely outside the image, or evidence of zero area after clipping
  (a zero-width or zero-height box, a point outside the image, a polyline of zero length or entirely outside, an
  all-zero mask). Elements that leave no mass are dropped; the others still make a map.
  :func:`build_target_map_with_reason` and :func:`explain_no_map` say why there is no map.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from klal.data.schema import Evidence, parse_box, parse_point
from klal.geometry import AxisCells, Footprint

GridLike = tuple[int, int] | Sequence[int] | Footprint
"""A grid as ``(rows, cols)`` (equal cells over the whole image) or its tokens' :class:`~klal.geometry.Footprint`."""

NO_MAP_EMPTY = "empty evidence"
NO_MAP_OUTSIDE = "evidence entirely outside the image"
NO_MAP_ZERO_AREA = "evidence has zero area after clipping"
NO_MAP_OUTSIDE_OR_ZERO = "evidence outside the image or of zero area"
NO_MAP_REASONS = (NO_MAP_EMPTY, NO_MAP_OUTSIDE, NO_MAP_ZERO_AREA, NO_MAP_OUTSIDE_OR_ZERO)
"""Every reason :func:`build_target_map_with_reason` can give (a small fixed set, so callers can count them)."""

BoxMode = Literal["area", "gaussian", "centerline"]
PointMode = Literal["gaussian", "nearest"]
CombineMode = Literal["element", "kind", "mass"]

_EVIDENCE_KEYS = ("boxes", "points", "polylines", "masks")
_OUTSIDE = "outside"
_ZERO = "zero"


class TargetMapError(ValueError):
    """Malformed evidence or geometry; the message says which element is wrong and how."""


# -- configuration -----------------------------------------------------------------------------------------------------


@dataclass
class TargetSpec:
    """How evidence becomes a target map (see the module docstring for the exact definitions)."""

    box_mode: BoxMode = "area"
    """Box target: ``area`` (covered area per cell), ``gaussian`` (Gaussian at the box centre) or ``centerline``
    (the box's horizontal centre line drawn as a band)."""
    point_mode: PointMode = "gaussian"
    """Point target: ``gaussian`` (Gaussian at cell centres) or ``nearest`` (the containing cell, one-hot)."""
    point_sigma: float = 1.0
    """Standard deviation of the point Gaussian, in tokens."""
    box_sigma_scale: float = 0.5
    """Gaussian box mode: sigma per axis = this x the box side on that axis (in tokens)."""
    polyline_thickness: float = 1.0
    """Side of the square kernel a polyline is drawn with, in tokens."""
    centerline_thickness: float = 1.0
    """Height of the band a box centre line is drawn as (``centerline`` box mode), in tokens."""
    combine: CombineMode = "element"
    """How several elements combine: ``element`` (each element with mass gets an equal share), ``kind`` (each
    evidence kind present gets an equal share, split among its elements) or ``mass`` (raw masses added)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("box_mode", get_args(BoxMode)),
            ("point_mode", get_args(PointMode)),
            ("combine", get_args(CombineMode)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TargetSpec.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("point_sigma", "box_sigma_scale", "polyline_thickness", "centerline_thickness"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"TargetSpec.{name} must be a finite number > 0, got {value!r}")


# -- grid --------------------------------------------------------------------------------------------------------------


def _make_grid(orig_hw: Sequence[float], grid: GridLike) -> Footprint:
    try:
        h, w = (float(v) for v in orig_hw)
    except (TypeError, ValueError) as e:
        raise TargetMapError(f"orig_hw must be (height, width), got {orig_hw!r}") from e
    if not (math.isfinite(h) and math.isfinite(w) and h > 0 and w > 0):
        raise TargetMapError(f"orig_hw must be positive, got {tuple(orig_hw)}")
    if isinstance(grid, Footprint):
        if abs(grid.height - h) > 1e-6 * h or abs(grid.width - w) > 1e-6 * w:
            raise TargetMapError(
                f"the footprint is of a {grid.height:g} x {grid.width:g} image, the evidence of {h:g} x {w:g} (H x W)"
            )
        return grid
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError) as e:
        raise TargetMapError(f"grid must be (rows, cols) of visual tokens, got {grid!r}") from e
    if rows < 1 or cols < 1 or rows != grid[0] or cols != grid[1]:
        raise TargetMapError(f"grid must be two positive integers (rows, cols) of visual tokens, got {tuple(grid)}")
    return Footprint.uniform((h, w), (rows, cols))


def _cover(lo: np.ndarray | float, hi: np.ndarray | float, n: int) -> np.ndarray:
    """Length of ``[lo, hi]`` inside each unit cell ``[k, k + 1]``, k < n; shape ``lo.shape + (n,)``."""
    k = np.arange(n, dtype=np.float64)
    lo = np.asarray(lo, dtype=np.float64)[..., None]
    hi = np.asarray(hi, dtype=np.float64)[..., None]
    return np.clip(np.minimum(hi, k + 1.0) - np.maximum(lo, k), 0.0, None)


def _cover_cells(lo: np.ndarray | float, hi: np.ndarray | float, axis: AxisCells) -> np.ndarray:
    """Length (token units) of ``[lo, hi]`` inside each source cell of ``axis``; shape ``lo.shape + (S,)``."""
    if axis.is_uniform:
        return _cover(lo, hi, axis.count)
    cl, ch = axis.edges()
    lo = np.asarray(lo, dtype=np.float64)[..., None]
    hi = np.asarray(hi, dtype=np.float64)[..., None]
    return np.clip(np.minimum(hi, ch) - np.maximum(lo, cl), 0.0, None)


def _centres(axis: AxisCells) -> tuple[np.ndarray, np.ndarray]:
    """Source-cell centres in token units, and which source cells saw any image (a padding-only one gets no mass)."""
    cl, ch = axis.edges()
    return (cl + ch) / 2, ch > cl


def _gauss_1d(center: float, sigma: float, axis: AxisCells) -> np.ndarray:
    """Unnormalised Gaussian at the source-cell centres, shifted in log space so it cannot underflow to all zeros."""
    mids, seen = _centres(axis)
    d = mids - center
    with np.errstate(over="ignore"):
        logits = np.where(seen, -0.5 * (d / sigma) ** 2, -np.inf)
    if not np.isfinite(logits.max()):
        # sigma so small that every offset overflows: the limit is the nearest cell.
        out = np.zeros(len(d))
        out[int(np.argmin(np.where(seen, np.abs(d), np.inf)))] = 1.0
        return out
    return np.exp(logits - logits.max())


# -- parsing and validation --------------------------------------------------------------------------------------------


def _as_array(value: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TargetMapError(f"{where}: not a list of numbers ({value!r})") from e
    return arr


def _parse_polyline(value: Any, where: str) -> np.ndarray:
    try:
        n = len(value)
    except TypeError as e:
        raise TargetMapError(f"{where}: a polyline is a list of [x, y] vertices, got {value!r}") from e
    if n < 2:
        raise TargetMapError(f"{where}: a polyline needs at least 2 vertices, got {n}")
    verts = [parse_point(v, f"{where}[{k}]", TargetMapError) for k, v in enumerate(value)]
    return np.stack(verts)


def _parse_mask(value: Any, where: str, orig_hw: tuple[float, float] | None) -> np.ndarray:
    arr = _as_array(value, where)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise TargetMapError(f"{where}: a mask must be a non-empty 2-D (height, width) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise TargetMapError(f"{where}: mask contains NaN or inf")
    if arr.min() < 0 or arr.max() > 1:
        raise TargetMapError(f"{where}: mask values must be in [0, 1], got range [{arr.min()}, {arr.max()}]")
    if orig_hw is not None and (arr.shape[0] != orig_hw[0] or arr.shape[1] != orig_hw[1]):
        raise TargetMapError(
            f"{where}: mask shape {arr.shape} does not match the image size (height, width) = {tuple(orig_hw)}"
        )
    return arr


def _elements(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        # A single mask may come as one 2-D array; stacks of elements come as arrays of one more dimension.
        if key == "masks" and value.ndim == 2:
            return [value]
        return list(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TargetMapError(f"evidence {key!r} must be a list, got {type(value).__name__}")
    return list(value)


def evidence_parts(evidence: Evidence | Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """The one parser of the schema's ``evidence`` field: its elements by kind (``boxes``, ``points``, ``polylines``,
    ``masks``), each a list (None values, as HF datasets give for absent kinds, read as empty).

    Raises:
        TargetMapError: an unknown key, or a kind that is not a list.
    """
    if evidence is None:
        return {k: [] for k in _EVIDENCE_KEYS}
    if isinstance(evidence, Evidence):
        return {"boxes": evidence.boxes, "points": evidence.points, "polylines": evidence.polylines, "masks": []}
    if not isinstance(evidence, Mapping):
        raise TargetMapError(f"evidence must be an Evidence or a dict, got {type(evidence).__name__}")
    unknown = sorted(set(evidence) - set(_EVIDENCE_KEYS))
    if unknown:
        raise TargetMapError(f"unknown evidence key(s) {unknown}; expected some of {list(_EVIDENCE_KEYS)}")
    return {k: _elements(evidence.get(k), k) for k in _EVIDENCE_KEYS}


# -- evidence cells (the grounding metrics' "where is the evidence") ------------------------------------------------

_LINE_THICKNESS = 1e-6
"""Brush side (tokens) for rasterising evidence polylines into cells: thin enough that only the cells the line runs
through get mass (a line exactly on a cell border marks both neighbours)."""
_LINE_MIN_LENGTH = 1e-3
"""A polyline marks a cell when it runs at least this far (tokens) inside it, so a line through a cell corner does
not mark the cells it only touches (those get mass of order thickness squared)."""


def evidence_cells(
    evidence: Evidence | Mapping[str, Any] | None,
    orig_hw: tuple[float, float],
    grid: GridLike,
) -> np.ndarray | None:
    """Token cells that hold evidence, on the image's visual-token grid ``grid``.

    Built with the target-map rasterisers below, so the geometry (the tokens' footprints) is the training
    target's; a cell "overlaps" evidence when its footprint does:

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
        grid: the image's visual-token grid: its tokens' footprints
            (:meth:`klal.models.family.VLMFamily.footprints`), or ``(rows, cols)`` for equal cells over the image.

    Returns:
        ``(gh, gw)`` bool array, or None when the evidence marks no cell (empty, outside the image or zero area).

    Raises:
        TargetMapError: malformed evidence or sizes (the message names the element).
    """
    parts = evidence_parts(evidence)
    grid = _make_grid(orig_hw, grid)
    cells = np.zeros(grid.shape, dtype=bool)
    if parts["boxes"]:
        cells |= box_map(parts["boxes"], orig_hw, grid, mode="area") > 0
    if parts["points"]:
        cells |= point_map(parts["points"], orig_hw, grid, mode="nearest") > 0
    if parts["polylines"]:
        mass = polyline_map(parts["polylines"], orig_hw, grid, thickness=_LINE_THICKNESS)
        # Mass in a cell = line length inside it x thickness (token units).
        cells |= mass >= _LINE_MIN_LENGTH * _LINE_THICKNESS
    for k, mask in enumerate(parts["masks"]):
        arr = np.asarray(mask, dtype=np.float64)
        if arr.ndim == 2 and arr.shape != (int(orig_hw[0]), int(orig_hw[1])):
            raise TargetMapError(f"masks[{k}]: shape {arr.shape} does not match the image size {tuple(orig_hw)}")
        cells |= mask_map(arr, grid) > 0
    return cells if cells.any() else None


# -- per-element rasterisers (each returns (map, None) or (None, why-no-mass)) ----------------------------------------


def _clip_box_tokens(box: tuple[float, float, float, float], g: Footprint) -> tuple[float, float, float, float] | str:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return _ZERO
    cx0, cx1 = max(x0 * g.sx, 0.0), min(x1 * g.sx, float(g.cols))
    cy0, cy1 = max(y0 * g.sy, 0.0), min(y1 * g.sy, float(g.rows))
    if cx1 <= cx0 or cy1 <= cy0:
        return _OUTSIDE
    return cx0, cy0, cx1, cy1


def _on_tokens(source_map: np.ndarray, g: Footprint) -> tuple[np.ndarray | None, str]:
    """A source-cell map pooled onto the tokens; no mass left (evidence only where no token looked) is "outside"."""
    m = g.pool(source_map)
    return (m, "") if m.sum() > 0 else (None, _OUTSIDE)


def _box_element(
    box: tuple[float, float, float, float], g: Footprint, mode: str, sigma_scale: float, band: float
) -> tuple[np.ndarray | None, str]:
    clipped = _clip_box_tokens(box, g)
    if isinstance(clipped, str):
        return None, clipped
    x0, y0, x1, y1 = clipped
    if mode == "area":
        return _on_tokens(np.outer(_cover_cells(y0, y1, g.y), _cover_cells(x0, x1, g.x)), g)
    if mode == "gaussian":
        m = g.pool(
            np.outer(
                _gauss_1d((y0 + y1) / 2, sigma_scale * (y1 - y0), g.y),
                _gauss_1d((x0 + x1) / 2, sigma_scale * (x1 - x0), g.x),
            )
        )
        return m * ((x1 - x0) * (y1 - y0) / m.sum()), ""
    if mode == "centerline":
        yc = (y0 + y1) / 2
        return _on_tokens(np.outer(_cover_cells(yc - band / 2, yc + band / 2, g.y), _cover_cells(x0, x1, g.x)), g)
    raise TargetMapError(f"box mode must be one of {list(get_args(BoxMode))}, got {mode!r}")


def _nearest_cell(v: float, axis: AxisCells) -> int:
    """The source cell containing ``v`` (token units; the last cell owns its end), else the nearest one that saw
    any image."""
    if axis.is_uniform:
        return min(int(math.floor(v)), axis.count - 1)
    cl, ch = axis.edges()
    seen = ch > cl
    inside = np.nonzero(seen & (cl <= v) & (v < ch))[0]
    if len(inside):
        return int(inside[0])
    dist = np.where(seen, np.maximum(cl - v, 0) + np.maximum(v - ch, 0), np.inf)
    return int(np.argmin(dist))


def _point_element(point: tuple[float, float], g: Footprint, mode: str, sigma: float) -> tuple[np.ndarray | None, str]:
    x, y = point
    if x < 0 or y < 0 or x > g.width or y > g.height:
        return None, _OUTSIDE
    xt, yt = x * g.sx, y * g.sy
    if mode == "nearest":
        oy, ox = np.zeros(len(g.y.edges()[0])), np.zeros(len(g.x.edges()[0]))
        oy[_nearest_cell(yt, g.y)] = 1.0
        ox[_nearest_cell(xt, g.x)] = 1.0
        return _on_tokens(np.outer(oy, ox), g)
    if mode == "gaussian":
        m = g.pool(np.outer(_gauss_1d(yt, sigma, g.y), _gauss_1d(xt, sigma, g.x)))
        return m / m.sum(), ""
    raise TargetMapError(f"point mode must be one of {list(get_args(PointMode))}, got {mode!r}")


def _clip_segment(a: np.ndarray, b: np.ndarray, w: float, h: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Part of segment ``a -> b`` inside ``[0, w] x [0, h]`` (parametric clipping), or None."""
    d = b - a
    t0, t1 = 0.0, 1.0
    for p, q in ((-d[0], a[0]), (d[0], w - a[0]), (-d[1], a[1]), (d[1], h - a[1])):
        if p == 0:
            if q < 0:
                return None
            continue
        r = q / p
        if p < 0:
            t0 = max(t0, r)
        else:
            t1 = min(t1, r)
        if t0 > t1:
            return None
    return a + t0 * d, a + t1 * d


def _breaks(axis: AxisCells) -> np.ndarray | None:
    """Where a brush edge crossing changes the reflected kernel's per-cell shares linearly: the source-cell edges,
    their mirror images in both image borders, and the borders; None for equal cells (every integer)."""
    if axis.is_uniform:
        return None
    n = float(axis.count)
    e = np.concatenate(axis.edges())
    return np.unique(np.concatenate([e, -e, 2 * n - e, [0.0, n]]))


def _polyline_element(verts: np.ndarray, g: Footprint, thickness: float) -> tuple[np.ndarray | None, str]:
    pts = verts * np.array([g.sx, g.sy])
    if float(np.sum(np.hypot(*np.diff(pts, axis=0).T))) <= 0:
        return None, _ZERO
    half = thickness / 2
    breaks = (_breaks(g.x), _breaks(g.y))
    nodes, weights = [], []
    for a, b in zip(pts[:-1], pts[1:]):
        seg = _clip_segment(a, b, float(g.cols), float(g.rows))
        if seg is None:
            continue
        p, q = seg
        length = float(np.hypot(*(q - p)))
        if length <= 0:
            continue
        t, w = _simpson_nodes(p, q, half, breaks)
        nodes.append(p[None, :] + t[:, None] * (q - p)[None, :])
        weights.append(w * length)
    if not nodes:
        return None, _OUTSIDE
    s = np.concatenate(nodes)
    wts = np.concatenate(weights) * thickness
    ox = _reflected_kernel(s[:, 0], half, g.x)
    oy = _reflected_kernel(s[:, 1], half, g.y)
    return _on_tokens((oy * wts[:, None]).T @ ox, g)


def _simpson_nodes(
    p: np.ndarray, q: np.ndarray, half: float, breaks: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes in ``t`` on segment ``p -> q`` and their weights (summing to 1) that integrate the splatted
    kernel exactly: between the ``t`` where a kernel edge (``x +- half`` or ``y +- half``) crosses a cell border
    (``breaks`` per axis; None: every integer) the per-cell share is linear in ``t`` on each axis, so the product is
    quadratic and Simpson's rule is exact."""
    cuts = [np.array([0.0, 1.0])]
    for axis in (0, 1):
        d = q[axis] - p[axis]
        if d == 0:
            continue
        for off in (-half, half):
            v0, v1 = p[axis] + off, q[axis] + off
            lo, hi = min(v0, v1), max(v0, v1)
            if breaks[axis] is None:
                ks = np.arange(math.ceil(lo), math.floor(hi) + 1, dtype=np.float64)
            else:
                ks = breaks[axis][(breaks[axis] >= lo) & (breaks[axis] <= hi)]
            cuts.append((ks - v0) / d)
    t = np.unique(np.clip(np.concatenate(cuts), 0.0, 1.0))
    lo, hi = t[:-1], t[1:]
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    dt = hi - lo
    return np.concatenate([lo, (lo + hi) / 2, hi]), np.concatenate([dt / 6, 4 * dt / 6, dt / 6])


def _reflected_kernel(centers: np.ndarray, half: float, axis: AxisCells) -> np.ndarray:
    """Share of a box kernel ``[c - half, c + half]`` falling in each source cell, with the part beyond either border
    mirrored back in (so a line ending at the border stays uniform up to it); ``(len(centers), S)``. The share that
    falls where no cell looked (a margin) is lost, not spread over the cells."""
    n = axis.count
    lo, hi = centers - half, centers + half
    share = _cover_cells(lo, hi, axis) + _cover_cells(-hi, -lo, axis) + _cover_cells(2 * n - hi, 2 * n - lo, axis)
    # Renormalise: exact already unless the kernel is wider than twice the grid (then one fold is not enough).
    if axis.is_uniform:
        return share / share.sum(axis=1, keepdims=True)

    def in_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.clip(np.minimum(b, n) - np.maximum(a, 0.0), 0.0, None)

    inside = in_image(lo, hi) + in_image(-hi, -lo) + in_image(2 * n - hi, 2 * n - lo)
    return share / inside[:, None]


def _mask_element(mask: np.ndarray, g: Footprint) -> tuple[np.ndarray | None, str]:
    h, w = mask.shape
    # Pixel column c spans [c, c + 1] * cols / w tokens; the overlap matrices box-filter the mask exactly.
    ax = _cover_cells(np.arange(w) * (g.cols / w), np.arange(1, w + 1) * (g.cols / w), g.x)
    ay = _cover_cells(np.arange(h) * (g.rows / h), np.arange(1, h + 1) * (g.rows / h), g.y)
    m = g.pool(ay.T @ mask @ ax)
    if m.sum() <= 0:
        return None, _ZERO
    return m, ""


# -- public rasterisers ------------------------------------------------------------------------------------------------


def _summed(g: Footprint, masses: Iterable[tuple[np.ndarray | None, str]]) -> np.ndarray:
    """``(gh, gw)`` sum of the element masses (elements that leave none add nothing), evaluated one by one."""
    out = np.zeros((g.rows, g.cols))
    for m, _ in masses:
        if m is not None:
            out += m
    return out


def box_map(
    boxes: Sequence[Sequence[float]] | np.ndarray,
    orig_hw: tuple[float, float],
    grid: GridLike,
    mode: BoxMode = "area",
    sigma_scale: float = 0.5,
    centerline_thickness: float = 1.0,
) -> np.ndarray:
    """Unnormalised mass of boxes on the token grid, summed over boxes.

    Args:
        boxes: ``[[x0, y0, x1, y1], ...]`` in original pixels.
        orig_hw: original image ``(height, width)``.
        grid: the image's visual-token grid: its tokens' footprints
            (:meth:`klal.models.family.VLMFamily.footprints`), or ``(rows, cols)`` for equal cells over the image.
        mode: ``area``, ``gaussian`` or ``centerline`` (module docstring).
        sigma_scale: Gaussian sigma per axis as a fraction of the box side.
        centerline_thickness: band height in tokens for ``centerline``.

    Returns:
        ``(gh, gw)`` float64; each box contributes its clipped area in token cells (zeros if none is in the image).
    """
    g = _make_grid(orig_hw, grid)
    return _summed(
        g,
        (
            _box_element(parse_box(b, f"boxes[{k}]", TargetMapError), g, mode, sigma_scale, centerline_thickness)
            for k, b in enumerate(_elements(boxes, "boxes"))
        ),
    )


def point_map(
    points: Sequence[Sequence[float]] | np.ndarray,
    orig_hw: tuple[float, float],
    grid: GridLike,
    mode: PointMode = "gaussian",
    sigma: float = 1.0,
) -> np.ndarray:
    """Unnormalised mass of points on the token grid (mass 1 per point inside the image), summed over points.

    Args:
        points: ``[[x, y], ...]`` in original pixels.
        orig_hw: original image ``(height, width)``.
        grid: the image's visual-token grid: its tokens' footprints
            (:meth:`klal.models.family.VLMFamily.footprints`), or ``(rows, cols)`` for equal cells over the image.
        mode: ``gaussian`` or ``nearest``.
        sigma: Gaussian standard deviation in tokens.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise TargetMapError(f"point sigma must be > 0, got {sigma}")
    g = _make_grid(orig_hw, grid)
    return _summed(
        g,
        (
            _point_element(parse_point(p, f"points[{k}]", TargetMapError), g, mode, sigma)
            for k, p in enumerate(_elements(points, "points"))
        ),
    )


def polyline_map(
    polylines: Sequence[Sequence[Sequence[float]]],
    orig_hw: tuple[float, float],
    grid: GridLike,
    thickness: float = 1.0,
) -> np.ndarray:
    """Unnormalised mass of polylines (in-image length x thickness, in token units), summed over polylines.

    Args:
        polylines: ``[[[x, y], ...], ...]`` open polylines in original pixels, at least 2 vertices each.
        orig_hw: original image ``(height, width)``.
        grid: the image's visual-token grid: its tokens' footprints
            (:meth:`klal.models.family.VLMFamily.footprints`), or ``(rows, cols)`` for equal cells over the image.
        thickness: side of the square drawing kernel in tokens.
    """
    if not (math.isfinite(thickness) and thickness > 0):
        raise TargetMapError(f"polyline thickness must be > 0, got {thickness}")
    g = _make_grid(orig_hw, grid)
    return _summed(
        g,
        (
            _polyline_element(_parse_polyline(line, f"polylines[{k}]"), g, thickness)
            for k, line in enumerate(_elements(polylines, "polylines"))
        ),
    )


def mask_map(mask: np.ndarray, grid: GridLike) -> np.ndarray:
    """Fraction of each token cell covered by a mask given in original pixels.

    Args:
        mask: ``(H, W)`` bool or float in ``[0, 1]`` over the original image.
        grid: the image's visual-token grid: its tokens' footprints
            (:meth:`klal.models.family.VLMFamily.footprints`), or ``(rows, cols)`` for equal cells over the image.

    Returns:
        ``(gh, gw)`` float64 in ``[0, 1]`` (exact box filter of the mask onto the grid).
    """
    arr = _parse_mask(mask, "mask", None)
    g = _make_grid(arr.shape, grid)
    m, _ = _mask_element(arr, g)
    return np.zeros((g.rows, g.cols)) if m is None else m


# -- combination -------------------------------------------------------------------------------------------------------


def _no_map_reason(drops: list[str]) -> str:
    if not drops:
        return NO_MAP_EMPTY
    kinds = set(drops)
    if kinds == {_OUTSIDE}:
        return NO_MAP_OUTSIDE
    if kinds == {_ZERO}:
        return NO_MAP_ZERO_AREA
    return NO_MAP_OUTSIDE_OR_ZERO


def build_target_map_with_reason(
    evidence: Evidence | Mapping[str, Any] | None,
    orig_hw: tuple[float, float],
    grid: GridLike,
    spec: TargetSpec | None = None,
) -> tuple[np.ndarray | None, str | None]:
    """Target map and, when there is none, why.

    Args:
        evidence: an :class:`~klal.data.schema.Evidence`, or a dict with any of ``boxes``, ``points``, ``polylines``
            and ``masks`` (a list of ``(H, W)`` arrays or one array), in original pixels.
        orig_hw: original image ``(height, width)``.
        grid: the image's visual-token grid: its tokens' footprints
            (:meth:`klal.models.family.VLMFamily.footprints`), or ``(rows, cols)`` for equal cells over the image.
        spec: target settings (default :class:`TargetSpec`).

    Returns:
        ``(map, None)`` with a ``(gh, gw)`` float64 map summing to 1, or ``(None, reason)`` with one of
        :data:`NO_MAP_REASONS`.

    Raises:
        TargetMapError: malformed evidence or sizes (the message names the element).
    """
    spec = spec or TargetSpec()
    g = _make_grid(orig_hw, grid)
    parts = evidence_parts(evidence)
    per_kind: dict[str, list[np.ndarray]] = {k: [] for k in _EVIDENCE_KEYS}
    drops: list[str] = []

    def keep(kind: str, result: tuple[np.ndarray | None, str]) -> None:
        m, why = result
        if m is None or not m.sum() > 0:
            drops.append(why or _ZERO)
        else:
            per_kind[kind].append(m)

    # Parse everything first so a malformed element raises even when another one would leave no mass.
    boxes = [parse_box(b, f"boxes[{k}]", TargetMapError) for k, b in enumerate(parts["boxes"])]
    points = [parse_point(p, f"points[{k}]", TargetMapError) for k, p in enumerate(parts["points"])]
    lines = [_parse_polyline(v, f"polylines[{k}]") for k, v in enumerate(parts["polylines"])]
    masks = [_parse_mask(m, f"masks[{k}]", (g.height, g.width)) for k, m in enumerate(parts["masks"])]
    for b in boxes:
        keep("boxes", _box_element(b, g, spec.box_mode, spec.box_sigma_scale, spec.centerline_thickness))
    for p in points:
        keep("points", _point_element(p, g, spec.point_mode, spec.point_sigma))
    for v in lines:
        keep("polylines", _polyline_element(v, g, spec.polyline_thickness))
    for m in masks:
        keep("masks", _mask_element(m, g))

    present = {k: ms for k, ms in per_kind.items() if ms}
    if not present:
        return None, _no_map_reason(drops)
    out = np.zeros((g.rows, g.cols))
    for ms in present.values():
        for m in ms:
            if spec.combine == "element":
                out += m / m.sum()
            elif spec.combine == "kind":
                out += m / (m.sum() * len(ms))
            else:
                out += m
    total = out.sum()
    if not (math.isfinite(total) and np.all(np.isfinite(out))):
        # Only reachable with coordinates near the float limit (scaling to tokens overflows).
        raise TargetMapError(f"evidence coordinates too large to map (total mass {total})")
    return out / total, None


def build_target_map(
    evidence: Evidence | Mapping[str, Any] | None,
    orig_hw: tuple[float, float],
    grid: GridLike,
    spec: TargetSpec | None = None,
) -> np.ndarray | None:
    """``(gh, gw)`` float64 target distribution summing to 1, or None ("no map"); see
    :func:`build_target_map_with_reason` for the arguments and :func:`explain_no_map` for why a map is missing."""
    return build_target_map_with_reason(evidence, orig_hw, grid, spec)[0]


def explain_no_map(
    evidence: Evidence | Mapping[str, Any] | None,
    orig_hw: tuple[float, float],
    grid: GridLike | None = None,
    spec: TargetSpec | None = None,
) -> str | None:
    """Why this evidence gives no target map (one of :data:`NO_MAP_REASONS`), or None when it gives one.

    Args:
        evidence: as for :func:`build_target_map_with_reason`.
        orig_hw: original image ``(height, width)``.
        grid: the token grid; optional, since whether a map exists does not depend on the grid.
        spec: target settings.

    Raises:
        TargetMapError: malformed evidence.
    """
    # Any grid gives the same answer: an element leaves mass on every grid or on none.
    return build_target_map_with_reason(evidence, orig_hw, grid or (1, 1), spec)[1]


def grid_target_maps(
    evidence: Evidence | Mapping[str, Any] | None,
    orig_hw: tuple[float, float],
    footprints: Sequence[Footprint | None],
    spec: TargetSpec | None = None,
) -> tuple[list[np.ndarray | None], list[str | None]]:
    """One image's target maps on each of its grids, in sequence order: every grid gets the same evidence, and every
    grid where it leaves mass an equal share of the image's mass (so the maps sum to 1 together; evidence that only
    a margin one view does not see goes wholly to the grids that see it).

    Args:
        evidence: as for :func:`build_target_map_with_reason`.
        orig_hw: original image ``(height, width)``.
        footprints: per grid, its tokens' footprints (:meth:`klal.models.family.VLMFamily.footprints`); None for an
            empty grid, which gets no map and no share.
        spec: target settings.

    Returns:
        ``(maps, reasons)``: per grid its ``(rows, cols)`` map or None, and why not (None for an empty grid or a
        grid with a map).

    Raises:
        TargetMapError: malformed evidence or sizes.
    """
    built = [None if fp is None else build_target_map_with_reason(evidence, orig_hw, fp, spec) for fp in footprints]
    shares = sum(b is not None and b[0] is not None for b in built)
    maps = [None if b is None or b[0] is None else b[0] / shares for b in built]
    return maps, [None if b is None else b[1] for b in built]
