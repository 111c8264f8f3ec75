"""Marked colour lookup: the fill colour of the object that a marker of a named colour points out.

Colour is both the selector and the answer, because colour is what klal's pretrained ``tiny-base`` reads (issue 30).
A white image holds a few *slots*, one per cell of an ``R x C`` layout grid; a slot is a filled object (its fill colour
one of ``colours``) and a marker of its own colour (one of ``marker_colours``). The question names a marker's colour;
the answer is the fill colour of that marker's object. Three tasks share the scene, differing in the marker:

* ``ring_colour``: "What is the fill colour of the object inside the orange ring?" The marker is a ring around the
  object, a gap of white between them.
* ``outline_colour``: "What is the fill colour of the object with the orange outline?" The marker is a band of the
  object's own shape around its fill.
* ``beside_colour``: "What colour is the object beside the orange square?" The marker is a square next to the object
  (left or right of it, at random).

Conventions:
    * Fill colours and marker colours are disjoint sets; within an image every fill colour and every marker colour
      is distinct, so the named marker picks exactly one object and the answer is one of the image's fills.
    * The filled object's diameter is drawn from ``object_px`` (default 56-64 px: at least 2 x 2 visual tokens of
      28 px); the marker's size follows ``marker_px`` (ring / outline band width) and ``beside_px`` (side of the
      square). Layout edges as in ``grid_patch``; each slot sits inside its cell with 2 px of margin, jittered by
      ``jitter`` of the room left.
    * Drawn without anti-aliasing: every pixel of a fill or a marker has exactly its colour's RGB
      (:data:`data_gen.tasks.grid_patch.COLOURS`). Each object's evidence box is the bounding box of exactly the
      pixels of its fill; ``marker_box`` in the meta is the marker's.
    * ``meta["objects"][0]`` is the asked-for object (the lookup tasks' convention, which the study's wrong-answer
      diagnostic and oracle read); its ``colour`` is the fill colour (the answer), ``marker`` the named colour.
    * Answers are balanced by index over ``colours``; ``query_word`` is the named marker colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from data_gen.base import GenerationError, Sample, Task, TaskConfig
from data_gen.tasks.grid_patch import BACKGROUND, COLOURS, _check_range, _draw_shape, _edges
from klal.data.schema import Evidence

FILL_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
"""Default answers: the colours the tiny tokenizer writes as one token (``red``, ``" green"``, ``" blue"``,
``" yellow"``; the study's ``answer_render: fewest_tokens`` adds the space)."""
MARKER_COLOURS: tuple[str, ...] = ("orange", "purple", "pink", "cyan", "brown")
"""Default marker colours: the other colours tiny-base was pretrained on."""
MARKED_SHAPES: tuple[str, ...] = ("circle", "square", "diamond", "hexagon")
"""Shapes whose smaller copy drawn on top leaves an even band (the outline marker)."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "ring": (
        "What is the fill colour of the object inside the {marker} ring? Answer with one word.",
        "Which colour fills the shape in the {marker} ring? Answer with one word.",
        "The {marker} ring surrounds an object. What colour is that object? Reply with one word.",
    ),
    "outline": (
        "What is the fill colour of the object with the {marker} outline? Answer with one word.",
        "Which colour fills the shape outlined in {marker}? Answer with one word.",
        "One object is outlined in {marker}. What colour is its inside? Reply with one word.",
    ),
    "beside": (
        "What colour is the object beside the {marker} square? Answer with one word.",
        "Which colour is the shape next to the {marker} square? Answer with one word.",
        "Look at the {marker} square. What colour is the object beside it? Reply with one word.",
    ),
}
"""Question phrasings per marker style."""


@dataclass
class MarkedConfig(TaskConfig):
    """Knobs of the marked colour lookups (plus ``image_size`` and ``max_attempts`` of TaskConfig)."""

    image_size: int = 224
    """Side of the square image in pixels (224: 8 x 8 visual tokens of 28 px, tiny-base's pretraining size)."""
    rows: tuple[int, int] = (2, 2)
    """Inclusive range the number of layout rows is drawn from, per sample."""
    cols: tuple[int, int] = (2, 2)
    """Inclusive range the number of layout columns is drawn from, per sample."""
    num_objects: tuple[int, int] = (3, 4)
    """Inclusive range of the number of slots (object + marker), per sample; must fit the smallest grid."""
    colours: tuple[str, ...] = FILL_COLOURS
    """Fill colours (the answers)."""
    marker_colours: tuple[str, ...] = MARKER_COLOURS
    """Marker colours (the question names one); disjoint from ``colours``."""
    shapes: tuple[str, ...] = ("circle", "diamond")
    """Shapes of the filled objects (not asked about; tiny-base does not read shape). The default two span their full
    diameter in both directions (a square is drawn at 0.85 of it, a hexagon 0.87 high), so every object covers at
    least ``object_px[0]`` px each way; any of :data:`MARKED_SHAPES`."""
    object_px: tuple[int, int] = (56, 64)
    """Inclusive range of a filled object's diameter in pixels."""
    marker_px: int = 7
    """Width of the ring (``ring_colour``) or of the outline band (``outline_colour``) in pixels."""
    gap_px: int = 5
    """White gap between an object and its ring or its square."""
    beside_px: int = 36
    """Side of the marker square of ``beside_colour`` in pixels."""
    jitter: float = 0.5
    """How far a slot may move from its cell's centre, as a fraction of the room left around it."""


class _MarkedTask(Task):
    """Scene generator shared by the marked lookups; subclasses set ``name`` and ``style``."""

    config_cls = MarkedConfig
    version: ClassVar[str] = "1"
    """Bumped whenever the same (seed, index, config) would draw a different sample."""
    style: ClassVar[str]
    """The marker: ``ring``, ``outline`` or ``beside``."""
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "easy": {"rows": (2, 2), "cols": (2, 2), "num_objects": (3, 4)},
        "medium": {"rows": (2, 2), "cols": (2, 2), "num_objects": (4, 4), "object_px": (56, 60)},
    }

    config: MarkedConfig

    def extent(self, diameter: float) -> tuple[float, float]:
        """Width and height of a slot whose object has ``diameter``."""
        c = self.config
        if self.style == "ring":
            side = diameter + 2 * (c.gap_px + c.marker_px)
            return side, side
        if self.style == "outline":
            return diameter + 2 * c.marker_px, diameter + 2 * c.marker_px
        return diameter + c.gap_px + c.beside_px, max(diameter, c.beside_px)

    def validate(self) -> None:
        """Raise GenerationError naming the option when the config cannot produce a sample."""
        c = self.config
        rows = _check_range("rows", c.rows)
        cols = _check_range("cols", c.cols)
        _, hi = _check_range("num_objects", c.num_objects)
        _, d_hi = _check_range("object_px", c.object_px)
        for opt, names in (("colours", c.colours), ("marker_colours", c.marker_colours)):
            unknown = [n for n in names if n not in COLOURS]
            if unknown or len(set(names)) != len(names):
                raise GenerationError(f"{opt}={names!r}: give distinct names from {sorted(COLOURS)}")
        bad = [s for s in c.shapes if s not in MARKED_SHAPES]
        if bad or not c.shapes:
            raise GenerationError(f"shapes={c.shapes!r}: choose from {list(MARKED_SHAPES)}")
        shared = set(c.colours) & set(c.marker_colours)
        if shared:
            raise GenerationError(f"colours and marker_colours share {sorted(shared)}: a fill would look like a marker")
        if hi > min(len(c.colours), len(c.marker_colours)):
            raise GenerationError(
                f"num_objects={c.num_objects!r} needs at least {hi} colours and {hi} marker_colours "
                f"(have {len(c.colours)} and {len(c.marker_colours)})"
            )
        if hi > rows[0] * cols[0]:
            raise GenerationError(f"num_objects={c.num_objects!r} does not fit the smallest grid {rows[0]} x {cols[0]}")
        for opt in ("marker_px", "beside_px"):
            if getattr(c, opt) < 1:
                raise GenerationError(f"{opt}={getattr(c, opt)} must be at least 1")
        if c.gap_px < 1:
            raise GenerationError(f"gap_px={c.gap_px} must be at least 1 (the marker must not touch the object)")
        if not 0.0 <= c.jitter <= 1.0:
            raise GenerationError(f"jitter={c.jitter} must be in [0, 1]")
        w, h = self.extent(d_hi)
        cell_w, cell_h = c.image_size // max(cols[1], 1) - 4, c.image_size // max(rows[1], 1) - 4
        if w > cell_w or h > cell_h:
            raise GenerationError(
                f"object_px={c.object_px!r}: a {self.style} slot of {w:.0f} x {h:.0f} px does not fit a cell of "
                f"{cell_w} x {cell_h} px (image_size={c.image_size}, up to {rows[1]} x {cols[1]} cells)"
            )

    def answer_classes(self) -> list[str]:
        """The answers, balanced by index: the fill colours."""
        return list(self.config.colours)

    def draw_slot(
        self, draw: ImageDraw.ImageDraw, size: int, o: dict[str, Any], cx: float, cy: float, side: int
    ) -> None:
        """Draw one slot centred on ``(cx, cy)`` and record its fill's and marker's pixel boxes in ``o``.

        ``o`` holds ``diameter``, ``shape``, ``colour`` (the fill) and ``marker``; ``side`` (-1 or 1) puts the square
        of ``beside_colour`` left or right of the object. Also drawn by the pretraining curriculum's ``marked`` skill
        (one object and its marker), so the base and the tasks see the same markers."""
        c = self.config
        r = o["diameter"] / 2
        fill_mask, marker_mask = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
        mk, fl = COLOURS[o["marker"]], COLOURS[o["colour"]]
        if self.style == "ring":
            outer, inner = r + c.gap_px + c.marker_px, r + c.gap_px
            for d, value in ((draw, mk), (ImageDraw.Draw(marker_mask), 255)):
                d.ellipse([cx - outer, cy - outer, cx + outer, cy + outer], fill=value)
            for d in (draw, ImageDraw.Draw(marker_mask)):
                d.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=BACKGROUND if d is draw else 0)
            ox = cx
        elif self.style == "outline":
            for d, value in ((draw, mk), (ImageDraw.Draw(marker_mask), 255)):
                _draw_shape(d, o["shape"], cx, cy, r + c.marker_px, value)
            ox = cx
        else:
            # Object and square side by side, the pair centred on (cx, cy); side -1: the square on the left.
            total = o["diameter"] + c.gap_px + c.beside_px
            left = cx - total / 2
            if side < 0:
                sq0, ox = left, left + c.beside_px + c.gap_px + r
            else:
                ox, sq0 = left + r, left + o["diameter"] + c.gap_px
            box = [sq0, cy - c.beside_px / 2, sq0 + c.beside_px - 1, cy + c.beside_px / 2 - 1]
            draw.rectangle(box, fill=mk)
            ImageDraw.Draw(marker_mask).rectangle(box, fill=255)
        _draw_shape(draw, o["shape"], ox, cy, r, fl)
        _draw_shape(ImageDraw.Draw(fill_mask), o["shape"], ox, cy, r, 255)
        if self.style == "outline":  # the fill covers the inside of the marker's shape
            marker_mask.paste(0, mask=fill_mask)
        o["box"] = [float(v) for v in fill_mask.getbbox()]
        o["marker_box"] = [float(v) for v in marker_mask.getbbox()]
        o["centre"] = [float(ox), float(cy)]

    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw one scene whose answer (the asked-for object's fill) is ``target_answer`` (uniform when None)."""
        c = self.config
        answer = target_answer if target_answer is not None else str(rng.choice(list(c.colours)))
        n_rows = int(rng.integers(c.rows[0], c.rows[1] + 1))
        n_cols = int(rng.integers(c.cols[0], c.cols[1] + 1))
        n = int(rng.integers(c.num_objects[0], min(c.num_objects[1], n_rows * n_cols) + 1))
        fills = [answer] + [str(v) for v in rng.choice([x for x in c.colours if x != answer], n - 1, replace=False)]
        markers = [str(v) for v in rng.choice(list(c.marker_colours), n, replace=False)]
        cells = rng.choice(n_rows * n_cols, size=n, replace=False)
        size = c.image_size
        xs, ys = _edges(n_cols, size), _edges(n_rows, size)
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        objects: list[dict[str, Any]] = []
        for fill, marker, cell in zip(fills, markers, cells):
            row, col = divmod(int(cell), n_cols)
            o: dict[str, Any] = {
                "colour": fill,
                "marker": marker,
                "shape": str(rng.choice(list(c.shapes))),
                "diameter": float(rng.uniform(c.object_px[0], c.object_px[1])),
                "row": row + 1,
                "col": col + 1,
            }
            w, h = self.extent(o["diameter"])
            # Two pixels of margin on each side of the cell keep neighbouring slots apart.
            room_x, room_y = (xs[col + 1] - xs[col] - 4 - w) / 2, (ys[row + 1] - ys[row] - 4 - h) / 2
            cx = (xs[col] + xs[col + 1] - 1) / 2 + c.jitter * room_x * float(rng.uniform(-1, 1))
            cy = (ys[row] + ys[row + 1] - 1) / 2 + c.jitter * room_y * float(rng.uniform(-1, 1))
            self.draw_slot(draw, size, o, cx, cy, int(rng.choice([-1, 1])))
            objects.append(o)
        t = int(rng.integers(len(TEMPLATES[self.style])))
        question = TEMPLATES[self.style][t].format(marker=markers[0])
        meta = {
            "rows": n_rows,
            "cols": n_cols,
            "style": self.style,
            "objects": objects,
            "evidence_objects": [0],
            "template": t,
            "query_word": markers[0],
        }
        return Sample(
            image=image, question=question, answer=answer, evidence=Evidence(boxes=[list(objects[0]["box"])]), meta=meta
        )


class RingColourTask(_MarkedTask):
    """``ring_colour``: the fill colour of the object inside the ring of a named colour."""

    name = "ring_colour"
    style = "ring"


class OutlineColourTask(_MarkedTask):
    """``outline_colour``: the fill colour of the object whose outline has a named colour."""

    name = "outline_colour"
    style = "outline"


class BesideColourTask(_MarkedTask):
    """``beside_colour``: the colour of the object next to the square of a named colour.

    Its presets centre each pair in its cell (no jitter) with a 3-px gap inside the pair, so that the gap between
    two pairs (about 15 px) is wider than the gap inside one and the square's object is the nearer one.
    """

    name = "beside_colour"
    style = "beside"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        k: {**v, "beside_px": 28, "gap_px": 3, "jitter": 0.0} for k, v in _MarkedTask.presets.items()
    }
