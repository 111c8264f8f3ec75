"""PixMo-Points -> the klal schema: one row per (image, label) record, the annotated points as evidence.

Upstream records (``allenai/pixmo-points``) have ``image_url``, ``image_sha256``, ``label``, ``points`` =
``[{"x": .., "y": ..}, ...]``, ``count`` and ``collection_method``; images are not included and must be downloaded
separately. Point coordinates are read as PERCENT of the image size (0-100), the convention of Molmo's own PixMo
loader (``point_scale=100``), even though the dataset card says "pixels"; ``point_units="pixels"`` reads them as
pixels instead. Points may also be ``[x, y]`` pairs.

Images, in this order:

1. an inline ``image`` column (bytes/path, e.g. a copy with images attached), or an ``image_path``/``file_name``/
   ``path`` column (resolved against ``image_dir`` and the source's directory);
2. in ``image_dir``: a file named ``<image_sha256>`` (with or without an extension), then
   ``<sha256 of the image_url string>`` (with or without an extension), then the last path component of the URL (as
   is, then percent-decoded).

Text (``mode="count"``, default): question ``"How many {label} are there?"``, answer ``"{count}"`` (the record's
``count``, else the number of points). ``mode="point"``: question ``"Point to the {label}."``, answer ``"{points}"`` =
the points as ``[[x, y], ...]`` integer pixels of the original image. Templates may use ``{label}``, ``{count}`` and
``{points}``. Records with no points are kept (a count of 0 has no target map; the loss skips it).

Splits: upstream has only ``train``; ``val_fraction``/``test_fraction`` move a deterministic share of the *images*
(by a hash of the image key, so all labels of one image stay together) into ``validation``/``test``.

Skipped (counted, reported; raised in strict mode): missing or unreadable image, image hash mismatch (only with
``verify_sha256``), missing label, malformed points (not numbers, NaN/inf, or outside the image / 0-100 %).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from klal.data.io import (
    Conversion,
    ConversionReport,
    ImageRef,
    ImageResolver,
    SkipRecord,
    build_dataset_dict,
    canonical_split,
    check_template,
    converter_main,
    load_source,
    source_dir,
)
from klal.data.schema import Evidence, make_record, parse_point

DEFAULT_QUESTIONS = {"count": "How many {label} are there?", "point": "Point to the {label}."}
DEFAULT_ANSWERS = {"count": "{count}", "point": "{points}"}
TEMPLATE_FIELDS = ("label", "count", "points")
IMAGE_PATH_COLUMNS = ("image_path", "file_name", "path")


def url_hash(url: str) -> str:
    """Hex SHA-256 of the URL string: one of the file names images are looked up by."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def image_bucket(key: str, salt: str = "klal") -> float:
    """Deterministic number in ``[0, 1)`` for an image key (used to carve validation/test splits)."""
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def _image_key(row: Mapping[str, Any]) -> str:
    for col in ("image_sha256", "image_url", *IMAGE_PATH_COLUMNS):
        if row.get(col):
            return str(row[col])
    return ""


def _image_for_row(row: Mapping[str, Any], resolver: ImageResolver) -> ImageRef:
    ref = resolver.from_value(row.get("image"))
    if ref is not None:
        return ref
    names = [str(row[c]) for c in IMAGE_PATH_COLUMNS if row.get(c)]
    found = resolver.find(names) if names else None
    if found is None:
        url = str(row.get("image_url") or "")
        stems = [row.get("image_sha256"), url_hash(url) if url else None]
        found = resolver.find_by_stem(stems)
        if found is None and url:
            base = os.path.basename(urllib.parse.urlparse(url).path)
            found = resolver.find([base, urllib.parse.unquote(base)]) if base else None
    if found is None:
        what = names[0] if names else (row.get("image_sha256") or row.get("image_url") or "no image column")
        raise SkipRecord("missing image file", f"{what} not found in {resolver.search_dirs}")
    return resolver.from_path(found)


def _parse_points(value: Any, units: str, w: int, h: int) -> list[list[float]]:
    if value is None:
        return []
    pts = []
    for k, p in enumerate(value):
        try:
            x, y = parse_point((p["x"], p["y"]) if isinstance(p, Mapping) else p, f"points[{k}] = {p!r}")
        except (TypeError, ValueError, KeyError) as e:
            raise SkipRecord("malformed points", str(e)) from e
        if units == "percent":
            if not (0 <= x <= 100 and 0 <= y <= 100):
                raise SkipRecord("malformed points", f"points[{k}] = {p!r} outside 0-100 %")
            x, y = x * w / 100, y * h / 100
        elif not (0 <= x <= w and 0 <= y <= h):
            raise SkipRecord("malformed points", f"points[{k}] = {p!r} outside the {w}x{h} image")
        pts.append([x, y])
    return pts


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")


