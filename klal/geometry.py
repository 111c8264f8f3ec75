"""Family-neutral geometry: an image's grid of visual tokens in original pixels, and the project's pixel budget.

Every supported family turns an image into one or more grids of LLM visual tokens, each covering the whole original
image with equal cells, row-major (:mod:`klal.models.family`); how many rows and columns comes from the family. This
module holds the one mapping between original pixels and such a grid's cells, used by the target maps
(:mod:`klal.data.targets`) and the grounding methods' boxes (:mod:`klal.grounding.ops`): a cell is ``W / cols`` px
wide and ``H / rows`` px tall, cell ``(i, j)`` covers ``[j, j + 1] x [i, i + 1]`` in token units.

Pixel bounds. :data:`DEFAULT_MIN_PIXELS` (56 x 56) and :data:`DEFAULT_MAX_PIXELS` (448 x 448) are the bounds on the
resized image area that :class:`klal.models.config.ModelConfig` builds the processor with by default, for the
families whose processors resize to a pixel budget (the Qwen families: at most 256 visual tokens of 28 px, or 196 of
32 px, per image); a checkpoint or a config that sets other bounds passes its own values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
