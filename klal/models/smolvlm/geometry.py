"""Where SmolVLM's visual tokens look: each tile's and the global view's, in original pixels.

The arithmetic of transformers' ``Idefics3ImageProcessor`` (``get_resize_output_image_size``: the longest edge to
``size``, the other by the aspect, made even, capped at 4096; ``resize_for_vision_encoder``: both edges up to whole
multiples of ``max_image_size`` ``M``; ``split_images``: ``R x C`` crops of ``M x M`` row-major, then the whole image
squashed to ``M x M``) and of the connector's pixel shuffle (``s x s`` neighbouring patches per token), per axis:

* both resizes squash the whole image, so resized pixel ``y`` of the ``H2``-px second resize is original
  ``y * H / H2``; tile ``r`` holds resized rows ``[r M, (r + 1) M)``, and its token ``k`` the patch rows
  ``[s k, s (k + 1))``, i.e. resized rows ``r M + [s k P, s (k + 1) P)`` (``P`` the patch side);
* the global view's token ``k`` saw ``[s k P, s (k + 1) P) * H / M`` of the original (equal cells when
  ``n s P = M``, as on the real checkpoints: 8 x 4 x 16 = 512).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klal.geometry import AxisCells, Footprint

MAX_IMAGE_SIDE = 4096
"""transformers' cap on the first resize's longest edge (``MAX_IMAGE_SIZE`` of the Idefics3 image processor)."""


@dataclass(frozen=True)
class SplitLayout:
    """An image's splitting on SmolVLM (module docstring).

    Attributes:
        height: original height in pixels.
        width: original width in pixels.
        resized: ``(H2, W2)``, the second resize (whole multiples of ``tile``).
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


def split_layout(height: int, width: int, longest: int, tile: int, side: int) -> SplitLayout:
    """The splitting of a ``height x width`` image, by the image processor's arithmetic.

    Args:
        height: original image height in pixels.
        width: original image width in pixels.
        longest: ``size["longest_edge"]``.
        tile: ``max_image_size["longest_edge"]``.
        side: tokens per side of a view (``sqrt(image_seq_len)``).

    Raises:
        ValueError: a non-positive size, or an image so thin that the processor's second resize has no pixel.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    # get_resize_output_image_size: longest edge to `longest`, the other by the aspect, rounded up to even.
    aspect = width / height
    if width >= height:
        w1, h1 = longest, int(longest / aspect)
        h1 += h1 % 2
    else:
        h1, w1 = longest, int(longest * aspect)
        w1 += w1 % 2
    h1, w1 = max(h1, 1), max(w1, 1)
    aspect = w1 / h1
    if w1 >= h1 and w1 > MAX_IMAGE_SIDE:
        w1, h1 = MAX_IMAGE_SIDE, max(int(MAX_IMAGE_SIDE / aspect), 1)
    elif h1 > w1 and h1 > MAX_IMAGE_SIDE:
        h1, w1 = MAX_IMAGE_SIDE, max(int(MAX_IMAGE_SIDE * aspect), 1)
    # resize_for_vision_encoder: both edges up to whole tiles (the short one through the aspect again).
    aspect = w1 / h1
    if w1 >= h1:
        w2 = math.ceil(w1 / tile) * tile
        h2 = math.ceil(int(w2 / aspect) / tile) * tile
    else:
        h2 = math.ceil(h1 / tile) * tile
        w2 = math.ceil(int(h2 * aspect) / tile) * tile
    if h2 == 0 or w2 == 0:
        raise ValueError(f"a {width} x {height} image is too thin for SmolVLM's processor (it resizes to {w2} x {h2})")
    rows, cols = (h2 // tile, w2 // tile) if (h2 > tile or w2 > tile) else (0, 0)
    return SplitLayout(height, width, (h2, w2), tile, side, rows, cols)


def _tile_axis(size: int, resized: int, tile: int, index: int, lay: SplitLayout) -> AxisCells:
    """Tile ``index`` along one axis: its tokens' original-pixel intervals."""
    k = np.arange(lay.side, dtype=np.float64)
    lo = (index * tile + k * lay.token_px) * size / resized
    return AxisCells(lay.side, float(size), lo=lo, hi=lo + lay.token_px * size / resized)


def split_footprints(lay: SplitLayout) -> list[Footprint]:
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


def stitched_footprint(lay: SplitLayout) -> Footprint:
    """The footprint of an image's merged map: its tiles stitched, or its global view when it has no tiles."""
    fps = split_footprints(lay)
    if lay.rows == 0:
        return fps[-1]
    return stitch_footprints(fps[:-1], lay.rows, lay.cols)
