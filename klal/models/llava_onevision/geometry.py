"""Where LLaVA-OneVision's visual tokens look: the base view and the anyres tile map, in original pixels.

The arithmetic of transformers' ``LlavaOnevisionImageProcessor`` (``select_best_resolution``,
``get_patch_output_size``, the centred padding, ``divide_to_patches``) and of the model's ``pack_image_features``
(``unpad_image``, the ``anyres_max_N`` bilinear shrink, one ``image_newline`` per tile-map row), written out per
axis so that every token gets the interval of the original image its patches saw:

* **base view**: the image squashed to the tower's ``image_size`` (``S`` px square); the tower cuts it into
  ``p = S // P`` patches of ``P`` px per axis, which cover ``p * P`` of the ``S`` px (378 of 384 on the real
  checkpoints), so base column ``k`` saw ``[k P, (k + 1) P] * W / S`` and the last ``(S - p P) / S`` of the image
  is seen by no base token;
* **tiles**: the image resized, aspect kept, to ``new_h x new_w`` inside the best pinpoint resolution
  (``get_patch_output_size``: the long side fills it, the other rounds up), pasted centred on a black canvas, cut
  into ``S``-px tiles, each seen by ``p x p`` patches. Feature row ``r`` of the stitched ``(p * rows) x (p * cols)``
  map saw canvas rows ``[(r // p) S + (r % p) P, + P]``, i.e. original rows ``(canvas - paste) * H / new_h`` clipped
  to the image (nothing, for a row of padding; part, for an edge row or the ``S - p P`` px between tiles no patch
  sees). ``unpad_image`` then drops ``pad`` feature rows (or columns) at both ends, ``pad`` computed in feature
  units, so the kept edge rows may be part padding;
* **pooling**: past ``anyres_max_N`` (the kept map larger than ``1.1^2 * N * p^2`` cells), the map is shrunk
  bilinearly (``torch.nn.functional.interpolate``, ``align_corners=False``): each token is a weighted mix of two
  feature rows and two feature columns, recorded as the :class:`~klal.geometry.AxisCells` weights.

A long thin image can leave no tile-map row (or column) at all: its tile grid is then empty (0 rows or 0 columns,
still one ``image_newline`` per row), which the family keeps in the token layout but gives no cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from klal.geometry import AxisCells, Footprint


@dataclass(frozen=True)
class AnyresAxis:
    """One axis of an image's anyres layout (heights for rows, widths for columns).

    Attributes:
        size: the original image's extent in pixels.
        tiles: tiles along the axis (the best pinpoint resolution over the tower's ``image_size``).
        resized: the image's extent after the aspect-keeping resize into the tiles (``get_patch_output_size``).
        paste: padding before the image on the canvas (centred: ``(tiles * S - resized) // 2``).
        kept: ``(start, stop)`` of the feature rows ``unpad_image`` keeps, in the stitched map of ``p * tiles``.
        tokens: the tile map's tokens along the axis after the ``anyres_max`` shrink (``stop - start`` without it).
    """

    size: int
    tiles: int
    resized: int
    paste: int
    kept: tuple[int, int]
    tokens: int


@dataclass(frozen=True)
class AnyresLayout:
    """An image's anyres geometry on LLaVA-OneVision (see the module docstring).

    Attributes:
        image_size: the tower's input side ``S`` in pixels (384 on the real checkpoints).
        patch_size: the tower's patch side ``P`` (14).
        y: rows.
        x: columns.
        pooled: whether the ``anyres_max`` shrink applies.
    """

    image_size: int
    patch_size: int
    y: AnyresAxis
    x: AnyresAxis
    pooled: bool

    @property
    def side(self) -> int:
        """``p``: patches per side of a view or tile (27 on the real checkpoints)."""
        return self.image_size // self.patch_size

    @property
    def tile_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the tile map in the sequence (either may be 0 for a long thin image)."""
        return self.y.tokens, self.x.tokens


def anyres_layout(
    height: int, width: int, image_size: int, patch_size: int, pinpoints: list, aspect: str = "anyres_max_9"
) -> AnyresLayout:
    """The anyres layout of a ``height x width`` image (module docstring), by the processor's and model's arithmetic.

    Args:
        height: original image height in pixels.
        width: original image width in pixels.
        image_size: the tower's input side (``vision_config.image_size``).
        patch_size: the tower's patch side (``vision_config.patch_size``).
        pinpoints: ``image_grid_pinpoints`` as ``[[h, w], ...]``.
        aspect: ``vision_aspect_ratio`` (``anyres_max_N``).

    Raises:
        ValueError: a non-positive size.
    """
    from transformers.image_processing_utils import select_best_resolution

    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    p = image_size // patch_size
    best_h, best_w = select_best_resolution([height, width], [list(r) for r in pinpoints])
    # get_patch_output_size: the axis with the smaller scale fills the target, the other rounds up (capped).
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    cur_h, cur_w = p * (best_h // image_size), p * (best_w // image_size)
    # unpad_image, in feature units: the axis the image fills less is trimmed at both ends.
    kept_h, kept_w = (0, cur_h), (0, cur_w)
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
        kept_h = (pad, max(cur_h - pad, pad))
    else:
        pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
        kept_w = (pad, max(cur_w - pad, pad))
    rows, cols = kept_h[1] - kept_h[0], kept_w[1] - kept_w[0]
    max_tiles = int(aspect.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_tiles * p * p))
    pooled = ratio > 1.1
    if pooled:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return AnyresLayout(
        image_size,
        patch_size,
        AnyresAxis(height, best_h // image_size, new_h, (best_h - new_h) // 2, kept_h, rows),
        AnyresAxis(width, best_w // image_size, new_w, (best_w - new_w) // 2, kept_w, cols),
        pooled,
    )


def base_axis(size: int, image_size: int, patch_size: int) -> AxisCells:
    """The base view along one axis: ``p`` patches of ``P`` px of the image squashed to ``S`` px (the last
    ``S - p P`` px unseen)."""
    p = image_size // patch_size
    k = np.arange(p, dtype=np.float64)
    scale = size / image_size  # original pixels per squashed pixel
    return AxisCells(p, float(size), lo=k * patch_size * scale, hi=(k + 1) * patch_size * scale)


def tile_axis(layout: AnyresLayout, axis: AnyresAxis) -> AxisCells:
    """The tile map along one axis: the kept feature rows' original-pixel intervals, pooled when the layout is."""
    s, patch, p = layout.image_size, layout.patch_size, layout.side
    r = np.arange(*axis.kept, dtype=np.float64)
    canvas_lo = (r // p) * s + (r % p) * patch
    to_orig = axis.size / axis.resized  # original pixels per resized pixel
    lo = np.clip((canvas_lo - axis.paste) * to_orig, 0.0, float(axis.size))
    hi = np.clip((canvas_lo + patch - axis.paste) * to_orig, 0.0, float(axis.size))
    weights = bilinear_weights(len(r), axis.tokens) if layout.pooled else None
    return AxisCells(axis.tokens, float(axis.size), lo=lo, hi=hi, weights=weights)


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)``: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` along one axis
    (each output samples the input at ``(i + 0.5) n_in / n_out - 0.5``, clamped at 0, between two neighbours)."""
    w = np.zeros((n_out, n_in))
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), i1), frac)
    return w


def anyres_footprints(layout: AnyresLayout) -> list[Footprint | None]:
    """``[base, tiles]`` footprints of an image; the tile entry is None when its tile map is empty."""
    h, w = float(layout.y.size), float(layout.x.size)
    s, patch = layout.image_size, layout.patch_size
    base = Footprint(h, w, base_axis(layout.y.size, s, patch), base_axis(layout.x.size, s, patch))
    if layout.y.tokens == 0 or layout.x.tokens == 0:
        return [base, None]
    return [base, Footprint(h, w, tile_axis(layout, layout.y), tile_axis(layout, layout.x))]
