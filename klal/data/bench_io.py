"""What the public-benchmark readers (:mod:`klal.data.vstar`, :mod:`klal.data.textvqa`, :mod:`klal.data.pope`) share:
an image for a row, JSON / JSON-lines files read as row lists, and the benchmark record (the ``benchmark`` meta key
:mod:`klal.eval.benchmarks` scores by)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from klal.data.io import ImageRef, ImageResolver, SkipRecord
from klal.data.refcoco import _jsonable
from klal.data.schema import Evidence, make_record


def row_image(row: Mapping[str, Any], resolver: ImageResolver, path_columns: Sequence[str]) -> ImageRef:
    """The row's image: an inline ``image`` value (bytes / path / PIL), else the first of ``path_columns`` that names a
    file found by ``resolver``; :class:`SkipRecord` ("missing image file") otherwise."""
    ref = resolver.from_value(row.get("image")) if not isinstance(row.get("image"), str) else None
    if ref is not None:
        return ref
    names = [str(row[c]) for c in ("image", *path_columns) if isinstance(row.get(c), str) and row.get(c)]
    if not names:
        raise SkipRecord("missing image file", f"no image column (image or {list(path_columns)})")
    found = resolver.find(names)
    if found is None:
        raise SkipRecord("missing image file", f"{names[0]} not found in {resolver.search_dirs}")
    return resolver.from_path(found)


def read_json_rows(path: str) -> list[dict[str, Any]]:
    """A ``.json`` file (a list, or an object whose ``data`` is a list) or JSON-lines file as a list of rows.

    Raises:
        ValueError: not JSON / JSON lines, or no list of objects in it (naming the file and line).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
    if isinstance(data, Mapping):
        data = data.get("data")
    if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
        raise ValueError(f"{path}: expected a list of objects (or an object with a 'data' list)")
    return [dict(r) for r in data]


def read_json_object(path: str) -> dict[str, Any]:
    """One JSON object from ``path``; a ValueError naming the file otherwise."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object")
    return dict(data)


def benchmark_record(
    *,
    id: str,
    task: str,
    image: ImageRef,
    question: str,
    answer: str,
    evidence: Evidence,
    benchmark: str,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """A schema row whose meta names its ``benchmark``; the image stays a reference (path or the source's bytes)."""
    plain = _jsonable(dict(meta))
    rec = make_record(
        id=id,
        task=task,
        image=image,
        question=question,
        answer=answer,
        evidence=evidence,
        meta={"benchmark": benchmark, **plain},
    )
    rec["image"] = image.stored
    return rec


def local_json(source: str) -> str | None:
    """``source`` when it is a local ``.json`` / ``.jsonl`` file, else None."""
    path = os.path.expanduser(source)
    return path if os.path.isfile(path) and path.lower().endswith((".json", ".jsonl")) else None


__all__ = ["benchmark_record", "local_json", "read_json_object", "read_json_rows", "row_image"]
