"""RefCOCO / RefCOCO+ / RefCOCOg -> the klal schema: one row per referring sentence, the referred box as evidence.

Two upstream layouts are read:

* classic (the ``refer`` toolkit layout): a directory with ``refs(<split_by>).p`` (a pickled list of refs with
  ``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences`` = ``[{"sent", "raw", "sent_id", ...}]``,
  ``file_name``), ``instances.json`` (COCO: ``images`` with ``id``/``file_name``, ``annotations`` with
  ``id``/``bbox`` = ``[x, y, w, h]``, ``categories``) and the COCO ``train2014`` images (``image_dir``; by default the
  first existing of ``images/train2014``, ``train2014``, ``images`` next to the refs file, and
  ``../images/mscoco/images/train2014``, ``../images/train2014``, ``../train2014``). The pickle must be trusted
  (unpickling runs code). :func:`classic_refcoco_rows` turns this layout into flat rows.
* flat records (the layout of hub copies such as ``jxu124/refcoco`` or ``lmms-lab/RefCOCO``), from a saved dataset,
  parquet, jsonl or a hub name (:func:`klal.data.io.load_source`). Columns read: the image from ``image``
  (bytes/path) or the first of ``image_path``, ``file_name``, ``image_file``, ``filename``, ``img_path``
  (resolved against ``image_dir`` and the source's directory; refs-style names ``COCO_train2014_<id>_<ann>.jpg`` also
  try ``COCO_train2014_<id>.jpg``); the box from ``bbox`` (``[x, y, w, h]``, or ``[x0, y0, x1, y1]`` with
  ``bbox_format="xyxy"``); the expressions from the first of ``sentences``, ``expressions``, ``expression``,
  ``answer``, ``answers``, ``captions``, ``referring_expression``, ``sentence``, ``text`` (a string, a list of strings,
  or a list of ``{"sent"/"raw": ...}`` dicts); the split from ``split`` when present, else the source split.

Splits: ``train`` -> ``train``, ``val``/``validation`` -> ``validation``, ``test`` -> ``test``; RefCOCO's ``testA`` and
``testB`` keep their names.

Text: question ``"Where is {expression}? Answer with the bounding box."`` and answer ``"[{x0}, {y0}, {x1}, {y1}]"``
(integer pixels of the original image, or of the processor-resized image with ``answer_coords="resized"``, the
convention Qwen2.5-VL was trained with). Templates may use ``{expression}``, ``{category}``, ``{x0}``, ``{y0}``,
``{x1}``, ``{y1}``, ``{width}``, ``{height}``.

Skipped (counted per sentence, reported; raised in strict mode): missing or unreadable image, missing or malformed
box (not 4 finite numbers, non-positive width/height), box entirely outside the image, empty expression. Boxes partly
outside the image are clipped (counted as a note).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
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
    split_list,
)
from klal.data.schema import Evidence, make_record, parse_box
from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_pixels
from klal.models.family import DEFAULT_MODEL_TYPE, family_for_type

DEFAULT_QUESTION = "Where is {expression}? Answer with the bounding box."
DEFAULT_ANSWER = "[{x0}, {y0}, {x1}, {y1}]"
TEMPLATE_FIELDS = ("expression", "category", "x0", "y0", "x1", "y1", "width", "height")
EXPRESSION_COLUMNS = (
    "sentences",
    "expressions",
    "expression",
    "answer",
    "answers",
    "captions",
    "referring_expression",
    "sentence",
    "text",
)
IMAGE_PATH_COLUMNS = ("image_path", "file_name", "image_file", "filename", "img_path")

# The refs pickle names images COCO_train2014_<image id>_<annotation id>.jpg; the file on disk has no annotation part.
_REFS_FILE_NAME = re.compile(r"^(COCO_[A-Za-z]+\d*_\d+)_\d+(\.\w+)$")


# -- classic layout ----------------------------------------------------------------------------------------------------


def _load_pickle(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:
            # Python 2 pickles (the original refs files) hold byte strings that need latin-1 to load.
            f.seek(0)
            return pickle.load(f, encoding="latin1")


def classic_refcoco_rows(refs_file: str, instances_file: str) -> dict[str, list[dict[str, Any]]]:
    """Flat rows (upstream split -> rows) from a ``refs(...).p`` pickle and its COCO ``instances.json``.

    Each row has ``ref_id``, ``ann_id``, ``image_id``, ``category``, ``file_name`` (from ``instances.json``, else the
    ref's own), ``bbox`` (COCO ``[x, y, w, h]``; None when the annotation is missing), ``sentences`` and ``split``.

    Raises:
        ValueError: the files do not have the expected structure (the message names the file).
    """
    refs = _load_pickle(refs_file)
    if not isinstance(refs, list) or not all(isinstance(r, Mapping) for r in refs):
        raise ValueError(f"{refs_file}: expected a pickled list of ref dicts, got {type(refs).__name__}")
    with open(instances_file, encoding="utf-8") as f:
        try:
            inst = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{instances_file}: not valid JSON ({e})") from None
    if not isinstance(inst, Mapping) or not {"images", "annotations"} <= set(inst):
        raise ValueError(f"{instances_file}: expected COCO instances json with 'images' and 'annotations'")
    images = _by_id(inst["images"], instances_file, "images")
    anns = _by_id(inst["annotations"], instances_file, "annotations")
    categories = _by_id(inst.get("categories") or [], instances_file, "categories")
    cats = {k: c.get("name", str(k)) for k, c in categories.items()}
    out: dict[str, list[dict[str, Any]]] = {}
    for k, ref in enumerate(refs):
        missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "sentences") if key not in ref]
        if missing:
            raise ValueError(f"{refs_file}: ref #{k} lacks key(s) {missing}")
        ann = anns.get(ref["ann_id"])
        image = images.get(ref["image_id"], {})
        cat_id = ref.get("category_id", ann.get("category_id") if ann else None)
        out.setdefault(str(ref["split"]), []).append(
            {
                "ref_id": ref["ref_id"],
                "ann_id": ref["ann_id"],
                "image_id": ref["image_id"],
                "category": cats.get(cat_id, "" if cat_id is None else str(cat_id)),
                "file_name": image.get("file_name") or ref.get("file_name"),
                "bbox": ann.get("bbox") if ann else None,
                "sentences": list(ref["sentences"]),
                "split": str(ref["split"]),
            }
        )
    return out


def _by_id(entries: Any, file: str, key: str) -> dict[Any, Mapping[str, Any]]:
    """COCO's ``images`` / ``annotations`` / ``categories`` list as ``{id: entry}``, checked.

    Raises:
        ValueError: not a list of objects that each have an ``id`` (naming the file, the key and the entry).
    """
    if not isinstance(entries, list):
        raise ValueError(f"{file}: '{key}' must be a list of objects, got {type(entries).__name__}")
    out = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "id" not in entry:
            raise ValueError(f"{file}: {key}[{k}] must be an object with an 'id', got {entry!r:.80}")
        out[entry["id"]] = entry
    return out


def _classic_files(source: str, split_by: str | None, instances_file: str | None) -> tuple[str, str] | None:
    """``(refs file, instances file)`` when ``source`` is the classic layout, else None."""
    path = os.path.expanduser(source)
    if os.path.isfile(path) and path.endswith((".p", ".pkl", ".pickle")):
        refs = path
    elif os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "refs(*).p")))
        if not found:
            return None
        if split_by is not None:
            refs = os.path.join(path, f"refs({split_by}).p")
            if not os.path.isfile(refs):
                raise FileNotFoundError(f"{refs} not found (split_by={split_by!r}); refs files here: {found}")
        elif len(found) == 1:
            refs = found[0]
        else:
            raise ValueError(f"{source}: several refs files {found}; choose one with split_by (e.g. 'unc', 'umd')")
    else:
        return None
    instances = instances_file or os.path.join(os.path.dirname(os.path.abspath(refs)), "instances.json")
    if not os.path.isfile(instances):
        raise FileNotFoundError(f"{instances} not found; pass instances_file (COCO instances.json for {refs})")
    return refs, instances


def _classic_image_dir(refs_file: str, image_dir: str | None) -> str:
    if image_dir is not None:
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image_dir {image_dir} is not a directory")
        return image_dir
    base = os.path.dirname(os.path.abspath(refs_file))
    cands = [
        os.path.join(base, "images", "train2014"),
        os.path.join(base, "train2014"),
        os.path.join(base, "images"),
        os.path.join(base, "..", "images", "mscoco", "images", "train2014"),
        os.path.join(base, "..", "images", "train2014"),
        os.path.join(base, "..", "train2014"),
    ]
    for c in cands:
        if os.path.isdir(c):
            return os.path.normpath(c)
    raise FileNotFoundError(f"no COCO image directory found for {refs_file}; tried {cands}; pass image_dir")


# -- flat rows ---------------------------------------------------------------------------------------------------------


def _expressions(row: Mapping[str, Any], sentence_field: str) -> list[tuple[str, Any]]:
    """``[(text, sent_id or None), ...]`` from the first expression column present."""
    for col in EXPRESSION_COLUMNS:
        value = row.get(col)
        if value is None:
            continue
        items = [value] if isinstance(value, (str, Mapping)) else list(value)
        out = []
        for item in items:
            if isinstance(item, Mapping):
                text = item.get(sentence_field) or item.get("raw") or item.get("sent") or ""
                out.append((str(text).strip(), item.get("sent_id")))
            else:
                out.append(("" if item is None else str(item).strip(), None))
        return out
    return []


def xywh_to_xyxy(value: Any, where: str) -> list[float]:
    """COCO's ``[x, y, w, h]`` as ``[x0, y0, x1, y1]`` (the numbers are checked by :func:`parse_box` afterwards)."""
    try:
        x, y, w, h = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected 4 numbers [x, y, w, h], got {value!r}") from e
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: non-positive width/height in [x, y, w, h] = {[x, y, w, h]}")
    return [x, y, x + w, y + h]


def _parse_bbox(value: Any, fmt: str) -> list[float]:
    """A row's box as ``[x0, y0, x1, y1]`` with positive width and height, or :class:`SkipRecord`."""
    if value is None:
        raise SkipRecord("missing box")
    where = f"bbox ({fmt})"
    try:
        box = parse_box(xywh_to_xyxy(value, where) if fmt == "xywh" else value, where)
    except ValueError as e:
        raise SkipRecord("malformed box", str(e)) from e
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise SkipRecord("malformed box", f"{where}: need x0 < x1 and y0 < y1 in [x0, y0, x1, y1] = {list(box)}")
    return list(box)


def _image_for_row(row: Mapping[str, Any], resolver: ImageResolver) -> ImageRef:
    ref = resolver.from_value(row.get("image"))
    if ref is not None:
        return ref
    names: list[str] = []
    for col in IMAGE_PATH_COLUMNS:
        v = row.get(col)
        if v:
            names.append(str(v))
            m = _REFS_FILE_NAME.match(os.path.basename(str(v)))
            if m:
                names.append(m.group(1) + m.group(2))
    if not names:
        raise SkipRecord("missing image file", f"no image column (image or {list(IMAGE_PATH_COLUMNS)})")
    found = resolver.find(names)
    if found is None:
        raise SkipRecord("missing image file", f"{names[0]} not found in {resolver.search_dirs}")
    return resolver.from_path(found)


def convert_refcoco_rows(
    rows_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    source_name: str = "refcoco",
    image_dirs: Sequence[str | None] = (),
    question: str = DEFAULT_QUESTION,
    answer: str = DEFAULT_ANSWER,
    answer_coords: Literal["original", "resized"] = "original",
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model_type: str = DEFAULT_MODEL_TYPE,
    sentence_field: str = "sent",
    bbox_format: Literal["xywh", "xyxy"] = "xywh",
    splits: Sequence[str] | str | None = None,
    verify_images: bool = False,
    strict: bool = False,
    task: str = "refcoco",
) -> Conversion:
    """Convert flat RefCOCO-style rows (see the module docstring) into the klal schema.

    Args:
        rows_by_split: upstream split name -> rows (dict-like).
        source_name: name used in the report and in error messages.
        image_dirs: directories searched for image files.
        question: question template.
        answer: answer template.
        answer_coords: box numbers in the answer in ``original`` image pixels or ``resized`` (processor) pixels.
        min_pixels: processor ``min_pixels`` (for ``resized``).
        max_pixels: processor ``max_pixels`` (for ``resized``).
        model_type: the model family whose processor resizes (for ``resized``; a family with a pixel budget).
        sentence_field: key of the expression in sentence dicts (``sent`` or ``raw``; falls back to the other).
        bbox_format: ``xywh`` (COCO) or ``xyxy``.
        splits: keep only these output splits, a list or comma-separated (None: all).
        verify_images: fully decode-check every image.
        strict: raise :class:`~klal.data.io.RecordError` on the first bad record instead of skipping it.
        task: value of the ``task`` column and id prefix.
    """
    if answer_coords not in ("original", "resized"):
        raise ValueError(f"answer_coords must be 'original' or 'resized', got {answer_coords!r}")
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
    check_pixels(min_pixels, max_pixels)
    family = family_for_type(model_type)
    if answer_coords == "resized" and not family.pixel_bounds:
        raise ValueError(f"answer_coords='resized' needs a family with a pixel budget; {family.label} has none")
    check_template(question, "question", TEMPLATE_FIELDS)
    check_template(answer, "answer", TEMPLATE_FIELDS)
    report = ConversionReport(source_name, strict=strict)
    resolver = ImageResolver(image_dirs, verify=verify_images)
    keep_splits = None if splits is None else {canonical_split(s) for s in split_list(splits)}
    out: dict[str, list[dict[str, Any]]] = {}
    for source_split, rows in rows_by_split.items():
        for idx, row in enumerate(rows):
            upstream = str(row.get("split") or source_split)
            split = canonical_split(upstream)
            if keep_splits is not None and split not in keep_splits:
                continue
            ref_id = row.get("ref_id", row.get("question_id", row.get("id")))
            base_id = f"{task}-{ref_id}" if ref_id is not None else f"{task}-{source_split}-{idx}"
            exprs = _expressions(row, sentence_field)
            try:
                if not exprs:
                    raise SkipRecord("empty expression", f"no expression column ({list(EXPRESSION_COLUMNS)})")
                box = _parse_bbox(row.get("bbox", row.get("box")), bbox_format)
                image = _image_for_row(row, resolver)
            except SkipRecord as s:
                report.skip(s.reason, base_id, s.detail, n=max(1, len(exprs)))
                continue
            w, h = image.width, image.height
            clipped = [max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])]
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                report.skip("box outside the image", base_id, f"{box} in a {w}x{h} image", n=len(exprs))
                continue
            if clipped != box:
                report.note("box clipped to the image", base_id)
            if answer_coords == "resized":
                ph, pw = family.resized_hw(h, w, min_pixels, max_pixels)
                sx, sy = pw / w, ph / h
            else:
                sx = sy = 1.0
            coords = {
                "x0": round(clipped[0] * sx),
                "y0": round(clipped[1] * sy),
                "x1": round(clipped[2] * sx),
                "y1": round(clipped[3] * sy),
            }
            category = str(row.get("category") or row.get("category_name") or "")
            for k, (text, sent_id) in enumerate(exprs):
                rec_id = f"{base_id}-{sent_id if sent_id is not None else k}"
                if not text:
                    report.skip("empty expression", rec_id)
                    continue
                fields = {"expression": text, "category": category, "width": w, "height": h, **coords}
                meta = {
                    "source": task,
                    "split": upstream,
                    "ref_id": ref_id,
                    "ann_id": row.get("ann_id"),
                    "image_id": row.get("image_id"),
                    "sent_id": sent_id,
                    "category": category,
                    "bbox_source": [float(v) for v in row.get("bbox", row.get("box"))],
                    "bbox_format": bbox_format,
                    "answer_coords": answer_coords,
                }
                rec = make_record(
                    id=rec_id,
                    task=task,
                    image=image,
                    question=question.format(**fields),
                    answer=answer.format(**fields),
                    evidence=Evidence(boxes=[clipped]),
                    meta=_jsonable(meta),
                )
                rec["image"] = image.stored
                out.setdefault(split, []).append(rec)
                report.keep(split)
    report.log()
    return Conversion(build_dataset_dict(out), report)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Meta values as plain JSON types (numpy/arrow scalars from sources become Python numbers)."""
    return json.loads(json.dumps(d, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# -- entry points ------------------------------------------------------------------------------------------------------


def convert_refcoco(
    source: str,
    *,
    image_dir: str | None = None,
    split_by: str | None = None,
    instances_file: str | None = None,
    out: str | None = None,
    bbox_format: Literal["xywh", "xyxy"] = "xywh",
    **kwargs: Any,
) -> Conversion:
    """Convert RefCOCO from the classic layout or flat records (module docstring) into the klal schema.

    Args:
        source: a classic directory (with ``refs(*).p``) or refs pickle, or a flat-record source (saved dataset,
            parquet/jsonl file or directory, or hub name).
        image_dir: directory of the images (classic: COCO ``train2014``; flat: where relative paths are resolved,
            besides the source's own directory).
        split_by: which ``refs(<split_by>).p`` to read when a classic directory has several (``unc``, ``google``,
            ``umd``).
        instances_file: COCO ``instances.json`` (classic; default: next to the refs file).
        out: also save the converted dataset in this directory (``save_to_disk``; None: only return it).
        bbox_format: flat records' box format: ``xywh`` (COCO) or ``xyxy``; the classic layout is always ``xywh``.
        **kwargs: the other options of :func:`convert_refcoco_rows` (templates, ``answer_coords``, ``splits``,
            ``strict``, ...).
    """
    classic = _classic_files(source, split_by, instances_file)
    if classic is not None:
        refs, instances = classic
        if bbox_format != "xywh":
            raise ValueError("bbox_format: the classic refs layout has COCO [x, y, w, h] boxes; leave it 'xywh'")
        rows = classic_refcoco_rows(refs, instances)
        conversion = convert_refcoco_rows(
            rows, source_name=source, image_dirs=[_classic_image_dir(refs, image_dir)], bbox_format="xywh", **kwargs
        )
    else:
        conversion = convert_refcoco_rows(
            load_source(source),
            source_name=source,
            image_dirs=[image_dir, source_dir(source)],
            bbox_format=bbox_format,
            **kwargs,
        )
    return conversion.written(out)


main = converter_main(convert_refcoco, "python -m klal.data.refcoco")

if __name__ == "__main__":
    main()
