"""V* Bench -> the klal schema: one row per multiple-choice question, the target objects' boxes as evidence.

Layouts read:

* the authors' folder (``craigwu/vstar_bench``): ``test_questions.jsonl`` (``image`` = ``<category>/<name>.jpg``,
  ``text`` = the question with ``(A) ...`` option lines, ``category``, ``question_id``, ``label`` = the correct letter)
  and, beside each image, ``<name>.json`` with ``target_object`` (names), ``bbox`` (one COCO ``[x, y, w, h]`` box per
  target object), ``question`` and ``options``. A folder without ``test_questions.jsonl`` is read from the per-image
  JSON files alone; their ``options`` list the correct answer first, so klal orders the options by a hash of the
  image name (deterministic; the correct letter is recorded) instead of always putting the answer at A.
* flat records (``lmms-lab/vstar-bench``: ``image``, ``text``, ``category``, ``question_id``, ``label``), from a saved
  dataset, parquet/jsonl or a hub name; a ``bbox`` column (``[[x, y, w, h], ...]``) is read as evidence when present,
  otherwise rows have no evidence (counted as a note).

Text, as lmms-eval's ``vstar_bench`` task renders it: the question (the text before ``(A)``), then one line per option
``A. ...``, then ``"\\nAnswer with the option's letter from the given choices directly."``; answer = the correct letter.
A trailing instruction already in ``text`` is dropped before the options are parsed.

Skipped (counted, reported; raised in strict mode): missing or unreadable image, no options or fewer than two, a label
that is not one of the option letters, a malformed box (the row is kept without that box; counted as a note).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from klal.data.bench_io import benchmark_record, read_json_object, read_json_rows, row_image
from klal.data.io import (
    Conversion,
    ConversionReport,
    ImageResolver,
    SkipRecord,
    build_dataset_dict,
    converter_main,
    load_source,
    source_dir,
)
from klal.data.refcoco import xywh_to_xyxy
from klal.data.schema import Evidence, parse_box
from klal.eval.benchmark_scores import LETTERS

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
_OPTION_RE = re.compile(r"\(([A-H])\)\s*(.+?)(?=\s*\([A-H]\)|$)", re.S)
_INSTRUCTION_RE = re.compile(r"\s*Answer with the option'?s letter.*$", re.S | re.I)


def parse_options(text: str) -> tuple[str, list[str]]:
    """``(question, options)`` from a V* ``text``: the question before ``(A)``, the options in letter order."""
    text = _INSTRUCTION_RE.sub("", text).strip()
    head, sep, _ = text.partition("(A)")
    options = [o.strip() for _, o in _OPTION_RE.findall(text)] if sep else []
    return head.strip(), options


def render_question(question: str, options: Sequence[str]) -> str:
    """The prompt as lmms-eval's ``vstar_bench`` builds it (module docstring)."""
    lines = [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)]
    return question + "\n" + "\n".join(lines) + POST_PROMPT


def _boxes(value: Any, rec_id: str, report: ConversionReport, w: int, h: int) -> list[list[float]]:
    out = []
    for k, b in enumerate(value or []):
        try:
            x0, y0, x1, y1 = parse_box(xywh_to_xyxy(b, f"bbox[{k}]"), f"bbox[{k}]")
        except ValueError:
            report.note("malformed target box dropped", rec_id)
            continue
        box = [max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)]
        if box[2] > box[0] and box[3] > box[1]:
            out.append(box)
        else:
            report.note("target box outside the image dropped", rec_id)
    return out


def _annotation(image_path: str | None) -> dict[str, Any]:
    """The per-image JSON beside an image of the authors' layout ({} when there is none)."""
    ann = os.path.splitext(image_path)[0] + ".json" if image_path else ""
    return read_json_object(ann) if ann and os.path.isfile(ann) else {}


def _folder_rows(root: str) -> list[dict[str, Any]]:
    """Rows of the authors' folder without ``test_questions.jsonl``: one per annotation JSON, options shuffled."""
    rows = []
    for category in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        folder = os.path.join(root, category)
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".json")):
            ann = read_json_object(os.path.join(folder, name))
            stem = os.path.splitext(name)[0]
            image = next((f for f in sorted(os.listdir(folder)) if f.startswith(stem + ".") and f != name), None)
            options = list(ann.get("options") or [])
            # The annotation lists the correct option first: order by a hash of (name, option) so the letter varies.
            order = sorted(range(len(options)), key=lambda k: hashlib.sha256(f"{name}:{k}".encode()).hexdigest())
            text = (
                str(ann.get("question", ""))
                + "\n"
                + "\n".join(f"({LETTERS[j]}) {options[k]}" for j, k in enumerate(order))
            )
            rows.append(
                {
                    "image": f"{category}/{image}" if image else None,
                    "text": text,
                    "category": category,
                    "question_id": f"{category}/{stem}",
                    "label": LETTERS[order.index(0)] if options else "",
                }
            )
    return rows


