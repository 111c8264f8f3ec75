"""The one dataset schema every klal dataset uses: synthetic tasks, RefCOCO, PixMo-Points and your own data.

A dataset is a ``datasets.DatasetDict`` saved with ``save_to_disk`` whose splits (``train``, ``validation``,
``test``) carry the columns of :data:`FEATURES`. Evidence coordinates are in pixels of the *original* image
(``width`` x ``height``); converters rescale them to the model's token grid.

Text-only samples. A row whose ``image`` is None (or, for rows built in memory, an empty list) is a text-only
sample: the prompt gets no image placeholder, the sample trains with next-token loss only, and the collator counts it
as having no target map (reason ``no image``). Such a row has ``width = height = 0`` and empty evidence. A row
without an ``image`` field, or whose image is neither an image nor None / an empty list, is an error that names the
sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets

REQUIRED_COLUMNS = ("id", "task", "image", "question", "answer", "width", "height", "evidence", "meta")
"""The columns of :data:`FEATURES`, in order."""


def _features() -> dict[str, Any]:
    import datasets

    evidence = {
        # [[x0, y0, x1, y1], ...]
        "boxes": datasets.List(datasets.List(datasets.Value("float32"))),
        # [[x, y], ...]
        "points": datasets.List(datasets.List(datasets.Value("float32"))),
        # [[[x, y], ...], ...]
        "polylines": datasets.List(datasets.List(datasets.List(datasets.Value("float32")))),
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "task": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "evidence": evidence,
            "meta": datasets.Value("string"),
        }
    )
    return {"EVIDENCE_FEATURE": evidence, "FEATURES": features}


def __getattr__(name: str) -> Any:
    # FEATURES / EVIDENCE_FEATURE are built on first use: importing ``datasets`` takes seconds, and the schema's other
    # names (Evidence, parse_box, ...) are needed by commands that never touch a dataset (``--help`` among them).
    if name in ("FEATURES", "EVIDENCE_FEATURE"):
        globals().update(_features())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SPLITS = ("train", "validation", "test")


@dataclass
class Evidence:
    """Evidence geometry of one sample, in original-image pixels.

    Attributes:
        boxes: ``[[x0, y0, x1, y1], ...]`` boxes (x right, y down, x0 < x1, y0 < y1).
        points: ``[[x, y], ...]`` points.
        polylines: ``[[[x, y], ...], ...]`` open polylines, each with at least two vertices.
    """

    boxes: list[list[float]] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    polylines: list[list[list[float]]] = field(default_factory=list)

    def is_empty(self) -> bool:
        """True when no geometry of any kind is present."""
        return not (self.boxes or self.points or self.polylines)

    def to_dict(self) -> dict[str, Any]:
        """The dict stored in the ``evidence`` column."""
        return {
            "boxes": [[float(v) for v in b] for b in self.boxes],
            "points": [[float(v) for v in p] for p in self.points],
            "polylines": [[[float(v) for v in p] for p in line] for line in self.polylines],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Evidence:
        """Build from an ``evidence`` column value (missing keys read as empty)."""
        d = d or {}
        return cls(
            boxes=[list(b) for b in (d.get("boxes") or [])],
            points=[list(p) for p in (d.get("points") or [])],
            polylines=[[list(p) for p in line] for line in (d.get("polylines") or [])],
        )


def _coords(value: Any, n: int, where: str, layout: str, error: type[ValueError]) -> tuple[float, ...]:
    """``n`` finite numbers from ``value`` (a list, tuple or array), or ``error`` naming ``where``."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise error(f"{where}: not a list of numbers ({value!r})") from e
    if arr.shape != (n,):
        raise error(f"{where}: needs {n} coordinates {layout}, got shape {arr.shape} ({value!r})")
    if not np.all(np.isfinite(arr)):
        raise error(f"{where}: contains NaN or inf ({arr.tolist()})")
    return tuple(float(v) for v in arr)


def parse_box(value: Any, where: str, error: type[ValueError] = ValueError) -> tuple[float, float, float, float]:
    """The one box parser: ``value`` as ``(x0, y0, x1, y1)`` floats, checked.

    A box is 4 finite numbers with ``x0 <= x1`` and ``y0 <= y1`` (a zero-width or zero-height box is well-formed; what
    it means is up to the caller). Formats other than ``[x0, y0, x1, y1]`` (COCO's ``[x, y, w, h]``) are converted by
    their reader before this check.

    Args:
        value: a sequence or array of 4 numbers.
        where: what the box is, for the message (e.g. ``"sample 'q2' boxes[0]"``).
        error: the exception class raised (a ValueError subclass such as :class:`klal.data.targets.TargetMapError`).

    Raises:
        ValueError: (or ``error``) not 4 numbers, NaN or inf, or ``x1 < x0`` / ``y1 < y0``; the message starts with
            ``where``.
    """
    x0, y0, x1, y1 = _coords(value, 4, where, "[x0, y0, x1, y1]", error)
    for lo, hi, name in ((x0, x1, "x"), (y0, y1, "y")):
        if hi < lo:
            raise error(
                f"{where}: {name}1 < {name}0 in {[x0, y0, x1, y1]} (a box is [x0, y0, x1, y1] with x0 <= x1 and "
                "y0 <= y1, not x/y/width/height)"
            )
    return x0, y0, x1, y1


def parse_point(value: Any, where: str, error: type[ValueError] = ValueError) -> tuple[float, float]:
    """``value`` as an ``(x, y)`` pair of finite floats (see :func:`parse_box` for ``where`` and ``error``)."""
    x, y = _coords(value, 2, where, "[x, y]", error)
    return x, y


def is_text_only(image: Any) -> bool:
    """Whether an ``image`` value marks a text-only sample: None or an empty list/tuple (not a missing field)."""
    return image is None or (isinstance(image, (list, tuple)) and len(image) == 0)


def make_record(
    *,
    id: str,
    task: str,
    image: Any,
    question: str,
    answer: str,
    evidence: Evidence,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row in the schema; ``width``/``height`` are read from the PIL image (0 for a text-only sample).

    Args:
        id: sample id (named in every error about the sample).
        task: task name.
        image: a PIL image (or anything with ``width``/``height`` that the ``Image`` feature stores), or None for a
            text-only sample.
        question: the user turn.
        answer: the supervised assistant turn.
        evidence: evidence geometry in original-image pixels; must be empty for a text-only sample.
        meta: free-form metadata, stored as JSON.

    Raises:
        ValueError: a text-only sample with evidence (there is no image for it to point into).
    """
    text_only = is_text_only(image)
    if text_only and not evidence.is_empty():
        raise ValueError(f"sample {id!r}: has evidence but no image; a text-only sample has empty evidence")
    return {
        "id": id,
        "task": task,
        "image": None if text_only else image,
        "question": question,
        "answer": answer,
        # Text-only rows have no size; 0 x 0 tells the length estimate not to count visual tokens.
        "width": 0 if text_only else int(image.width),
        "height": 0 if text_only else int(image.height),
        "evidence": evidence.to_dict(),
        "meta": json.dumps(meta or {}, sort_keys=True),
    }


def check_columns(ds: datasets.Dataset, source: str) -> None:
    """Raise a ValueError naming ``source`` when a dataset lacks a schema column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source}: dataset is missing column(s) {missing}; klal datasets need {list(REQUIRED_COLUMNS)} "
            "(see README, 'Dataset schema')"
        )
