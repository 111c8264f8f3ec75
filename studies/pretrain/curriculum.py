"""The pretraining curriculum: scenes of coloured shapes on white, and questions a model that sees can answer.

Skills (sample ``i`` practises ``skills[i % len(skills)]``, so every skill gets the same share):

* ``colour``: one object; "What colour is the object?" -> its colour;
* ``shape``: one object; "What shape is this?" -> its shape;
* ``count``: 1 to ``max_objects`` objects; "How many objects are there?" -> the number;
* ``position``: one object in one of the image's nine thirds; "Where is the object?" -> ``top left``, ``top``, ...,
  ``centre``, ..., ``bottom right``;
* ``relation``: two objects; "Is the red star left of the blue circle?" (left of / right of / above / below) -> ``yes``
  or ``no`` (balanced), with the two objects clearly apart along the asked axis (a gap of at least ``gap`` px between
  their extents);
* ``caption``: one to three objects; "Describe the image." -> ``a red star, a blue circle and an orange cross``,
  left to right;
* ``marked`` (not in the first base's mix): one object with a marker of another colour, a ring around it, an outline
  band or a square beside it, drawn as the marked lookups draw theirs (:mod:`data_gen.tasks.marked`); "What is the
  fill colour of the object?" -> its fill. The questions never name the marker or its colour, so picking one object
  of several by its marker stays unseen; what it teaches is the fill's colour next to another colour.

``suffix_share`` of the one-word questions (colour, shape, count, marked) end with an instruction such as "Answer with
one word." (:data:`SUFFIXES`), a phrase the evaluation tasks' questions use; 0 in the first base's mix.

What it leaves out on purpose, so that the evaluation tasks stay unseen: no grid, no cell coordinates (grid_patch), no
lines, crossings, nodes or letters (line_intersection, line_tracing), and no question that names one object among
several by one attribute and asks for another (the lookup tasks: a single object is named by "the object", relations
and captions name or describe every object). :func:`evaluation_templates` lists the evaluation tasks' question
phrasings; the tests check that no curriculum question matches any of them.

Objects never overlap (a margin of ``gap`` / 2 px between extents); shapes are drawn without anti-aliasing by the
generators' own drawing (:func:`data_gen.tasks.grid_patch._draw_shape`, the colours of
:data:`data_gen.tasks.grid_patch.COLOURS`), and each object's evidence box is the bounding box of exactly its pixels.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from data_gen.base import GenerationError, Sample, Task, TaskConfig
from data_gen.tasks.grid_patch import BACKGROUND, COLOURS, SHAPES, _check_names, _check_range, _draw_shape
from klal.data.schema import Evidence

SKILLS: tuple[str, ...] = ("colour", "shape", "count", "position", "relation", "caption", "marked")
"""Every skill of the curriculum."""
FIRST_SKILLS: tuple[str, ...] = SKILLS[:6]
"""The default mix: the skills of the first base (``tiny-base``), without ``marked``."""
ONE_WORD: tuple[str, ...] = ("colour", "shape", "count", "marked")
"""Skills whose answer is one word: the ones ``suffix_share`` may end with an instruction of :data:`SUFFIXES`."""
SUFFIXES: tuple[str, ...] = ("Answer with one word.", "Reply with one word.")
"""Instructions appended to one-word questions (``suffix_share``)."""
MARKER_STYLES: tuple[str, ...] = ("ring", "outline", "beside")
"""Markers of the ``marked`` skill, as the marked lookups draw them."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the object?", "Name the colour of the shape.", "Which colour is shown?"),
    "shape": ("What shape is this?", "Name the shape in the image.", "Which shape is shown?"),
    "count": ("How many objects are there?", "Count the shapes in the image.", "How many shapes do you see?"),
    "position": ("Where is the object?", "In which part of the image is the shape?", "Where is the shape placed?"),
    "relation": ("Is the {a} {relation} the {b}?", "Answer yes or no: is the {a} {relation} the {b}?"),
    "caption": ("Describe the image.", "What is in the picture?", "List the objects from left to right."),
    "marked": ("What is the fill colour of the object?", "Which colour fills the shape?", "What colour is it inside?"),
}
"""Question phrasings per skill; ``{a}`` / ``{b}`` are "colour shape" descriptions, ``{relation}`` a phrase of
:data:`RELATIONS`."""

HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("Tell me the colour of the item.", "What colour do you see?"),
    "shape": ("What kind of shape is drawn?", "Tell me which shape this is."),
    "count": ("What is the number of shapes?", "How many items are drawn?"),
    "position": ("In what part of the picture is the item?", "Where is the shape located?"),
    "relation": ("Is it true that the {a} is {relation} the {b}?", "Check: the {a} is {relation} the {b}?"),
    "caption": ("Name every object, left to right.", "What do you see in the picture?"),
    "marked": ("Tell me the colour that fills the marked shape.", "What colour is the inside of the shape?"),
}
"""New phrasings per skill that training never uses: the model card scores the test split with them too, so it tells
a skill from one phrasing it memorised."""

RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
"""Relation phrase -> (axis: 0 = x, 1 = y; sign: -1 when ``a`` lies at smaller coordinates than ``b``)."""

ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")


def position_word(row: int, col: int) -> str:
    """The answer for the third ``(row, col)`` of the image: ``top left``, ``top``, ..., ``centre``, ..., ``right``."""
    r, c = ROWS[row], COLS[col]
    if r == "middle":
        return c
    return r if c == "centre" else f"{r} {c}"


@dataclass
class CurriculumConfig(TaskConfig):
    """Knobs of the curriculum (plus ``image_size``, ``line_width`` (unused), ``max_attempts`` of TaskConfig)."""

    image_size: int = 224
    """Side of the square image in pixels."""
    skills: tuple[str, ...] = FIRST_SKILLS
    """Skills practised, in turn: colour, shape, count, position, relation, caption (and marked, of :data:`SKILLS`)."""
    shapes: tuple[str, ...] = SHAPES
    """Shapes objects are drawn from: circle, square, triangle, diamond, star, cross, hexagon."""
    colours: tuple[str, ...] = tuple(COLOURS)
    """Colours objects are drawn from: red, green, blue, yellow, orange, purple, pink, cyan, brown."""
    max_objects: int = 6
    """Most objects of a ``count`` scene."""
    diameter: tuple[int, int] = (18, 34)
    """Range of an object's extent in pixels."""
    gap: int = 8
    """Least space in pixels between objects (and, for ``relation``, between the two extents along the asked axis)."""
    suffix_share: float = 0.0
    """Share of the one-word questions (:data:`ONE_WORD`) that end with an instruction of :data:`SUFFIXES`."""


