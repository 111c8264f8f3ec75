"""POPE -> the klal schema: one row per yes/no object-existence question, its split (adversarial, popular, random)
kept as ``meta["category"]``.

Layouts read:

* the authors' files (``RUCAIBox/POPE``, ``output/coco/coco_pope_{adversarial,popular,random}.json``: JSON lines
  ``{"question_id", "image", "text", "label"}``), images (``COCO_val2014_*.jpg``) in ``image_dir``; the split comes from
  the file name. ``source`` is one such file or a folder of them;
* flat records (``lmms-lab/POPE``: ``id``, ``question_id``, ``question``, ``answer``, ``image_source``, ``image``,
  ``category``; configs ``default`` (split ``test``) and ``Full`` (splits ``adversarial``, ``popular``, ``random``)),
  from a saved dataset, parquet/jsonl or a hub name. A row without ``category`` takes its split's name when it is one.

Every row lands in the ``test`` split (``task`` ``pope``); the scores are reported per category and overall
(:mod:`klal.eval.benchmarks`). Text, as lmms-eval's ``pope`` task renders it: the question then ``"\\nAnswer the
question using a single word or phrase."``; answer ``yes`` or ``no``. POPE has no boxes: rows have no evidence.

Skipped (counted; raised in strict mode): missing or unreadable image, a label other than yes/no, empty question.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from klal.data.bench_io import benchmark_record, read_json_rows, row_image
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
from klal.data.schema import Evidence

POST_PROMPT = "\nAnswer the question using a single word or phrase."
CATEGORIES = ("adversarial", "popular", "random")
_FILE_RE = re.compile(r"pope_(adversarial|popular|random)\.jsonl?$")


def convert_pope_rows(
    rows_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    source_name: str = "pope",
    image_dirs: Sequence[str | None] = (),
    categories: Sequence[str] | None = None,
    verify_images: bool = False,
    strict: bool = False,
    task: str = "pope",
) -> Conversion:
    """Convert POPE rows (module docstring) into the klal schema.

    Args:
        rows_by_split: source split (or, for the authors' files, category) -> rows.
        source_name: name used in the report and messages.
        image_dirs: directories searched for the COCO images.
        categories: keep only these POPE splits (None: all).
        verify_images: fully decode-check every image.
        strict: raise :class:`~klal.data.io.RecordError` on the first bad record instead of skipping it.
        task: the ``task`` column and id prefix.
    """
    bad = sorted(set(categories or ()) - set(CATEGORIES))
    if bad:
        raise ValueError(f"categories: unknown POPE split(s) {bad}; POPE has {list(CATEGORIES)}")
    report = ConversionReport(source_name, strict=strict)
    resolver = ImageResolver(image_dirs, verify=verify_images)
    out: dict[str, list[dict[str, Any]]] = {}
    for source_split, rows in rows_by_split.items():
        for idx, row in enumerate(rows):
            category = str(row.get("category") or (source_split if source_split in CATEGORIES else "")).strip()
            if categories is not None and category not in categories:
                continue
            qid = row.get("question_id", idx)
            rec_id = f"{task}-{category or source_split}-{qid}"
            try:
                question = str(row.get("question") or row.get("text") or "").strip()
                if not question:
                    raise SkipRecord("empty question")
                label = str(row.get("answer") or row.get("label") or "").strip().lower()
                if label not in ("yes", "no"):
                    raise SkipRecord("label is not yes/no", repr(label))
                source = row.get("image_source")
                image = row_image(
                    {**row, "image_source_file": f"{source}.jpg" if source else None},
                    resolver,
                    ("image_path", "file_name", "image_source_file"),
                )
            except SkipRecord as s:
                report.skip(s.reason, rec_id, s.detail)
                continue
            meta = {"source": source_name, "category": category, "question_id": qid, "image_source": source}
            out.setdefault("test", []).append(
                benchmark_record(
                    id=rec_id,
                    task=task,
                    image=image,
                    question=question + POST_PROMPT,
                    answer=label,
                    evidence=Evidence(),
                    benchmark="pope",
                    meta=meta,
                )
            )
            report.keep("test")
    report.log()
    return Conversion(build_dataset_dict(out), report)


def _author_files(source: str) -> dict[str, str] | None:
    """``category -> file`` when ``source`` is one of the authors' files or a folder of them, else None."""
    path = os.path.expanduser(source)
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(glob.escape(path), "*pope_*.json*")))
    found = {m.group(1): f for f in files if (m := _FILE_RE.search(os.path.basename(f)))}
    return found or None


def convert_pope(
    source: str,
    *,
    image_dir: str | None = None,
    out: str | None = None,
    categories: list[str] | None = None,
    **kwargs: Any,
) -> Conversion:
    """Convert POPE from the authors' files or flat records (module docstring) into the klal schema.

    Args:
        source: ``coco_pope_<split>.json`` or a folder of them (with ``image_dir``), or a flat-record source (saved
            dataset, parquet/jsonl file or directory, hub name such as ``lmms-lab/POPE``).
        image_dir: the COCO val2014 images, besides the source's directory.
        out: also save the converted dataset here (``save_to_disk``; None: only return it).
        categories: keep only these POPE splits (None: all three).
        **kwargs: the other options of :func:`convert_pope_rows` (``strict``, ``task``, ...).
    """
    files = _author_files(source)
    rows = {c: read_json_rows(f) for c, f in files.items()} if files else load_source(source)
    return convert_pope_rows(
        rows, source_name=source, image_dirs=[image_dir, source_dir(source)], categories=categories, **kwargs
    ).written(out)


main = converter_main(convert_pope, "python -m klal.data.pope")

if __name__ == "__main__":
    main()
