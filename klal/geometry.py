"""Family-neutral geometry: where each visual token of a grid looked in the original image, and the pixel budget.

Every supported family turns an image into one or more grids of LLM visual tokens, row-major
(:mod:`klal.models.family`). Each grid comes with a :class:`Footprint`: per token, the part of the ORIGINAL image its
vision-tower patches actually saw (padding and uncovered margins excluded), given per axis (:class:`AxisCells`),
since every family's resize, tiling, unpadding and pooling is separable. The footprint is the one mapping between
original pixels and a grid's cells, used by the target maps (:mod:`klal.data.targets`), the evidence cells and
grounding metrics (:mod:`klal.eval`) and the grounding methods' boxes and crops (:mod:`klal.grounding.ops`).

* **uniform** (:meth:`Footprint.uniform`): equal cells covering the whole image, a cell ``W / cols`` px wide and
  ``H / rows`` px tall; cell ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]`` in token units. This is exact for the Qwen
  families: ``smart_resize`` scales the whole image by one factor per axis to a multiple of the token side (28 px on
  Qwen2/2.5-VL, 32 px on Qwen3-VL and Qwen3.5), and the patches tile the resized image exactly.
* **measured** (:class:`AxisCells` with explicit ``lo`` / ``hi``): the family computes, per axis, the original-pixel
  interval each *source cell* saw (a vision-tower feature row or column: a patch strip of a view or tile), and,
  where the model pools or interpolates source cells into tokens, a ``(tokens, sources)`` weight matrix. Intervals
  may be shorter than the spacing between them (a 384-px SigLIP view whose 27 patches of 14 px cover 378 px leaves a
  margin no token saw), or empty (a feature row that saw only padding). A token's evidence mass is the evidence
  inside its sources' intervals, weighted.

Token units. Evidence is measured in the grid's nominal token units (``x * cols / W``, ``y * rows / H``, the uniform
scale) whatever the footprint, so sigmas and thicknesses given in tokens mean the same on every family, and a uniform
footprint gives exactly the maps of equal cells.

Pixel bounds. :data:`DEFAULT_MIN_PIXELS` (56 x 56) and :data:`DEFAULT_MAX_PIXELS` (448 x 448) are the bounds on the
resized image area that :class:`klal.models.config.ModelConfig` builds the processor with by default, for the
families whose processors resize to a pixel budget (the Qwen families: at most 256 visual tokens of 28 px, or 196 of
32 px, per image); a checkpoint or a config that sets other bounds passes its own values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MIN_PIXELS = 56 * 56
"""Lower bound on a resized image's area: transformers' default ``min_pixels`` of the Qwen2-VL image processor."""
DEFAULT_MAX_PIXELS = 448 * 448
"""Upper bound on a resized image's area: the project's default (see the module docstring)."""


def check_pixels(min_pixels: int, max_pixels: int) -> None:
    """Refuse pixel bounds that no image can meet.

    Raises:
        ValueError: unless ``1 <= min_pixels <= max_pixels``.
    """
    if min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(f"need 1 <= min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")


@dataclass(frozen=True, eq=False)
class AxisCells:
    """The footprint of a grid's tokens along one axis (rows: y, columns: x) in original pixels.

    Attributes:
        count: tokens along the axis.
        size: the image's extent along the axis in original pixels (height for rows, width for columns).
        lo: ``(S,)`` start of each source cell's interval in original pixels, or None for uniform cells (then the
            sources are the tokens and token ``k`` covers ``[k, k + 1] * size / count``).
        hi: ``(S,)`` end of each source cell's interval (``hi >= lo``; equal for a cell that saw only padding).
        weights: ``(count, S)`` how much of each source cell makes each token (bilinear pooling), or None when the
            sources are the tokens (``S == count``).
    """

    count: int
    size: float
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    weights: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"an axis needs at least one token, got {self.count}")
        if not (math.isfinite(self.size) and self.size > 0):
            raise ValueError(f"image extent must be positive, got {self.size}")
        if (self.lo is None) != (self.hi is None):
            raise ValueError("give both lo and hi, or neither (uniform cells)")
        if self.lo is None:
            if self.weights is not None:
                raise ValueError("uniform cells take no weights")
            return
        lo, hi = np.asarray(self.lo, dtype=np.float64), np.asarray(self.hi, dtype=np.float64)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        if lo.ndim != 1 or lo.shape != hi.shape or not np.all(hi >= lo):
            raise ValueError(f"source intervals must be 1-D with hi >= lo, got shapes {lo.shape}, {hi.shape}")
        n_src = len(lo)
        if self.weights is None:
            if n_src != self.count:
                raise ValueError(f"{n_src} source cells for {self.count} tokens need a weight matrix")
        else:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.shape != (self.count, n_src):
                raise ValueError(f"weights must be (tokens, sources) = ({self.count}, {n_src}), got {w.shape}")
            object.__setattr__(self, "weights", w)

    @classmethod
    def uniform(cls, count: int, size: float) -> AxisCells:
        """``count`` equal cells covering ``[0, size]``."""
        return cls(int(count), float(size))

    @property
    def is_uniform(self) -> bool:
        """Equal cells covering the whole extent (the sources are the tokens)."""
        return self.lo is None

    @property
    def scale(self) -> float:
        """Token units per original pixel (the nominal scale ``count / size``)."""
        return self.count / self.size

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)`` of the source cells in token units (uniform: exactly ``k`` and ``k + 1``)."""
        if self.lo is None or self.hi is None:
            k = np.arange(self.count, dtype=np.float64)
            return k, k + 1.0
        return self.lo * self.scale, self.hi * self.scale

    def scaled(self, size: float) -> AxisCells:
        """The same cells on an image stretched to extent ``size`` (all intervals scaled alike)."""
        if self.lo is None or self.hi is None:
            return AxisCells.uniform(self.count, size)
        f = size / self.size
        return AxisCells(self.count, float(size), lo=self.lo * f, hi=self.hi * f, weights=self.weights)

    def pool(self, source_values: np.ndarray, axis: int) -> np.ndarray:
        """Values per source cell along ``axis`` of an array -> values per token (weights applied)."""
        if self.weights is None:
            return source_values
        return np.moveaxis(np.tensordot(self.weights, source_values, axes=([1], [axis])), 0, axis)

    def spans(self) -> np.ndarray:
        """``(count, 2)``: each token's ``[start, end]`` in original pixels (the hull of the sources it draws on;
        ``start == end`` for a token that saw no image)."""
        if self.lo is None or self.hi is None:
            k = np.arange(self.count + 1, dtype=np.float64) * (self.size / self.count)
            return np.stack([k[:-1], k[1:]], axis=1)
        if self.weights is None:
            return np.stack([self.lo, self.hi], axis=1)
        out = np.zeros((self.count, 2))
        for t in range(self.count):
            used = (self.weights[t] > 0) & (self.hi > self.lo)
            if used.any():
                out[t] = self.lo[used].min(), self.hi[used].max()
        return out


