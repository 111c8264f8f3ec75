"""TextVQA -> the klal schema: one row per question, the ten human answers kept, OCR boxes as evidence where known.

Layouts read:

* the authors' annotation file (``TextVQA_0.5.1_{train,val,test}.json``: ``{"data": [...]}`` with ``question``,
  ``question_id``, ``image_id``, ``image_width``, ``image_height``, ``answers`` (ten strings; absent in test),
  ``set_name``, ...), images ``<image_id>.jpg`` in ``image_dir`` (``train_images/``), and optionally the Rosetta OCR
  file (``ocr_file``: ``TextVQA_Rosetta_OCR_v0.2_*.json``, ``{"data": [{"image_id", "ocr_info": [{"word",
  "bounding_box": {"top_left_x", "top_left_y", "width", "height", ...}}]}]}``, coordinates as fractions 0-1 of the
  image size);
* flat records (``lmms-lab/textvqa`` / ``facebook/textvqa``: ``image``, ``question``, ``question_id``, ``image_id``,
  ``answers``, ``ocr_tokens``, ``set_name``, ...), from a saved dataset, parquet/jsonl or a hub name; an inline
  ``ocr_info`` column (as above) is read too.

Text, as lmms-eval's ``textvqa`` task renders it: ``question.capitalize()`` then ``"\\nAnswer the question using a
single word or phrase."``; answer = the most frequent of the ten answers after VQA normalisation (what a model is
taught; scoring uses all ten, :func:`klal.eval.benchmark_scores.vqa_soft_accuracy`). ``meta["answers"]`` keeps the ten.

Evidence (``ocr_evidence``): ``answer`` (default) = the boxes of the OCR tokens whose normalised word is a word of a
normalised human answer (the text the answer is read from); ``all`` = every OCR box; ``none``. Rows without OCR boxes,
or none matching, have no evidence (counted as a note).

Splits: ``set_name`` (``train``/``val``/``test``) or the source split. Skipped (counted; raised in strict mode): missing
or unreadable image, no human answers (the test split), empty question.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from klal.data.bench_io import benchmark_record, local_json, read_json_rows, row_image
from klal.data.io import (
    Conversion,
    ConversionReport,
    ImageResolver,
    SkipRecord,
    build_dataset_dict,
    canonical_split,
    converter_main,
    load_source,
    source_dir,
)
from klal.data.schema import Evidence
from klal.eval.benchmark_scores import majority_answer, vqa_normalize

POST_PROMPT = "\nAnswer the question using a single word or phrase."


def ocr_boxes(ocr_info: Any, w: int, h: int) -> list[tuple[str, list[float]]]:
    """``[(word, [x0, y0, x1, y1]), ...]`` in pixels from Rosetta ``ocr_info`` (fractions of the image size; a box
    whose numbers exceed 1 is read as pixels). Malformed entries are left out."""
    out = []
    for tok in ocr_info or []:
        bb = tok.get("bounding_box") if isinstance(tok, Mapping) else None
        if not isinstance(bb, Mapping):
            continue
        try:
            x, y = float(bb["top_left_x"]), float(bb["top_left_y"])
            bw, bh = float(bb["width"]), float(bb["height"])
        except (KeyError, TypeError, ValueError):
            continue
        scale_x, scale_y = (w, h) if max(x + bw, y + bh) <= 1.0 + 1e-6 else (1.0, 1.0)
        box = [max(0.0, x * scale_x), max(0.0, y * scale_y), min(w, (x + bw) * scale_x), min(h, (y + bh) * scale_y)]
        if box[2] > box[0] and box[3] > box[1]:
            out.append((str(tok.get("word", "")), box))
    return out


def answer_evidence(tokens: Sequence[tuple[str, list[float]]], answers: Sequence[str], mode: str) -> list[list[float]]:
    """The OCR boxes kept as evidence (module docstring, ``ocr_evidence``)."""
    if mode == "none":
        return []
    if mode == "all":
        return [b for _, b in tokens]
    words = {w for a in answers for w in vqa_normalize(a).split()}
    return [b for word, b in tokens if vqa_normalize(word) and set(vqa_normalize(word).split()) <= words]


def convert_textvqa_rows(
    rows_by_split: Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    source_name: str = "textvqa",
    image_dirs: Sequence[str | None] = (),
    ocr: Mapping[Any, Any] | None = None,
    ocr_evidence: Literal["answer", "all", "none"] = "answer",
    splits: Sequence[str] | None = None,
    verify_images: bool = False,
    strict: bool = False,
    task: str = "textvqa",
) -> Conversion:
    """Convert TextVQA rows (module docstring) into the klal schema.

    Args:
        rows_by_split: source split -> rows.
        source_name: name used in the report and messages.
        image_dirs: directories searched for ``<image_id>.jpg`` and image paths.
        ocr: ``image_id -> ocr_info`` from a Rosetta OCR file (rows' own ``ocr_info`` win).
        ocr_evidence: which OCR boxes become evidence: ``answer``, ``all`` or ``none``.
        splits: keep only these output splits (None: all).
        verify_images: fully decode-check every image.
        strict: raise :class:`~klal.data.io.RecordError` on the first bad record instead of skipping it.
        task: the ``task`` column and id prefix.
    """
    if ocr_evidence not in ("answer", "all", "none"):
        raise ValueError(f"ocr_evidence must be 'answer', 'all' or 'none', got {ocr_evidence!r}")
    report = ConversionReport(source_name, strict=strict)
    resolver = ImageResolver(image_dirs, verify=verify_images)
    keep = None if splits is None else {canonical_split(s) for s in splits}
    out: dict[str, list[dict[str, Any]]] = {}
    for source_split, rows in rows_by_split.items():
        for idx, row in enumerate(rows):
            split = canonical_split(str(row.get("set_name") or source_split))
            if keep is not None and split not in keep:
                continue
            qid = row.get("question_id", f"{source_split}-{idx}")
            rec_id = f"{task}-{qid}"
            try:
                question = str(row.get("question") or "").strip()
                if not question:
                    raise SkipRecord("empty question")
                answers = [str(a) for a in (row.get("answers") or []) if a is not None and str(a).strip()]
                if not answers:
                    raise SkipRecord("no human answers")
                image_id = row.get("image_id")
                names = [f"{image_id}.jpg", f"{image_id}.png"] if image_id else []
                image = row_image({**row, "image_file": names[0] if names else None}, resolver, ("image_file",))
            except SkipRecord as s:
                report.skip(s.reason, rec_id, s.detail)
                continue
            info = row.get("ocr_info") or (ocr or {}).get(image_id)
            tokens = ocr_boxes(info, image.width, image.height)
            boxes = answer_evidence(tokens, answers, ocr_evidence)
            if not boxes:
                report.note("no OCR box as evidence", rec_id)
            meta = {
                "source": source_name,
                "question_id": qid,
                "image_id": image_id,
                "answers": answers,
                "ocr_tokens": list(row.get("ocr_tokens") or [w for w, _ in tokens]),
                "ocr_evidence": ocr_evidence,
            }
            out.setdefault(split, []).append(
                benchmark_record(
                    id=rec_id,
                    task=task,
                    image=image,
                    question=question.capitalize() + POST_PROMPT,
                    answer=majority_answer(answers),
                    evidence=Evidence(boxes=boxes),
                    benchmark="textvqa",
                    meta=meta,
                )
            )
            report.keep(split)
    report.log()
    return Conversion(build_dataset_dict(out), report)


def read_ocr_file(path: str) -> dict[Any, Any]:
    """``image_id -> ocr_info`` from a Rosetta OCR file."""
    return {r.get("image_id"): r.get("ocr_info") for r in read_json_rows(path)}


def convert_textvqa(
    source: str,
    *,
    image_dir: str | None = None,
    ocr_file: str | None = None,
    out: str | None = None,
    splits: list[str] | None = None,
    **kwargs: Any,
) -> Conversion:
    """Convert TextVQA from the authors' annotation file or flat records (module docstring) into the klal schema.

    Args:
        source: ``TextVQA_0.5.1_<split>.json`` (with ``image_dir``), or a flat-record source (saved dataset,
            parquet/jsonl file or directory, hub name such as ``lmms-lab/textvqa``).
        image_dir: the images (``train_images/``: ``<image_id>.jpg``), besides the source's directory.
        ocr_file: a Rosetta OCR file whose boxes become evidence (``ocr_evidence``).
        out: also save the converted dataset here (``save_to_disk``; None: only return it).
        splits: keep only these output splits (None: all).
        **kwargs: the other options of :func:`convert_textvqa_rows` (``ocr_evidence``, ``strict``, ...).
    """
    if ocr_file is not None and not os.path.isfile(os.path.expanduser(ocr_file)):
        raise FileNotFoundError(f"ocr_file {ocr_file}: no such file")
    ocr = read_ocr_file(os.path.expanduser(ocr_file)) if ocr_file else None
    path = local_json(source)
    rows = {"train": read_json_rows(path)} if path else load_source(source)
    return convert_textvqa_rows(
        rows, source_name=source, image_dirs=[image_dir, source_dir(source)], ocr=ocr, splits=splits, **kwargs
    ).written(out)


main = converter_main(convert_textvqa, "python -m klal.data.textvqa")

if __name__ == "__main__":
    main()
