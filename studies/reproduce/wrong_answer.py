"""The wrong-answer rules of the diagnostic in :mod:`studies.reproduce.leak`: per task, a wrong answer to feed and the
box of its own evidence, from a row's generator meta alone.

Kept apart from the diagnostic itself (which evaluates models through :mod:`studies.reproduce.pipeline`) because the
study config checks which tasks have a rule (``StudyConfig._check_leak``): with the rules here, the config imports
them without importing the diagnostic, and no import runs in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Box = list[float]


def _colour_lookup(meta: dict[str, Any], gold: str) -> tuple[str, Box | None]:
    # Object 0 is the target; 1 a distractor of another colour (colours are unique). The marked lookups
    # (data_gen.tasks.marked) keep the convention, with "colour" their fill colour.
    other = meta["objects"][1]
    return other["colour"], list(other["box"])


def _grid_patch(meta: dict[str, Any], gold: str) -> tuple[str, Box | None]:
    t = meta["target"]
    xs, ys = meta["x_edges"], meta["y_edges"]
    for r, row in enumerate(meta["cells"]):
        for c, obj in enumerate(row):
            if obj is not None and (r + 1, c + 1) != (t["row"], t["col"]):
                return f"({r + 1}, {c + 1})", [float(xs[c]), float(ys[r]), float(xs[c + 1]), float(ys[r + 1])]
    raise ValueError(f"grid_patch item without a distractor cell: {meta['cells']}")


def _line_intersection(meta: dict[str, Any], gold: str) -> tuple[str, Box | None]:
    return str(int(gold) + 1), None


def _line_tracing(meta: dict[str, Any], gold: str) -> tuple[str, Box | None]:
    return ("No" if gold == "Yes" else "Yes"), None


WRONG_ANSWER: dict[str, Callable[[dict[str, Any], str], tuple[str, Box | None]]] = {
    "colour_lookup": _colour_lookup,
    "ring_colour": _colour_lookup,
    "outline_colour": _colour_lookup,
    "beside_colour": _colour_lookup,
    "grid_patch": _grid_patch,
    "line_intersection": _line_intersection,
    "line_tracing": _line_tracing,
}
"""Task -> (generator meta, gold answer as generated) -> (a wrong answer, the box of its evidence or None)."""
