"""Pictures: attention and target maps laid over the image they belong to."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def grid_to_image(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsample a ``(gh, gw)`` token map to an image of ``size = (width, height)``.

    The processor's resize keeps the aspect ratio up to rounding to 28 px, so stretching the token grid over the
    original image puts every cell where its pixels came from.
    """
    g = np.asarray(grid, dtype=np.float64)
    w, h = size
    rows = np.minimum((np.arange(h) + 0.5) * g.shape[0] / h, g.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * g.shape[1] / w, g.shape[1] - 1).astype(int)
    return g[rows][:, cols]


def overlay(
    ax: Any, image: Image.Image, grid: np.ndarray | None, title: str = "", cmap: str = "inferno", alpha: float = 0.55
) -> None:
    """Draw ``image`` on matplotlib axes ``ax`` with ``grid`` (a token map) as a semi-transparent heat map.

    The map is min-max scaled per panel: attention of an untrained model is close to uniform, and a fixed scale
    would paint it as one flat colour.
    """
    ax.imshow(image)
    if grid is not None:
        g = np.asarray(grid, dtype=np.float64)
        lo, hi = float(g.min()), float(g.max())
        up = grid_to_image((g - lo) / max(hi - lo, 1e-12), image.size)
        ax.imshow(up, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, extent=(0, image.width, image.height, 0))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