@dataclass(frozen=True, eq=False)
class Footprint:
    """Where each token of one ``rows x cols`` grid looked in a ``height x width`` original image (module
    docstring).

    Attributes:
        height: original image height in pixels.
        width: original image width in pixels.
        y: the rows' footprint (:class:`AxisCells` over the height).
        x: the columns' footprint (over the width).
    """

    height: float
    width: float
    y: AxisCells
    x: AxisCells

    def __post_init__(self) -> None:
        if abs(self.y.size - self.height) > 1e-9 or abs(self.x.size - self.width) > 1e-9:
            raise ValueError(
                f"axis extents {self.y.size} x {self.x.size} do not match the image {self.height} x {self.width}"
            )

    @classmethod
    def uniform(cls, orig_hw: Sequence[float], grid: Sequence[int]) -> Footprint:
        """Equal cells: a ``(rows, cols)`` grid laid over the whole ``(height, width)`` image."""
        h, w = float(orig_hw[0]), float(orig_hw[1])
        return cls(h, w, AxisCells.uniform(int(grid[0]), h), AxisCells.uniform(int(grid[1]), w))

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return self.y.count, self.x.count

    @property
    def rows(self) -> int:
        """Token rows."""
        return self.y.count

    @property
    def cols(self) -> int:
        """Token columns."""
        return self.x.count

    @property
    def sx(self) -> float:
        """Nominal token columns per original pixel (``cols / W``)."""
        return self.x.scale

    @property
    def sy(self) -> float:
        """Nominal token rows per original pixel (``rows / H``)."""
        return self.y.scale

    @property
    def is_uniform(self) -> bool:
        """Equal cells covering the whole image on both axes."""
        return self.y.is_uniform and self.x.is_uniform

    def scaled(self, height: float, width: float) -> Footprint:
        """The footprint in the pixels of the same image stretched to ``height x width`` (e.g. a zoomed crop's
        footprint brought back to the crop's size in the original)."""
        return Footprint(float(height), float(width), self.y.scaled(height), self.x.scaled(width))

    def pool(self, source_map: np.ndarray) -> np.ndarray:
        """``(source rows, source cols)`` values -> ``(rows, cols)`` token values (each axis' weights applied)."""
        return self.x.pool(self.y.pool(source_map, 0), 1)

    def boxes(self) -> np.ndarray:
        """``(rows, cols, 4)``: each token's box ``(x0, y0, x1, y1)`` in original pixels (the hull of what it saw)."""
        ys, xs = self.y.spans(), self.x.spans()
        out = np.empty((*self.shape, 4))
        out[..., 0], out[..., 2] = xs[None, :, 0], xs[None, :, 1]
        out[..., 1], out[..., 3] = ys[:, None, 0], ys[:, None, 1]
        return out

    def cells_to_pixels(self, box: Sequence[int]) -> tuple[float, float, float, float]:
        """Cell box ``(r0, c0, r1, c1)`` (end-exclusive) -> pixel box ``(x0, y0, x1, y1)``: the hull of its tokens'
        footprints (equal cells: ``c0 * W / cols`` ...)."""
        r0, c0, r1, c1 = (int(v) for v in box)
        if self.is_uniform:
            return ImageGrid(self.height, self.width, *self.shape).cells_to_pixels(box)
        ys, xs = self.y.spans()[r0:r1], self.x.spans()[c0:c1]

        def hull(sp: np.ndarray) -> tuple[float, float]:
            seen = sp[sp[:, 1] > sp[:, 0]]
            sp = seen if len(seen) else sp
            return float(sp[:, 0].min()), float(sp[:, 1].max())

        (x0, x1), (y0, y1) = hull(xs), hull(ys)
        return x0, y0, x1, y1

    def pixels_to_cells(self, box_px: Sequence[float]) -> tuple[int, int, int, int]:
        """Pixel box -> the smallest cell box whose tokens' footprints cover it (at least one cell; a box between
        footprints gets the nearest token)."""

        def axis(lo: float, hi: float, cells: AxisCells) -> tuple[int, int]:
            sp = cells.spans()
            hit = np.nonzero((sp[:, 1] > lo) & (sp[:, 0] < hi))[0] if hi > lo else np.array([], dtype=int)
            if len(hit) == 0:
                centre = (lo + hi) / 2
                dist = np.maximum(sp[:, 0] - centre, 0) + np.maximum(centre - sp[:, 1], 0)
                k = int(np.argmin(dist))
                return k, k + 1
            return int(hit.min()), int(hit.max()) + 1

        x0, y0, x1, y1 = (float(v) for v in box_px)
        c0, c1 = axis(x0, x1, self.x)
        r0, r1 = axis(y0, y1, self.y)
        return r0, c0, r1, c1


