"""Content lookup: name an attribute of the object that another attribute (or a neighbour) picks out.

A white image holds a few coloured shapes, each in its own cell of an ``R x C`` layout grid (grid lines drawn only
with ``grid_lines``). Three tasks share the scene generator:

* ``shape_lookup``: "What shape is the red object?" The target's colour is unique in the image; the answer is its
  shape ("star").
* ``colour_lookup``: "What colour is the star?" The target's shape is unique; the answer is its colour ("red").
* ``neighbour_lookup`` (two hops): "What shape is directly to the right of the red star?" The anchor (the red star)
  is unique; the answer is the shape of the object in the adjacent cell in that direction. Its evidence is two boxes,
  the anchor's and the answer object's.

Unlike ``grid_patch``, whose answer is a position, every answer here is content of the attended object, which a
model can read from the visual tokens it attends to (see docs/reproduce.md, *Lookup testbed*).

Conventions:
    * Layout grid edges as in ``grid_patch``: column edge ``k`` at ``x = floor(k * image_size / C + 0.5)``.
    * Each object lies inside its cell's free interior (the part not covered by grid lines, minus 2 px of margin),
      with a random diameter (``object_scale``) and a random offset from the cell centre (``jitter``), so objects
      never touch each other or a grid line.
    * Shapes are drawn without anti-aliasing (every shape pixel has exactly its colour's RGB), and each object's
      evidence box is the bounding box of exactly the pixels drawn for it: ``[x0, y0, x1, y1]`` with ``x1``/``y1``
      one past the last pixel, in original-image pixels.
    * With ``unique_attributes`` (the default) every object has its own shape and its own colour; without it only
      the attribute the question names is unique (the anchor's colour-shape pair for ``neighbour_lookup``), and the
      answered attribute may repeat among the other objects.
    * Answers are balanced by index over ``shapes`` (shape and neighbour lookup) or ``colours`` (colour lookup):
      sample ``i`` answers ``answer_classes()[i % n]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from data_gen.base import GenerationError, Sample, Task, TaskConfig
from data_gen.tasks.grid_patch import (
    BACKGROUND,
    COLOURS,
    GRID_COLOUR,
    SHAPES,
    _check_names,
    _check_range,
    _draw_shape,
    _edges,
    _line_spans,
)
from klal.data.schema import Evidence

DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
MIN_OBJECT_PX = 8
"""Smallest object diameter (at the smallest ``object_scale`` in the smallest cell) for a recognisable shape."""

SHAPE_TEMPLATES: tuple[str, ...] = (
    "What shape is the {colour} object? Answer with one word.",
    "Which shape is {colour}? Answer with one word.",
    "The {colour} object is which shape? Reply with one word.",
    "Name the shape of the {colour} object in one word.",
)
COLOUR_TEMPLATES: tuple[str, ...] = (
    "What colour is the {shape}? Answer with one word.",
    "Which colour does the {shape} have? Answer with one word.",
    "The {shape} is which colour? Reply with one word.",
    "Name the colour of the {shape} in one word.",
)
NEIGHBOUR_TEMPLATES: tuple[str, ...] = (
    "The objects sit in a grid. What shape is directly {relation} the {anchor}? Answer with one word.",
    "Look at the {anchor}. Which shape is in the next cell {relation} it? Answer with one word.",
    "In the grid, which shape is in the cell {relation} the {anchor}? Reply with one word.",
)
"""Question phrasings of each task; ``{relation}`` is one of :data:`RELATIONS`' phrases."""

RELATIONS: dict[str, tuple[str, int, int]] = {
    "right": ("to the right of", 0, 1),
    "left": ("to the left of", 0, -1),
    "above": ("above", -1, 0),
    "below": ("below", 1, 0),
}
"""Direction -> (phrase, row step, column step) of the neighbour question."""