def convert_pixmo_rows(
    rows_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    source_name: str = "pixmo_points",
    image_dirs: Sequence[str | None] = (),
    mode: Literal["count", "point"] = "count",
    question: str | None = None,
    answer: str | None = None,
    point_units: Literal["percent", "pixels"] = "percent",
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    split_salt: str = "klal",
    verify_sha256: bool = False,
    verify_images: bool = False,
    strict: bool = False,
    task: str = "pixmo_points",
) -> Conversion:
    """Convert PixMo-Points-style rows (see the module docstring) into the klal schema.

    Args:
        rows_by_split: upstream split name -> rows (dict-like).
        source_name: name used in the report and in error messages.
        image_dirs: directories searched for image files.
        mode: ``count`` (how many) or ``point`` (where) questions.
        question: question template (default: per mode).
        answer: answer template (default: per mode).
        point_units: ``percent`` (0-100, upstream) or ``pixels``.
        val_fraction: share of training images moved to ``validation``.
        test_fraction: share of training images moved to ``test``.
        split_salt: salt of the image hash that assigns the carved splits.
        verify_sha256: check each image file's SHA-256 against ``image_sha256`` (reads every file).
        verify_images: fully decode-check every image.
        strict: raise :class:`~klal.data.io.RecordError` on the first bad record instead of skipping it.
        task: value of the ``task`` column and id prefix.
    """
    if mode not in DEFAULT_QUESTIONS:
        raise ValueError(f"mode must be one of {list(DEFAULT_QUESTIONS)}, got {mode!r}")
    if point_units not in ("percent", "pixels"):
        raise ValueError(f"point_units must be 'percent' or 'pixels', got {point_units!r}")
    _check_fractions(val_fraction, test_fraction)
    question = question if question is not None else DEFAULT_QUESTIONS[mode]
    answer = answer if answer is not None else DEFAULT_ANSWERS[mode]
    check_template(question, "question", TEMPLATE_FIELDS)
    check_template(answer, "answer", TEMPLATE_FIELDS)
    canon = {canonical_split(s) for s in rows_by_split}
    for frac, name in ((val_fraction, "validation"), (test_fraction, "test")):
        if frac > 0 and name in canon:
            raise ValueError(f"{source_name} already has a {name!r} split; do not carve one with a fraction")

    report = ConversionReport(source_name, strict=strict)
    resolver = ImageResolver(image_dirs, verify=verify_images)
    checked_hash: dict[str, bool] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    for source_split, rows in rows_by_split.items():
        for idx, row in enumerate(rows):
            split = canonical_split(str(row.get("split") or source_split))
            rec_id = f"{task}-{source_split}-{idx}"
            try:
                label = str(row.get("label") or "").strip()
                if not label:
                    raise SkipRecord("missing label")
                image = _image_for_row(row, resolver)
                if verify_sha256 and row.get("image_sha256") and image.stored.get("path"):
                    path = image.stored["path"]
                    if path not in checked_hash:
                        with open(path, "rb") as f:
                            checked_hash[path] = hashlib.sha256(f.read()).hexdigest() == row["image_sha256"]
                    if not checked_hash[path]:
                        raise SkipRecord("image hash mismatch", f"{path} != {row['image_sha256']}")
                points = _parse_points(row.get("points"), point_units, image.width, image.height)
            except SkipRecord as s:
                report.skip(s.reason, rec_id, s.detail)
                continue
            count = row.get("count")
            count = len(points) if count is None else int(count)
            if count != len(points):
                report.note("count differs from the number of points", rec_id)
            if split == "train" and (val_fraction or test_fraction):
                b = image_bucket(_image_key(row) or rec_id, split_salt)
                if b < val_fraction:
                    split = "validation"
                elif b < val_fraction + test_fraction:
                    split = "test"
            fields = {"label": label, "count": count, "points": json.dumps([[round(x), round(y)] for x, y in points])}
            meta = {
                "source": task,
                "image_url": row.get("image_url"),
                "image_sha256": row.get("image_sha256"),
                "label": label,
                "count": count,
                "num_points": len(points),
                "collection_method": row.get("collection_method"),
                "point_units": point_units,
                "mode": mode,
            }
            rec = make_record(
                id=rec_id,
                task=task,
                image=image,
                question=question.format(**fields),
                answer=answer.format(**fields),
                evidence=Evidence(points=points),
                meta=meta,
            )
            rec["image"] = image.stored
            out.setdefault(split, []).append(rec)
            report.keep(split)
    report.log()
    return Conversion(build_dataset_dict(out), report)


def convert_pixmo_points(
    source: str,
    *,
    image_dir: str | None = None,
    out: str | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    **kwargs: Any,
) -> Conversion:
    """Convert PixMo-Points records from a saved dataset, parquet/jsonl file or directory, or hub name.

    Args:
        source: where the records are (:func:`klal.data.io.load_source`).
        image_dir: directory of the downloaded images (see the module docstring for the file names looked up).
        out: also save the converted dataset in this directory (``save_to_disk``; None: only return it).
        val_fraction: share of training images moved to ``validation``.
        test_fraction: share of training images moved to ``test``.
        **kwargs: the other options of :func:`convert_pixmo_rows` (``mode``, templates, ``point_units``, ``strict``,
            ...).
    """
    _check_fractions(val_fraction, test_fraction)  # before the source is read, so a bad value fails at once
    # The call is spelled out (not through a shared helper) so that jsonargparse follows **kwargs into
    # convert_pixmo_rows and lists its options as flags.
    return convert_pixmo_rows(
        load_source(source),
        source_name=source,
        image_dirs=[image_dir, source_dir(source)],
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        **kwargs,
    ).written(out)


main = converter_main(convert_pixmo_points, "python -m klal.data.pixmo")

if __name__ == "__main__":
    main()
