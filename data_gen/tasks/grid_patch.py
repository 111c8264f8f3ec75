"""Grid patch: find the grid cell that holds a named coloured shape.

The image is a white square divided into ``R x C`` cells by grey grid lines. One cell (the target) holds a shape of
a given colour, e.g. a red star; ``num_distractors`` other cells hold other shape/colour pairs (never the target's
pair), the rest are empty. The question names the target ("Which cell contains the red star?") and the answer is its
cell as ``"(row, column)"``.

Conventions:
    * Rows and columns are 1-based, counted from the top-left cell, which is ``(1, 1)``; every question phrasing
      says so.
    * Grid edges: column edge ``k`` (``k = 0..C``) lies at ``x = floor(k * image_size / C + 0.5)``, row edges
      likewise with ``R``. Cell ``(r, c)`` spans ``[x_{c-1}, x_c] x [y_{r-1}, y_r]``; that box is the evidence.
    * Grid lines are ``line_width`` px wide, centred on the inner edges; the outer border lies fully inside the
      image. Shapes are centred in the free part of their cell and never touch a line.
    * Shapes are drawn without anti-aliasing, so every shape pixel has exactly its colour's RGB value
      (:data:`COLOURS`).

Rows, columns and the target cell are drawn uniformly, so the target position is uniform over the cells of each
grid; the answers are not balanced by index (:meth:`GridPatchTask.answer_classes` is None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from data_gen.base import GenerationError, Sample, Task, TaskConfig
from klal.data.schema import Evidence

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 150, 40),
    "blue": (20, 60, 220),
    "yellow": (240, 200, 0),
    "orange": (255, 130, 0),
    "purple": (130, 40, 170),
    "pink": (255, 110, 190),
    "cyan": (0, 190, 210),
    "brown": (130, 75, 25),
}
"""Colour name -> RGB of every colour a shape may have."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
"""Every shape the generator can draw."""

BACKGROUND = (255, 255, 255)
GRID_COLOUR = (110, 110, 110)
MIN_CELL_PX = 10
"""Smallest cell interior (cell side minus two line widths, the worst case at the border) for a recognisable
shape."""

QUESTION_TEMPLATES: tuple[str, ...] = (
    "Which cell contains the {target}? Answer as (row, column), counting from 1 at the top-left cell.",
    "In which grid cell is the {target}? Give (row, column); rows are numbered from the top and columns from the "
    "left, starting at 1.",
    "Find the {target} in the grid. Which cell is it in? Reply as (row, column), where the top-left cell is (1, 1).",
    "Where is the {target}? Answer with the cell as (row, column), 1-based from the top-left corner.",
)
"""Question phrasings; each states the 1-based (row, column) convention."""


@dataclass
class GridPatchConfig(TaskConfig):
    """Knobs of the grid patch task (plus ``image_size``, ``line_width``, ``max_attempts`` of TaskConfig)."""

    line_width: int = 2
    """Width of the grid lines in pixels."""
    rows: tuple[int, int] = (4, 12)
    """Inclusive range the number of grid rows is drawn from, per sample."""
    cols: tuple[int, int] = (4, 12)
    """Inclusive range the number of grid columns is drawn from, per sample."""
    shapes: tuple[str, ...] = SHAPES
    """Shapes that targets and distractors are drawn from: circle, square, triangle, diamond, star, cross, hexagon."""
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
    """Colours that targets and distractors are drawn from: red, green, blue, yellow, orange, purple, pink, cyan,
    brown."""
    num_distractors: int = 8
    """Cells other than the target that hold a shape; must fit in the smallest grid."""
    share_attribute_prob: float = 0.3
    """Chance that a distractor shares the target's shape or colour (never both), which makes it harder."""
    shape_scale: float = 0.7
    """Shape diameter as a fraction of the cell's free interior (the part not covered by grid lines)."""
    state_grid_size: bool = False
    """Say the number of rows and columns in the question."""


def _edges(n: int, size: int) -> list[int]:
    """Pixel coordinates of the ``n + 1`` grid edges splitting ``size`` pixels into ``n`` cells."""
    return [int(math.floor(k * size / n + 0.5)) for k in range(n + 1)]