def convert_vstar_rows(
    rows_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    source_name: str = "vstar",
    image_dirs: Sequence[str | None] = (),
    verify_images: bool = False,
    strict: bool = False,
    task: str = "vstar",
) -> Conversion:
    """Convert V* rows (module docstring) into the klal schema; every row lands in the ``test`` split.

    Args:
        rows_by_split: source split -> rows.
        source_name: name used in the report and messages.
        image_dirs: directories searched for image files (the authors' folder itself for its layout).
        verify_images: fully decode-check every image.
        strict: raise :class:`~klal.data.io.RecordError` on the first bad record instead of skipping it.
        task: the ``task`` column and id prefix.
    """
    report = ConversionReport(source_name, strict=strict)
    resolver = ImageResolver(image_dirs, verify=verify_images)
    out: dict[str, list[dict[str, Any]]] = {}
    for rows in rows_by_split.values():
        for idx, row in enumerate(rows):
            qid = row.get("question_id", idx)
            rec_id = f"{task}-{qid}"
            try:
                question, options = parse_options(str(row.get("text") or ""))
                if len(options) < 2:
                    raise SkipRecord("fewer than two options", repr(str(row.get("text"))[:60]))
                label = str(row.get("label") or "").strip().upper()
                if label not in LETTERS[: len(options)]:
                    raise SkipRecord("label is not an option letter", f"{label!r} for {len(options)} options")
                image = row_image(row, resolver, ("image_path", "file_name"))
            except SkipRecord as s:
                report.skip(s.reason, rec_id, s.detail)
                continue
            ann = _annotation(image.stored.get("path"))
            boxes = _boxes(row.get("bbox", ann.get("bbox")), rec_id, report, image.width, image.height)
            if not boxes:
                report.note("no target boxes (no evidence)", rec_id)
            meta = {
                "source": source_name,
                "category": row.get("category") or "",
                "question_id": qid,
                "options": options,
                "label": label,
                "target_object": list(ann.get("target_object") or row.get("target_object") or []),
            }
            out.setdefault("test", []).append(
                benchmark_record(
                    id=rec_id,
                    task=task,
                    image=image,
                    question=render_question(question, options),
                    answer=label,
                    evidence=Evidence(boxes=boxes),
                    benchmark="vstar",
                    meta=meta,
                )
            )
            report.keep("test")
    report.log()
    return Conversion(build_dataset_dict(out), report)


def convert_vstar(source: str, *, image_dir: str | None = None, out: str | None = None, **kwargs: Any) -> Conversion:
    """Convert V* Bench from the authors' folder or flat records (module docstring) into the klal schema.

    Args:
        source: the authors' folder (with ``test_questions.jsonl`` or category folders of image + JSON), or a
            flat-record source (saved dataset, parquet/jsonl file or directory, hub name such as
            ``lmms-lab/vstar-bench``).
        image_dir: where relative image paths are resolved, besides the source's own directory.
        out: also save the converted dataset here (``save_to_disk``; None: only return it).
        **kwargs: the other options of :func:`convert_vstar_rows` (``strict``, ``task``, ...).
    """
    path = os.path.expanduser(source)
    questions = os.path.join(path, "test_questions.jsonl")
    if os.path.isfile(questions):
        rows: dict[str, Any] = {"test": read_json_rows(questions)}
    elif os.path.isdir(path) and any(
        f.endswith(".json")
        for d in os.listdir(path)
        if os.path.isdir(os.path.join(path, d))
        for f in os.listdir(os.path.join(path, d))
    ):
        rows = {"test": _folder_rows(path)}
    else:
        rows = load_source(source)
    return convert_vstar_rows(rows, source_name=source, image_dirs=[image_dir, source_dir(source)], **kwargs).written(
        out
    )


main = converter_main(convert_vstar, "python -m klal.data.vstar")

if __name__ == "__main__":
    main()