def footprint_overlap(tokens: AxisCells, base: AxisCells) -> np.ndarray:
    """``(tokens, base cells)`` along one axis: how much of base cell ``k`` token ``i``'s footprint covers (through
    its pooling weights), each column normalised to sum to 1 (a base cell no token saw is spread evenly)."""
    b_lo, b_hi = base.edges()
    t_lo, t_hi = tokens.edges()
    scale = base.scale / tokens.scale  # both in the base grid's token units
    t_lo, t_hi = t_lo * scale, t_hi * scale
    inter = np.clip(np.minimum(t_hi[:, None], b_hi[None]) - np.maximum(t_lo[:, None], b_lo[None]), 0, None)
    o = tokens.pool(inter, 0)
    total = o.sum(axis=0, keepdims=True)
    return np.where(total > 0, o / np.where(total > 0, total, 1), 1.0 / o.shape[0])


@dataclass(frozen=True)
class ImageGrid:
    """A grid of ``rows x cols`` visual tokens laid over a ``height x width`` original image.

    Attributes:
        height: original image height in pixels.
        width: original image width in pixels.
        rows: token rows.
        cols: token columns.
    """

    height: float
    width: float
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v > 0 for v in (self.height, self.width)):
            raise ValueError(f"image size must be positive, got height={self.height}, width={self.width}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"a token grid needs at least one row and column, got {self.rows} x {self.cols}")

    @classmethod
    def of(cls, orig_hw: Sequence[float], grid: Sequence[int]) -> ImageGrid:
        """From ``(height, width)`` in pixels and ``(rows, cols)``."""
        return cls(float(orig_hw[0]), float(orig_hw[1]), int(grid[0]), int(grid[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return self.rows, self.cols

    @property
    def sx(self) -> float:
        """Token columns per original pixel."""
        return self.cols / self.width

    @property
    def sy(self) -> float:
        """Token rows per original pixel."""
        return self.rows / self.height

    def cells_to_pixels(self, box: Sequence[int]) -> tuple[float, float, float, float]:
        """Cell box ``(r0, c0, r1, c1)`` (end-exclusive) -> pixel box ``(x0, y0, x1, y1)`` in the original image."""
        r0, c0, r1, c1 = box
        px, py = self.width / self.cols, self.height / self.rows  # pixels per cell, per axis
        return c0 * px, r0 * py, c1 * px, r1 * py
