"""The Qwen-VL line's resize rule (``smart_resize``), shared by Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5.

The vision tower cuts the resized image into ``patch`` x ``patch`` px patches (``image_grid_thw`` counts them) and its
merger joins ``merge`` x ``merge`` neighbouring patches into one LLM visual token, so one visual token covers a
``patch * merge`` px square of the resized image (28 px on Qwen2/2.5-VL, 32 px on Qwen3-VL and Qwen3.5); the tokens
are row-major over that grid. The processor resizes every image with ``smart_resize``: both sides become multiples of
``patch * merge`` close to the original and the area is brought inside ``[min_pixels, max_pixels]``.
:func:`smart_resize_hw` gives the same numbers (tested against transformers' own function). Since the whole image
is scaled by one factor per axis and the patches tile the resized image exactly, every token's footprint in the
original image is an equal cell, ``W / cols`` by ``H / rows`` px: the family seam's default
(:meth:`klal.models.family.VLMFamily.footprints`), checked against the processor's own patch order at the real
checkpoints' geometry in ``tests/test_geometry_real.py``.
"""

from __future__ import annotations

import math

from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

PATCH_PX = 14
"""Side in resized-image pixels of one Qwen2/2.5-VL vision-tower patch (``image_grid_thw`` counts these)."""
MERGE = 2
"""The vision merger joins ``MERGE`` x ``MERGE`` patches into one LLM visual token (``spatial_merge_size``)."""
TOKEN_PX = PATCH_PX * MERGE
"""Side in resized-image pixels of one Qwen2/2.5-VL LLM visual token (28)."""
MAX_ASPECT = 200
"""The processor refuses images whose longer side is more than this many times the shorter one."""


def _round_to_factor(value: float, factor: int) -> int:
    # Python's round() is round-half-to-even, which is what the processor uses: 42 px -> 56, 70 px -> 56.
    return round(value / factor) * factor


def smart_resize_hw(
    height: int,
    width: int,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = TOKEN_PX,
) -> tuple[int, int]:
    """The ``(height, width)`` the Qwen-VL image processor resizes an image to.

    Both sides become multiples of ``factor`` close to the original (same aspect ratio as nearly as possible) and the
    area is brought inside ``[min_pixels, max_pixels]``; gives the same numbers as transformers' ``smart_resize``.

    Args:
        height: original image height in pixels.
        width: original image width in pixels.
        min_pixels: lower bound on the resized area.
        max_pixels: upper bound on the resized area.
        factor: both resized sides are multiples of this (patch x merge: 28 on Qwen2/2.5-VL, 32 on Qwen3-VL).

    Raises:
        ValueError: non-positive sizes or an aspect ratio above :data:`MAX_ASPECT` (the processor refuses those too).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize_hw: image size must be positive, got height={height}, width={width}")
    if factor <= 0:
        raise ValueError(f"smart_resize_hw: factor must be positive, got {factor}")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT:
        raise ValueError(
            f"smart_resize_hw: aspect ratio must be at most {MAX_ASPECT}, got {aspect} for {height}x{width}"
        )
    h = _round_to_factor(height, factor)
    w = _round_to_factor(width, factor)
    if h * w > max_pixels:
        # Shrink both sides by the same factor, rounding down so the area stays under the cap.
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        # Grow both sides by the same factor, rounding up so the area reaches the floor.
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w
