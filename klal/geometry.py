"""Qwen2.5-VL token geometry, in one place: patch and merge sizes, the pixel bounds, and the processor's resize.

The vision tower cuts the resized image into ``PATCH_PX`` x ``PATCH_PX`` patches (``image_grid_thw`` counts them) and
its merger joins ``MERGE`` x ``MERGE`` neighbouring patches into one LLM visual token, so one visual token covers a
``TOKEN_PX`` x ``TOKEN_PX`` (28 x 28) cell of the resized image; the tokens are row-major over that grid.
The processor resizes every image with ``smart_resize``: both sides become multiples of ``TOKEN_PX`` close to the
original and the area is brought inside ``[min_pixels, max_pixels]``. :func:`smart_resize_hw` gives the same numbers
(tested against transformers' own function), :func:`token_grid` the resulting visual-token grid.

Pixel bounds. :data:`DEFAULT_MIN_PIXELS` is transformers' own default (56 x 56). :data:`DEFAULT_MAX_PIXELS` is
448 x 448 (at most 256 visual tokens per image), the bound :class:`klal.models.loader.ModelConfig` builds the
processor with by default, and so the one every default in the project uses: a converter that writes
processor-resized coordinates, a sampler that counts tokens or a target map built with the defaults then describe the
images the model actually sees. transformers' processor default (``28 * 28 * 1280``) is not used anywhere: a checkpoint
or a config that sets other bounds (the 7B configs use ``1024 * 28 * 28``) must pass its own values to every function
here.
"""

from __future__ import annotations

import math

PATCH_PX = 14
"""Side in resized-image pixels of one vision-tower patch (``image_grid_thw`` counts these)."""
MERGE = 2
"""The vision merger joins ``MERGE`` x ``MERGE`` patches into one LLM visual token (``spatial_merge_size``)."""
TOKEN_PX = PATCH_PX * MERGE
"""Side in resized-image pixels of one LLM visual token (28)."""
DEFAULT_MIN_PIXELS = 56 * 56
"""Lower bound on a resized image's area: transformers' default ``min_pixels`` of the Qwen2-VL image processor."""
DEFAULT_MAX_PIXELS = 448 * 448
"""Upper bound on a resized image's area: the project's default (at most 256 visual tokens; see the module docstring
for why this and not transformers' ``28 * 28 * 1280``)."""
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
    """The ``(height, width)`` the Qwen2-VL / Qwen2.5-VL image processor resizes an image to.

    Both sides become multiples of ``factor`` close to the original (same aspect ratio as nearly as possible) and the
    area is brought inside ``[min_pixels, max_pixels]``; gives the same numbers as transformers' ``smart_resize``.

    Args:
        height: original image height in pixels.
        width: original image width in pixels.
        min_pixels: lower bound on the resized area.
        max_pixels: upper bound on the resized area.
        factor: both resized sides are multiples of this (``TOKEN_PX``: patch 14 x merge 2).

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


def token_grid(
    height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """Rows and columns of LLM visual tokens for an image of this original size: :func:`smart_resize_hw` // 28."""
    ph, pw = smart_resize_hw(height, width, min_pixels, max_pixels)
    return ph // TOKEN_PX, pw // TOKEN_PX