@dataclass
class LookupConfig(TaskConfig):
    """Knobs of the lookup tasks (plus ``image_size``, ``line_width``, ``max_attempts`` of TaskConfig)."""

    line_width: int = 2
    """Width of the grid lines in pixels (drawn only with ``grid_lines``)."""
    rows: tuple[int, int] = (3, 4)
    """Inclusive range the number of layout rows is drawn from, per sample."""
    cols: tuple[int, int] = (3, 4)
    """Inclusive range the number of layout columns is drawn from, per sample."""
    num_objects: tuple[int, int] = (3, 5)
    """Inclusive range of the number of objects (target included), per sample; must fit the smallest grid."""
    shapes: tuple[str, ...] = SHAPES
    """Shapes objects are drawn from: circle, square, triangle, diamond, star, cross, hexagon."""
    colours: tuple[str, ...] = DEFAULT_COLOURS
    """Colours objects are drawn from: red, green, blue, yellow, orange, purple, pink, cyan, brown."""
    unique_attributes: bool = True
    """Every object has its own shape and its own colour; False: only the attribute the question names is unique."""
    object_scale: tuple[float, float] = (0.55, 0.8)
    """Range of an object's diameter as a fraction of its cell's free interior."""
    jitter: float = 0.5
    """How far an object's centre may move from its cell's centre, as a fraction of the room left around it."""
    grid_lines: bool = False
    """Draw the layout grid's lines (grey, ``line_width`` px)."""


