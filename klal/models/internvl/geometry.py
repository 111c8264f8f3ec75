"""InternVL's dynamic tiles, by the arithmetic of transformers' ``GotOcr2ImageProcessor.crop_image_to_patches``.

The processor picks the tile arrangement ``C x R`` (``min_patches <= R C <= max_patches``) whose aspect ``C / R`` is
closest to the image's ``W / H``, a tie going to the arrangement with more tiles while the image covers more than half
of their area (``get_optimal_tiled_canvas``); it squashes the image to ``C S x R S`` and cuts ``S x S`` tiles
row-major; with more than one tile a thumbnail (the whole image squashed to ``S x S``) follows. One tile: that tile
is the whole image squashed, the single view (:class:`klal.models.tiles.TileLayout` with no tiles).
"""

from __future__ import annotations

from klal.models.tiles import TileLayout


def best_arrangement(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """``(cols, rows)`` of the tiling ``get_optimal_tiled_canvas`` picks for a ``height x width`` image."""
    arrangements = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles),
        key=lambda a: a[0] * a[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in arrangements:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * c * r:
            best = (c, r)
    return best


def tile_layout(
    height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int, side: int
) -> TileLayout:
    """The tiling of a ``height x width`` image (module docstring).

    Args:
        height: original image height in pixels.
        width: original image width in pixels.
        tile: the tile side ``(S_h, S_w)`` (``size`` of the image processor; square on the checkpoints).
        min_tiles: ``min_patches``.
        max_tiles: ``max_patches``.
        side: tokens per side of a view (``sqrt(image_seq_length)``).

    Raises:
        ValueError: a non-positive size, or a non-square tile.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if tile[0] != tile[1]:
        raise ValueError(f"klal supports square InternVL tiles, got {tile[0]} x {tile[1]}")
    s = int(tile[0])
    cols, rows = best_arrangement(height, width, tile, min_tiles, max_tiles)
    if cols * rows == 1:
        return TileLayout(height, width, (s, s), s, side, 0, 0)
    return TileLayout(height, width, (rows * s, cols * s), s, side, rows, cols)
