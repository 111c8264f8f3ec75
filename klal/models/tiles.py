"""Tile-major families: each image is cut into ``R x C`` equal tiles of a squashed copy plus one global view (the
whole image squashed to one tile), each seen as an ``n x n`` grid of visual tokens, tiles row-major then the global
view (SmolVLM / Idefics3 image splitting, InternVL dynamic tiles with a thumbnail).

Both resizes squash the whole image, so a tile's token ``k`` along an axis saw resized pixels
``index * M + [k M / n, (k + 1) M / n)`` of the ``R M``-px (or ``C M``) resize, i.e. that times ``H / (R M)`` in the
original; the global view's token ``k`` saw ``[k, k + 1] * H / n``. :class:`TileMajorFamily` gives every tile its
footprint, stitches the tiles' maps into one ``(R n) x (C n)`` map and adds the global view's map resampled onto it
through the footprints (:meth:`~klal.models.family.VLMFamily.merge_grids`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from klal.geometry import AxisCells, Footprint, footprint_overlap
from klal.models.family import Grid, VLMFamily


@dataclass(frozen=True)
class TileLayout:
    """An image's tiling (module docstring).

    Attributes:
        height: original height in pixels.
        width: original width in pixels.
        resized: ``(H2, W2)``, the squashed copy the tiles are cut from (``(R M, C M)``; ``(M, M)`` without tiles).
        tile: ``M``, the tile (and global view) side in pixels.
        side: ``n``, tokens per side of a tile or the global view.
        rows: tile rows ``R`` (0 when the image has only the global view).
        cols: tile columns ``C``.
    """

    height: int
    width: int
    resized: tuple[int, int]
    tile: int
    side: int
    rows: int
    cols: int

    @property
    def token_px(self) -> float:
        """Resized pixels one token spans along an axis (``s P = M / n`` when the patches tile the view)."""
        return self.tile / self.side


def _tile_axis(size: int, resized: int, tile: int, index: int, lay: TileLayout) -> AxisCells:
    """Tile ``index`` along one axis: its tokens' original-pixel intervals."""
    k = np.arange(lay.side, dtype=np.float64)
    lo = (index * tile + k * lay.token_px) * size / resized
    return AxisCells(lay.side, float(size), lo=lo, hi=lo + lay.token_px * size / resized)


def tile_footprints(lay: TileLayout) -> list[Footprint]:
    """Per grid in sequence order: the tiles row-major, then the global view."""
    h, w = float(lay.height), float(lay.width)
    (h2, w2), m = lay.resized, lay.tile
    out = [
        Footprint(h, w, _tile_axis(lay.height, h2, m, r, lay), _tile_axis(lay.width, w2, m, c, lay))
        for r in range(lay.rows)
        for c in range(lay.cols)
    ]
    # The global view is the whole image squashed to M x M: one tile of a 1 x 1 split.
    out.append(Footprint(h, w, _tile_axis(lay.height, m, m, 0, lay), _tile_axis(lay.width, m, m, 0, lay)))
    return out


def stitch_footprints(tiles: Sequence[Footprint], rows: int, cols: int) -> Footprint:
    """One footprint for ``rows x cols`` tile footprints laid side by side (given row-major)."""
    ys, xs = [tiles[r * cols].y for r in range(rows)], [tiles[c].x for c in range(cols)]

    def axis(parts: list[AxisCells]) -> AxisCells:
        lo = np.concatenate([p.lo for p in parts])
        hi = np.concatenate([p.hi for p in parts])
        return AxisCells(len(lo), parts[0].size, lo=lo, hi=hi)

    return Footprint(tiles[0].height, tiles[0].width, axis(ys), axis(xs))


def stitched_footprint(lay: TileLayout) -> Footprint:
    """The footprint of an image's merged map: its tiles stitched, or its global view when it has no tiles."""
    fps = tile_footprints(lay)
    if lay.rows == 0:
        return fps[-1]
    return stitch_footprints(fps[:-1], lay.rows, lay.cols)


class TileMajorFamily(VLMFamily):
    """A family whose images are tiles plus a global view (module docstring); subclasses give :meth:`layout`."""

    @abc.abstractmethod
    def layout(self, processor: Any, height: int, width: int) -> TileLayout:
        """The image's tiling under ``processor``'s settings."""

    def processor_grids(self, processor: Any, height: int, width: int) -> list[Grid]:
        """One ``n x n`` grid per tile (row-major over the tiles), then the global view's."""
        lay = self.layout(processor, height, width)
        return [(lay.side, lay.side)] * (lay.rows * lay.cols + 1)

    def footprints(
        self, processor: Any, height: int, width: int, grids: Sequence[Grid] | None = None
    ) -> list[Footprint | None]:
        """Each tile's tokens see their tile's share of the image, the global view's the whole image
        (:func:`tile_footprints`)."""
        fps: list[Footprint | None] = list(tile_footprints(self.layout(processor, height, width)))
        if grids is not None and [f.shape for f in fps if f is not None] != [tuple(g) for g in grids]:
            raise RuntimeError(f"{self.label}: grids {list(grids)} do not match the {height} x {width} image's tiles")
        return fps

    @staticmethod
    def map_grid(grids: Sequence[Grid]) -> Grid:
        """Not defined by the grids alone (the tiling's rows and columns are not in them): use
        :meth:`map_footprint`."""
        raise ValueError("a tile-major family's map grid depends on the image's tiling; use map_footprint")

    def map_footprint(self, processor: Any, height: int, width: int) -> Footprint:
        """The stitched tiles' footprint (``(R n) x (C n)``), or the global view's when the image has no tiles."""
        return stitched_footprint(self.layout(processor, height, width))

    def merge_grids(self, maps: Sequence[Any], footprints: Sequence[Footprint | None] | None = None) -> Any:
        """The tile maps stitched into one ``(R n) x (C n)`` map (tiles placed by their footprints), plus the global
        map resampled onto it: each global cell's value is spread over the stitched tokens whose footprints overlap
        it, in proportion to the overlap, so the merged map's total is the sum of all totals.

        Raises:
            ValueError: several grids without footprints (the tiles' places are not in the maps).
        """
        if len(maps) == 1:
            return maps[0]
        if footprints is None or any(f is None for f in footprints):
            raise ValueError(f"{self.label}: merging an image's tile maps needs their footprints (the image size)")
        tiles, fps = maps[:-1], footprints[:-1]
        y0 = sorted({float(f.y.lo[0]) for f in fps})
        x0 = sorted({float(f.x.lo[0]) for f in fps})
        n = tiles[0].shape[-1]
        out = np.zeros((*tiles[0].shape[:-2], len(y0) * n, len(x0) * n))
        for m, f in zip(tiles, fps):
            r, c = y0.index(float(f.y.lo[0])), x0.index(float(f.x.lo[0]))
            out[..., r * n : (r + 1) * n, c * n : (c + 1) * n] = m
        whole = stitch_footprints(fps, len(y0), len(x0))
        g = footprints[-1]
        oy, ox = footprint_overlap(whole.y, g.y), footprint_overlap(whole.x, g.x)
        return out + np.einsum("ik,...kl,jl->...ij", oy, maps[-1], ox)