class _LookupTask(Task):
    """Scene generator shared by the lookup tasks; subclasses set ``name``, ``ask`` and the question."""

    config_cls = LookupConfig
    version: ClassVar[str] = "1"
    """Bumped whenever the same (seed, index, config) would draw a different sample."""
    ask: ClassVar[str]
    """The answered attribute: ``shape`` or ``colour``."""
    key_attribute: ClassVar[str]
    """The attribute the question names (unique in the image): ``colour``, ``shape`` or ``pair`` (both)."""
    templates: ClassVar[tuple[str, ...]]
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "easy": {"rows": (3, 3), "cols": (3, 3), "num_objects": (3, 4), "unique_attributes": True},
        "medium": {"rows": (3, 4), "cols": (3, 4), "num_objects": (4, 6), "unique_attributes": True},
        "hard": {"rows": (4, 5), "cols": (4, 5), "num_objects": (5, 7), "unique_attributes": False},
    }

    config: LookupConfig

    def validate(self) -> None:
        """Raise GenerationError naming the option when the config cannot produce a sample."""
        c = self.config
        rows = _check_range("rows", c.rows)
        cols = _check_range("cols", c.cols)
        lo, hi = _check_range("num_objects", c.num_objects)
        _check_names(c.shapes, c.colours)
        if hi > rows[0] * cols[0]:
            raise GenerationError(
                f"num_objects={c.num_objects!r} does not fit the smallest grid rows={rows[0]} x cols={cols[0]}"
            )
        if self.key_attribute == "pair" and lo < 2:
            raise GenerationError(f"num_objects={c.num_objects!r}: the neighbour question needs at least 2 objects")
        n_shapes, n_colours = len(c.shapes), len(c.colours)
        limits = {"shape": n_shapes, "colour": n_colours, "pair": n_shapes * n_colours}
        if c.unique_attributes:
            if hi > min(n_shapes, n_colours):
                raise GenerationError(
                    f"num_objects={c.num_objects!r} with unique_attributes needs at least {hi} shapes and colours "
                    f"(have {n_shapes} shapes, {n_colours} colours)"
                )
        elif hi > limits[self.key_attribute]:
            raise GenerationError(
                f"num_objects={c.num_objects!r}: at most {limits[self.key_attribute]} objects can have a unique "
                f"{self.key_attribute} with these shapes/colours"
            )
        s_lo, s_hi = c.object_scale
        if not 0.0 < s_lo <= s_hi <= 1.0:
            raise GenerationError(f"object_scale={c.object_scale!r} must satisfy 0 < min <= max <= 1")
        if not 0.0 <= c.jitter <= 1.0:
            raise GenerationError(f"jitter={c.jitter} must be in [0, 1]")
        if c.line_width < 1:
            raise GenerationError(f"line_width={c.line_width} must be at least 1")
        lines = 2 * c.line_width if c.grid_lines else 0
        smallest = (c.image_size // max(rows[1], cols[1]) - lines - 4) * s_lo
        if smallest < MIN_OBJECT_PX:
            raise GenerationError(
                f"image_size={c.image_size} is too small for up to {rows[1]} rows / {cols[1]} cols at "
                f"object_scale={c.object_scale!r}: objects could be {smallest:.1f} px, need >= {MIN_OBJECT_PX}"
            )

    def answer_classes(self) -> list[str]:
        """The answers, balanced by index: the configured shapes or colours."""
        return list(self.config.shapes if self.ask == "shape" else self.config.colours)

    # -- scene -------------------------------------------------------------------------------------------------------
    def _attributes(self, rng: np.random.Generator, n: int, answer: str) -> list[dict[str, str]]:
        """Shape/colour of ``n`` objects, object 0 the target, whose ``ask`` attribute is ``answer``.

        The key attribute is unique (both are with ``unique_attributes``); the answered one of the other objects
        may repeat otherwise. :class:`NeighbourLookupTask` overrides the non-unique case.
        """
        c = self.config
        pool = {"shape": list(c.shapes), "colour": list(c.colours)}
        ask, other = self.ask, "colour" if self.ask == "shape" else "shape"
        answers = [answer]
        rest = [v for v in pool[ask] if v != answer]
        if c.unique_attributes:
            answers += [str(v) for v in rng.choice(rest, size=n - 1, replace=False)]
        else:
            answers += [str(v) for v in rng.choice(pool[ask], size=n - 1, replace=True)]
        # The other attribute is the one the question names (shape/colour lookup): unique in both modes.
        others = [str(v) for v in rng.choice(pool[other], size=n, replace=False)]
        return [{ask: a, other: o} for a, o in zip(answers, others)]

    def _place(
        self, rng: np.random.Generator, n_rows: int, n_cols: int, n: int
    ) -> tuple[list[tuple[int, int]], dict[str, Any]]:
        """Cells ``(row, col)`` (0-based) of ``n`` objects, object 0 first (the target), and facts for the meta."""
        cells = rng.choice(n_rows * n_cols, size=n, replace=False)
        return [divmod(int(k), n_cols) for k in cells], {}

    def _question(
        self, rng: np.random.Generator, objects: list[dict[str, Any]], info: dict[str, Any]
    ) -> tuple[str, int]:
        """The question text and the index of its template."""
        t = int(rng.integers(len(self.templates)))
        return self.templates[t].format(shape=objects[0]["shape"], colour=objects[0]["colour"]), t

    def _evidence_objects(self, objects: list[dict[str, Any]]) -> list[int]:
        """Indices of the objects whose boxes are the evidence (the target)."""
        return [0]

    def _query_word(self, objects: list[dict[str, Any]]) -> str:
        """The question's word that picks the object (meta ``query_word``: the ``word`` KLAL query's token)."""
        return objects[0][self.key_attribute]

    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw one scene whose answer is ``target_answer`` (drawn uniformly when None)."""
        c = self.config
        answer = target_answer if target_answer is not None else str(rng.choice(self.answer_classes()))
        n_rows = int(rng.integers(c.rows[0], c.rows[1] + 1))
        n_cols = int(rng.integers(c.cols[0], c.cols[1] + 1))
        n = int(rng.integers(c.num_objects[0], min(c.num_objects[1], n_rows * n_cols) + 1))
        objects: list[dict[str, Any]] = self._attributes(rng, n, answer)
        cells, info = self._place(rng, n_rows, n_cols, n)
        for o, (r, col) in zip(objects, cells):
            o["row"], o["col"] = r + 1, col + 1

        size = c.image_size
        xs, ys = _edges(n_cols, size), _edges(n_rows, size)
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        if c.grid_lines:
            xl, yl = _line_spans(xs, c.line_width), _line_spans(ys, c.line_width)
            for a, b in xl:
                draw.rectangle([a, 0, b - 1, size - 1], fill=GRID_COLOUR)
            for a, b in yl:
                draw.rectangle([0, a, size - 1, b - 1], fill=GRID_COLOUR)
        else:
            xl = [(e, e) for e in xs]
            yl = [(e, e) for e in ys]
        for o in objects:
            r, col = o["row"] - 1, o["col"] - 1
            left, right, top, bottom = xl[col][1], xl[col + 1][0], yl[r][1], yl[r + 1][0]
            # Two pixels of margin on each side keep objects off the lines and off their neighbours.
            free_w, free_h = right - left - 4, bottom - top - 4
            diameter = float(rng.uniform(*c.object_scale)) * min(free_w, free_h)
            room_x, room_y = (free_w - diameter) / 2, (free_h - diameter) / 2
            cx = (left + right - 1) / 2 + c.jitter * room_x * float(rng.uniform(-1, 1))
            cy = (top + bottom - 1) / 2 + c.jitter * room_y * float(rng.uniform(-1, 1))
            # Draw on a mask too, so the evidence box is the bounding box of exactly this object's pixels.
            mask = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask), o["shape"], cx, cy, diameter / 2, 255)
            _draw_shape(draw, o["shape"], cx, cy, diameter / 2, COLOURS[o["colour"]])
            x0, y0, x1, y1 = mask.getbbox()
            o["box"] = [float(x0), float(y0), float(x1), float(y1)]
            o["centre"], o["radius"] = [cx, cy], diameter / 2

        question, t = self._question(rng, objects, info)
        meta = {
            **info,
            "rows": n_rows,
            "cols": n_cols,
            "objects": objects,
            "evidence_objects": self._evidence_objects(objects),
            "template": t,
            "query_word": self._query_word(objects),
        }
        boxes = [list(objects[i]["box"]) for i in self._evidence_objects(objects)]
        return Sample(image=image, question=question, answer=answer, evidence=Evidence(boxes=boxes), meta=meta)


class ShapeLookupTask(_LookupTask):
    """``shape_lookup``: the shape of the object with a given (unique) colour."""

    name = "shape_lookup"
    ask = "shape"
    key_attribute = "colour"
    templates = SHAPE_TEMPLATES


class ColourLookupTask(_LookupTask):
    """``colour_lookup``: the colour of the object with a given (unique) shape."""

    name = "colour_lookup"
    ask = "colour"
    key_attribute = "shape"
    templates = COLOUR_TEMPLATES


class NeighbourLookupTask(_LookupTask):
    """``neighbour_lookup``: the shape of the object in the cell next to a named (unique) anchor object.

    Object 0 is the answer object, object 1 the anchor; the anchor's cell is adjacent in the asked direction.
    Evidence: the anchor's box, then the answer object's box.
    """

    name = "neighbour_lookup"
    ask = "shape"
    key_attribute = "pair"
    templates = NEIGHBOUR_TEMPLATES
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "easy": {"rows": (3, 3), "cols": (3, 3), "num_objects": (3, 4), "unique_attributes": True, "jitter": 0.2},
        "medium": {"rows": (3, 4), "cols": (3, 4), "num_objects": (4, 6), "unique_attributes": True, "jitter": 0.3},
        "hard": {"rows": (4, 5), "cols": (4, 5), "num_objects": (6, 9), "unique_attributes": False, "jitter": 0.3},
    }

    def _attributes(self, rng: np.random.Generator, n: int, answer: str) -> list[dict[str, str]]:
        c = self.config
        if c.unique_attributes:
            return super()._attributes(rng, n, answer)
        # Only the anchor (object 1) must be unique: draw every pair freely, then redraw the anchor until no other
        # object shares its pair.
        objs = [{"shape": answer, "colour": str(rng.choice(list(c.colours)))}]
        objs += [
            {"shape": str(rng.choice(list(c.shapes))), "colour": str(rng.choice(list(c.colours)))} for _ in range(n - 1)
        ]
        for _ in range(c.max_attempts):
            if sum((o["shape"], o["colour"]) == (objs[1]["shape"], objs[1]["colour"]) for o in objs) == 1:
                return objs
            objs[1] = {"shape": str(rng.choice(list(c.shapes))), "colour": str(rng.choice(list(c.colours)))}
        raise GenerationError(f"no unique anchor after max_attempts={c.max_attempts} draws; add shapes or colours")

    def _place(
        self, rng: np.random.Generator, n_rows: int, n_cols: int, n: int
    ) -> tuple[list[tuple[int, int]], dict[str, Any]]:
        # Anchor cell and a direction whose neighbour is inside the grid, then the other objects anywhere else.
        directions = [d for d in RELATIONS if (n_rows > 1 if RELATIONS[d][1] else n_cols > 1)]
        direction = str(rng.choice(directions))
        _, dr, dc = RELATIONS[direction]
        ar = int(rng.integers(max(0, -dr), n_rows - max(0, dr)))
        ac = int(rng.integers(max(0, -dc), n_cols - max(0, dc)))
        target, anchor = (ar + dr) * n_cols + ac + dc, ar * n_cols + ac
        others = [k for k in range(n_rows * n_cols) if k not in (target, anchor)]
        cells = [target, anchor] + [int(k) for k in rng.choice(others, size=n - 2, replace=False)]
        return [divmod(k, n_cols) for k in cells], {"direction": direction}

    def _question(
        self, rng: np.random.Generator, objects: list[dict[str, Any]], info: dict[str, Any]
    ) -> tuple[str, int]:
        t = int(rng.integers(len(self.templates)))
        a = objects[1]
        phrase = RELATIONS[info["direction"]][0]
        return self.templates[t].format(relation=phrase, anchor=f"{a['colour']} {a['shape']}"), t

    def _evidence_objects(self, objects: list[dict[str, Any]]) -> list[int]:
        return [1, 0]

    def _query_word(self, objects: list[dict[str, Any]]) -> str:
        # The anchor's shape ends its "colour shape" phrase, so its token has read the whole phrase.
        return objects[1]["shape"]
