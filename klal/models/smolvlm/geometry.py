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

from klal.models.tiles import TileLayout

MAX_IMAGE_SIDE = 4096
"""transformers' cap on the first resize's longest edge (``MAX_IMAGE_SIZE`` of the Idefics3 image processor)."""


def split_layout(height: int, width: int, longest: int, tile: int, side: int) -> TileLayout:
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
    return TileLayout(height, width, (h2, w2), tile, side, rows, cols)