class CurriculumTask(Task):
    """The pretraining curriculum (module docstring) as a :class:`data_gen.base.Task`, written by the usual writer."""

    name = "curriculum"
    config_cls = CurriculumConfig
    version: ClassVar[str] = "1"
    """Bumped whenever the same (seed, index, config) would draw a different sample."""

    config: CurriculumConfig

    def validate(self) -> None:
        """Raise GenerationError naming the option when the config cannot produce a sample."""
        c = self.config
        _check_names(c.shapes, c.colours)
        lo, hi = _check_range("diameter", c.diameter)
        bad = [s for s in c.skills if s not in SKILLS]
        if not c.skills or bad:
            raise GenerationError(f"skills: unknown {bad or 'none given'}; choose from {list(SKILLS)}")
        if c.max_objects < 1:
            raise GenerationError(f"max_objects={c.max_objects} must be at least 1")
        if c.gap < 1:
            raise GenerationError(f"gap={c.gap} must be at least 1")
        if not 0.0 <= c.suffix_share <= 1.0:
            raise GenerationError(f"suffix_share={c.suffix_share} must be in [0, 1]")
        if "marked" in c.skills:
            if len(c.colours) < 2:
                raise GenerationError("the marked skill needs two colours: a fill and a marker")
            try:
                self.markers  # noqa: B018 - built (and checked by the marked tasks) once, here
            except GenerationError as e:
                raise GenerationError(
                    f"diameter={c.diameter!r}: a marked object and its marker do not fit image_size={c.image_size} "
                    f"({e})"
                ) from None
        if "relation" in c.skills and (len(c.shapes) * len(c.colours) < 2):
            raise GenerationError("the relation skill needs two distinct colour-shape pairs")
        # A third of the image must hold an object with its margins (position), and max_objects must fit.
        if c.image_size // 3 < hi + c.gap:
            raise GenerationError(f"image_size={c.image_size} is too small for objects of up to {hi} px (position)")
        if c.max_objects * (hi + c.gap) ** 2 > 0.4 * c.image_size**2:
            raise GenerationError(
                f"max_objects={c.max_objects} objects of up to {hi} px do not fit a {c.image_size}-px image loosely"
            )
        if lo < 8:
            raise GenerationError(f"diameter={c.diameter!r}: objects below 8 px are not recognisable")

    @functools.cached_property
    def markers(self) -> dict[str, Any]:
        """One marked lookup task per marker style, whose ``draw_slot`` draws an object with that marker (built once
        per curriculum, not per sample)."""
        from data_gen.tasks.marked import BesideColourTask, MarkedConfig, OutlineColourTask, RingColourTask

        c = self.config
        # One slot in one cell of the whole image: the marked tasks' own check that an object of the largest diameter
        # and its marker fit.
        cfg = MarkedConfig(
            image_size=c.image_size, rows=(1, 1), cols=(1, 1), num_objects=(1, 1), object_px=tuple(c.diameter)
        )
        return {t.style: t for t in (RingColourTask(cfg), OutlineColourTask(cfg), BesideColourTask(cfg))}

    def _marked(self, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any], dict[str, Any]]:
        """One object with a marker of another colour (``marked`` skill): the image, the object and the meta facts."""
        from data_gen.tasks.marked import MARKED_SHAPES

        c = self.config
        size = c.image_size
        style = str(rng.choice(list(MARKER_STYLES)))
        task = self.markers[style]
        fill, marker = (str(v) for v in rng.choice(list(c.colours), size=2, replace=False))
        shapes = [s for s in c.shapes if s in MARKED_SHAPES] or list(MARKED_SHAPES)
        o: dict[str, Any] = {
            "shape": str(rng.choice(shapes)),
            "colour": fill,
            "marker": marker,
            "diameter": float(rng.uniform(*c.diameter)),
        }
        w, h = task.extent(o["diameter"])
        cx = float(rng.uniform(w / 2 + 2, size - w / 2 - 2))
        cy = float(rng.uniform(h / 2 + 2, size - h / 2 - 2))
        image = Image.new("RGB", (size, size), BACKGROUND)
        task.draw_slot(ImageDraw.Draw(image), size, o, cx, cy, int(rng.choice([-1, 1])))
        obj = {"shape": o["shape"], "colour": fill, "box": o["box"], "marker": marker, "marker_box": o["marker_box"]}
        return image, obj, {"style": style}

    # -- scene -------------------------------------------------------------------------------------------------------
    def _objects(self, rng: np.random.Generator, n: int, distinct: bool) -> list[dict[str, Any]]:
        """``n`` random colour-shape pairs (all pairs distinct with ``distinct``)."""
        c = self.config
        pairs = [(s, col) for s in c.shapes for col in c.colours]
        picks = rng.choice(len(pairs), size=n, replace=not distinct)
        return [
            {"shape": pairs[k][0], "colour": pairs[k][1], "d": float(rng.uniform(*c.diameter))} for k in picks.tolist()
        ]

    def _place(self, rng: np.random.Generator, objs: list[dict[str, Any]], boxes: list[tuple[float, ...]]) -> bool:
        """Give each object a centre inside its allowed box ``(x0, y0, x1, y1)``, apart from the others; False when
        no free spot turned up within ``max_attempts`` tries."""
        c = self.config
        for o, (x0, y0, x1, y1) in zip(objs, boxes):
            r = o["d"] / 2
            for _ in range(c.max_attempts):
                x, y = float(rng.uniform(x0 + r, x1 - r)), float(rng.uniform(y0 + r, y1 - r))
                if all(math.hypot(x - p["x"], y - p["y"]) >= r + p["d"] / 2 + c.gap for p in objs if "x" in p):
                    o["x"], o["y"] = x, y
                    break
            else:
                return False
        return True

    def _draw(self, objs: list[dict[str, Any]]) -> Image.Image:
        size = self.config.image_size
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for o in objs:
            mask = Image.new("L", (size, size), 0)
            _draw_shape(ImageDraw.Draw(mask), o["shape"], o["x"], o["y"], o["d"] / 2, 255)
            _draw_shape(draw, o["shape"], o["x"], o["y"], o["d"] / 2, COLOURS[o["colour"]])
            o["box"] = [float(v) for v in mask.getbbox()]
        return image

    # -- skills ------------------------------------------------------------------------------------------------------
    def _scene(self, rng: np.random.Generator, skill: str) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
        """Objects (placed), the answer and the facts for the meta of one ``skill`` sample."""
        c = self.config
        size = float(c.image_size)
        whole = (0.0, 0.0, size, size)
        if skill in ("colour", "shape"):
            objs = self._objects(rng, 1, True)
            ok = self._place(rng, objs, [whole])
            return objs, objs[0][skill], {"ok": ok}
        if skill == "count":
            n = int(rng.integers(1, c.max_objects + 1))
            objs = self._objects(rng, n, False)
            return objs, str(n), {"ok": self._place(rng, objs, [whole] * n)}
        if skill == "position":
            row, col = (int(v) for v in rng.integers(0, 3, size=2))
            third = size / 3
            objs = self._objects(rng, 1, True)
            box = (
                col * third + c.gap / 2,
                row * third + c.gap / 2,
                (col + 1) * third - c.gap / 2,
                (row + 1) * third - c.gap / 2,
            )
            return objs, position_word(row, col), {"ok": self._place(rng, objs, [box]), "third": [row, col]}
        if skill == "relation":
            phrase = str(rng.choice(list(RELATIONS)))
            axis, sign = RELATIONS[phrase]
            yes = bool(rng.integers(2))
            objs = self._objects(rng, 2, True)
            # Split the asked axis into two halves with a gap between them: a goes to the side the answer needs.
            lo_half, hi_half = (0.0, size / 2 - c.gap / 2), (size / 2 + c.gap / 2, size)
            a_side, b_side = (lo_half, hi_half) if (sign < 0) == yes else (hi_half, lo_half)
            boxes = []
            for lo, hi in (a_side, b_side):
                boxes.append((lo, 0.0, hi, size) if axis == 0 else (0.0, lo, size, hi))
            a, b = (f"{o['colour']} {o['shape']}" for o in objs)
            return objs, "yes" if yes else "no", {"ok": self._place(rng, objs, boxes), "relation": phrase, "ab": [a, b]}
        # caption: 1-3 distinct objects in distinct thirds of the width, so left-to-right order is unambiguous.
        n = int(rng.integers(1, 4))
        cols = sorted(rng.choice(3, size=n, replace=False).tolist())
        third = size / 3
        objs = self._objects(rng, n, True)
        ok = self._place(rng, objs, [(k * third + c.gap / 2, 0.0, (k + 1) * third - c.gap / 2, size) for k in cols])
        words = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}" for o in objs]
        answer = words[0] if n == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return objs, answer, {"ok": ok}

    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw one sample of the skill ``target_answer`` names (the writer passes it by index; random when None)."""
        c = self.config
        skill = target_answer if target_answer is not None else str(rng.choice(list(c.skills)))
        restarts = 0
        if skill == "marked":
            image, obj, info = self._marked(rng)
            objs, answer = [obj], obj["colour"]
        else:
            objs, answer, info = self._scene(rng, skill)
            while not info.pop("ok"):
                restarts += 1
                if restarts >= c.max_attempts:
                    raise GenerationError(f"curriculum: no free placement for a {skill} scene after {restarts} tries")
                objs, answer, info = self._scene(rng, skill)
            image = self._draw(objs)
            objs = [{k: o[k] for k in ("shape", "colour", "box")} for o in objs]
        template = int(rng.integers(len(TEMPLATES[skill])))
        if skill == "relation":
            a, b = info["ab"]
            question = TEMPLATES[skill][template].format(a=a, b=b, relation=info["relation"])
        else:
            question = TEMPLATES[skill][template]
        # Drawn only when asked for, so a mix without suffixes draws the first base's samples exactly.
        if c.suffix_share > 0 and skill in ONE_WORD and rng.random() < c.suffix_share:
            question = f"{question} {SUFFIXES[int(rng.integers(len(SUFFIXES)))]}"
            info["suffix"] = True
        meta = {"skill": skill, "template": template, "objects": objs, "restarts": restarts, **info}
        return Sample(
            image=image, question=question, answer=answer, evidence=Evidence(boxes=[o["box"] for o in objs]), meta=meta
        )

    def answer_classes(self) -> list[str]:
        """The skills, in turn: the writer's balancing by index gives every skill the same share of samples."""
        return list(self.config.skills)