def _line_spans(edges: list[int], lw: int) -> list[tuple[int, int]]:
    """Pixel spans ``[a, b)`` of the grid lines on ``edges``: centred on inner edges, inside the image at the border."""
    spans = [(e - lw // 2, e - lw // 2 + lw) for e in edges]
    spans[0] = (0, lw)
    spans[-1] = (edges[-1] - lw, edges[-1])
    return spans


def _check_range(name: str, value: Any) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise GenerationError(f"{name} must be a (min, max) pair of integers, got {value!r}") from None
    if not 1 <= lo <= hi:
        raise GenerationError(f"{name}={value!r} is not a valid range: need 1 <= min <= max")
    return lo, hi


def _check_names(shapes: Any, colours: Any) -> None:
    """Raise GenerationError unless ``shapes`` and ``colours`` are non-empty lists of known, distinct names."""
    for opt, names, known in (("shapes", shapes, SHAPES), ("colours", colours, tuple(COLOURS))):
        if isinstance(names, str) or not names:
            raise GenerationError(f"{opt} must be a non-empty list of names from {list(known)}, got {names!r}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GenerationError(f"{opt}: unknown name(s) {unknown}; choose from {list(known)}")
        if len(set(names)) != len(names):
            raise GenerationError(f"{opt} lists a name twice: {list(names)}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    """Draw ``shape`` of radius ``r`` (half its extent) centred on ``(cx, cy)``, without anti-aliasing."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        # A square of the full extent looks much bigger than the other shapes; shrink it to a similar area.
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # An equilateral triangle inscribed in the circle spans r above the centre but only r/2 below it; shift it
        # down by r/4 so it sits centred in the cell.
        pts = [(cx + r * math.cos(a), cy + r / 4 + r * math.sin(a)) for a in np.radians([-90, 30, 150])]
        draw.polygon(pts, fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "hexagon":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.radians(np.arange(0, 360, 60))]
        draw.polygon(pts, fill=fill)
    else:  # validate() rejects unknown names, so this is a programming error
        raise ValueError(f"unknown shape {shape!r}")


class GridPatchTask(Task):
    """Grid patch: answer the 1-based ``(row, column)`` of the cell holding the named coloured shape."""

    name = "grid_patch"
    config_cls = GridPatchConfig
    version: ClassVar[str] = "1"
    """Bumped whenever the same (seed, index, config) would draw a different sample."""
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "easy": {"rows": (3, 5), "cols": (3, 5), "num_distractors": 3, "share_attribute_prob": 0.0},
        "medium": {"rows": (4, 8), "cols": (4, 8), "num_distractors": 8, "share_attribute_prob": 0.3},
        "hard": {"rows": (8, 12), "cols": (8, 12), "num_distractors": 20, "share_attribute_prob": 0.7},
    }

    config: GridPatchConfig

    def validate(self) -> None:
        """Raise GenerationError naming the option when the config cannot produce a sample."""
        c = self.config
        rows = _check_range("rows", c.rows)
        cols = _check_range("cols", c.cols)
        if c.image_size < 28:
            raise GenerationError(f"image_size={c.image_size} is too small: need at least 28 px")
        if c.line_width < 1:
            raise GenerationError(f"line_width={c.line_width} must be at least 1 (the grid lines are drawn)")
        smallest = c.image_size // max(rows[1], cols[1]) - 2 * c.line_width
        if smallest < MIN_CELL_PX:
            raise GenerationError(
                f"image_size={c.image_size} is too small for up to {rows[1]} rows / {cols[1]} cols with "
                f"line_width={c.line_width}: cells would have {smallest} px free, need >= {MIN_CELL_PX}"
            )
        _check_names(c.shapes, c.colours)
        if c.num_distractors < 0:
            raise GenerationError(f"num_distractors={c.num_distractors} must be >= 0")
        if c.num_distractors > rows[0] * cols[0] - 1:
            raise GenerationError(
                f"num_distractors={c.num_distractors} does not fit the smallest grid rows={rows[0]} x cols={cols[0]} "
                f"({rows[0] * cols[0] - 1} free cells besides the target)"
            )
        if c.num_distractors > 0 and len(c.shapes) == 1 and len(c.colours) == 1:
            raise GenerationError(
                "distractors need a shape or colour different from the target: give more than one of shapes/colours "
                "or set num_distractors=0"
            )
        if not 0.0 <= c.share_attribute_prob <= 1.0:
            raise GenerationError(f"share_attribute_prob={c.share_attribute_prob} must be in [0, 1]")
        if not 0.0 < c.shape_scale <= 1.0:
            raise GenerationError(f"shape_scale={c.shape_scale} must be in (0, 1]")

    def _distractor(self, rng: np.random.Generator, shape: str, colour: str) -> tuple[str, str]:
        """A shape/colour pair different from the target's ``(shape, colour)``."""
        c = self.config
        other_shapes = [s for s in c.shapes if s != shape]
        other_colours = [k for k in c.colours if k != colour]
        share = rng.random() < c.share_attribute_prob
        if not other_shapes:  # one shape only: every distractor necessarily shares it
            return shape, str(rng.choice(other_colours))
        if not other_colours:
            return str(rng.choice(other_shapes)), colour
        if share:
            if rng.random() < 0.5:
                return shape, str(rng.choice(other_colours))
            return str(rng.choice(other_shapes)), colour
        return str(rng.choice(other_shapes)), str(rng.choice(other_colours))

    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw one grid; ``target_answer`` is ignored (the answers are not balanced)."""
        c = self.config
        n_rows = int(rng.integers(c.rows[0], c.rows[1] + 1))
        n_cols = int(rng.integers(c.cols[0], c.cols[1] + 1))
        shape = str(rng.choice(list(c.shapes)))
        colour = str(rng.choice(list(c.colours)))
        cell = int(rng.integers(n_rows * n_cols))
        tr, tc = divmod(cell, n_cols)  # 0-based target row / column

        cells: list[list[dict[str, str] | None]] = [[None] * n_cols for _ in range(n_rows)]
        cells[tr][tc] = {"shape": shape, "colour": colour}
        others = [k for k in range(n_rows * n_cols) if k != cell]
        for k in rng.choice(others, size=c.num_distractors, replace=False) if c.num_distractors else []:
            ds, dc = self._distractor(rng, shape, colour)
            r, col = divmod(int(k), n_cols)
            cells[r][col] = {"shape": ds, "colour": dc}

        size = c.image_size
        xs, ys = _edges(n_cols, size), _edges(n_rows, size)
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        lw = c.line_width
        xl, yl = _line_spans(xs, lw), _line_spans(ys, lw)
        for a, b in xl:
            draw.rectangle([a, 0, b - 1, size - 1], fill=GRID_COLOUR)
        for a, b in yl:
            draw.rectangle([0, a, size - 1, b - 1], fill=GRID_COLOUR)
        for r in range(n_rows):
            for col in range(n_cols):
                content = cells[r][col]
                if content is None:
                    continue
                # Free interior between the lines, in whole pixels: [xl[col][1], xl[col + 1][0]).
                left, right = xl[col][1], xl[col + 1][0]
                top, bottom = yl[r][1], yl[r + 1][0]
                # Two pixels of margin on each side keep the rasterised shape off the grid lines at shape_scale=1.
                free = min(right - left, bottom - top) - 4
                cx, cy = (left + right - 1) / 2, (top + bottom - 1) / 2
                _draw_shape(draw, content["shape"], cx, cy, c.shape_scale * free / 2, COLOURS[content["colour"]])

        target = f"{colour} {shape}"
        t = int(rng.integers(len(QUESTION_TEMPLATES)))
        question = QUESTION_TEMPLATES[t].format(target=target)
        if c.state_grid_size:
            question = f"The grid has {n_rows} rows and {n_cols} columns. {question}"
        box = [float(xs[tc]), float(ys[tr]), float(xs[tc + 1]), float(ys[tr + 1])]
        meta = {
            "rows": n_rows,
            "cols": n_cols,
            "target": {"row": tr + 1, "col": tc + 1, "shape": shape, "colour": colour},
            "cells": cells,
            "x_edges": xs,
            "y_edges": ys,
            "template": t,
        }
        return Sample(
            image=image, question=question, answer=f"({tr + 1}, {tc + 1})", evidence=Evidence(boxes=[box]), meta=meta
        )