def evaluation_templates() -> list[re.Pattern[str]]:
    """The question phrasings of every evaluation task (grid_patch, line_intersection, line_tracing, the lookup tasks
    and the marked lookups) as patterns that match any filling of their placeholders."""
    from data_gen.tasks import grid_patch, line_intersection, line_tracing, lookup, marked

    phrasings = [
        *grid_patch.QUESTION_TEMPLATES,
        *line_intersection.PAIR_TEMPLATES,
        *line_intersection.ALL_TEMPLATES,
        *line_tracing.TEMPLATES,
        *lookup.SHAPE_TEMPLATES,
        *lookup.COLOUR_TEMPLATES,
        *lookup.NEIGHBOUR_TEMPLATES,
        *(t for style in marked.TEMPLATES.values() for t in style),
    ]
    out = []
    for p in phrasings:
        parts = re.split(r"\{[a-z_]+\}", p)
        out.append(re.compile(".+".join(re.escape(x) for x in parts), re.IGNORECASE))
    return out


def heldout_question(meta: dict[str, Any], index: int) -> str:
    """The question of a sample (its ``meta``) asked with a phrasing of :data:`HELDOUT_TEMPLATES`, chosen by
    ``index``, with the suffix when the sample had one."""
    skill = meta["skill"]
    phrasings = HELDOUT_TEMPLATES[skill]
    question = phrasings[index % len(phrasings)]
    if skill == "relation":
        a, b = meta["ab"]
        question = question.format(a=a, b=b, relation=meta["relation"])
    return f"{question} {SUFFIXES[0]}" if meta.get("suffix") else question
