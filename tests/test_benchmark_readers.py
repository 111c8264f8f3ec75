"""The benchmark readers on fixtures in each benchmark's public layout (tests/bench_data.py)."""

from __future__ import annotations

import json

import datasets
import pytest

from klal.data.io import RecordError
from klal.data.pope import convert_pope
from klal.data.refcoco import convert_refcoco
from klal.data.textvqa import convert_textvqa
from klal.data.vstar import convert_vstar
from tests.bench_layouts import (
    make_pope_authors,
    make_pope_parquet,
    make_refcoco_parquet,
    make_textvqa_authors,
    make_textvqa_parquet,
    make_vstar_folder,
    make_vstar_parquet,
)

POST_MC = "\nAnswer with the option's letter from the given choices directly."
POST_SHORT = "\nAnswer the question using a single word or phrase."


def _rows(conv, split: str) -> list[dict]:
    return [
        dict(r, meta=json.loads(r["meta"])) for r in conv.dataset[split].cast_column("image", datasets.Image(False))
    ]


def test_vstar_authors_folder(tmp_path) -> None:
    conv = convert_vstar(str(make_vstar_folder(tmp_path / "vstar_bench")))
    rows = _rows(conv, "test")
    assert [r["id"] for r in rows] == ["vstar-0", "vstar-1", "vstar-2"]
    first = rows[0]
    assert first["question"] == "What is the color of the cup?\nA. red\nB. blue\nC. green\nD. white" + POST_MC
    assert first["answer"] == "B" and first["task"] == "vstar"
    assert first["evidence"]["boxes"] == [[20.0, 30.0, 60.0, 60.0]]  # COCO [x, y, w, h] -> [x0, y0, x1, y1]
    assert first["meta"]["options"] == ["red", "blue", "green", "white"] and first["meta"]["target_object"] == ["cup"]
    assert first["meta"]["benchmark"] == "vstar" and first["meta"]["category"] == "direct_attributes"
    two = rows[2]
    assert two["question"].endswith("A. left\nB. right" + POST_MC) and len(two["evidence"]["boxes"]) == 2
    assert conv.report.total_skipped == 0


def test_vstar_folder_without_question_file_orders_options_by_hash(tmp_path) -> None:
    root = make_vstar_folder(tmp_path / "vstar_bench")
    (root / "test_questions.jsonl").unlink()
    rows = _rows(convert_vstar(str(root)), "test")
    again = _rows(convert_vstar(str(root)), "test")
    assert [r["answer"] for r in rows] == [r["answer"] for r in again]  # deterministic
    by_q = {r["meta"]["question_id"]: r for r in rows}
    cup = by_q["direct_attributes/sa_1"]
    # The annotation lists "blue" (the correct option) first; the recorded letter points at it wherever it lands.
    assert cup["meta"]["options"]["ABCD".index(cup["answer"])] == "blue"
    assert sorted(cup["meta"]["options"]) == ["blue", "green", "red", "white"]
    assert cup["evidence"]["boxes"] == [[20.0, 30.0, 60.0, 60.0]]


def test_vstar_lmms_lab_parquet_has_no_boxes(tmp_path) -> None:
    conv = convert_vstar(str(make_vstar_parquet(tmp_path / "vp")))
    (row,) = _rows(conv, "test")
    assert row["answer"] == "C" and row["evidence"]["boxes"] == [] and row["width"] == 224
    assert conv.report.notes["no target boxes (no evidence)"] == 1


def test_vstar_bad_label_is_skipped_counted_or_raised(tmp_path) -> None:
    root = make_vstar_folder(tmp_path / "vstar_bench")
    lines = (root / "test_questions.jsonl").read_text().splitlines()
    bad = json.loads(lines[0]) | {"label": "E"}
    (root / "test_questions.jsonl").write_text("\n".join([json.dumps(bad), *lines[1:]]))
    conv = convert_vstar(str(root))
    assert conv.report.skipped["label is not an option letter"] == 1 and conv.report.total_kept == 2
    with pytest.raises(RecordError, match=r"record vstar-0: label is not an option letter"):
        convert_vstar(str(root), strict=True)


def test_textvqa_authors_files_with_ocr_boxes(tmp_path) -> None:
    root = make_textvqa_authors(tmp_path / "textvqa")
    conv = convert_textvqa(
        str(root / "TextVQA_0.5.1_val.json"),
        image_dir=str(root / "train_images"),
        ocr_file=str(root / "TextVQA_Rosetta_OCR_v0.2_val.json"),
    )
    rows = _rows(conv, "validation")
    a, b, c = rows
    assert a["question"] == "What brand is the drink?" + POST_SHORT and a["answer"] == "coca cola"
    assert len(a["meta"]["answers"]) == 10 and a["id"] == "textvqa-100"
    # OCR fractions of the 224 x 168 image; "coca" and "cola" are answer words, "sale" is not.
    want = [22.4, 33.6, 67.2, 50.4, 78.4, 33.6, 123.2, 50.4]
    assert [v for b in a["evidence"]["boxes"] for v in b] == pytest.approx(want, abs=1e-4)
    assert b["answer"] == "23" and len(b["evidence"]["boxes"]) == 1
    assert c["evidence"]["boxes"] == [] and conv.report.notes["no OCR box as evidence"] == 1
    every = convert_textvqa(
        str(root / "TextVQA_0.5.1_val.json"),
        image_dir=str(root / "train_images"),
        ocr_file=str(root / "TextVQA_Rosetta_OCR_v0.2_val.json"),
        ocr_evidence="all",
    )
    assert len(_rows(every, "validation")[0]["evidence"]["boxes"]) == 3


def test_textvqa_lmms_lab_parquet(tmp_path) -> None:
    conv = convert_textvqa(str(make_textvqa_parquet(tmp_path / "tp")))
    (row,) = _rows(conv, "validation")
    assert row["answer"] == "tea" and row["meta"]["ocr_tokens"] == ["tea"] and row["evidence"]["boxes"] == []


def test_textvqa_test_split_without_answers_is_skipped(tmp_path) -> None:
    root = make_textvqa_authors(tmp_path / "textvqa")
    data = json.loads((root / "TextVQA_0.5.1_val.json").read_text())
    data["data"][0].pop("answers")
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    conv = convert_textvqa(str(root / "TextVQA_0.5.1_val.json"), image_dir=str(root / "train_images"))
    assert conv.report.skipped["no human answers"] == 1 and conv.report.total_kept == 2


def test_pope_authors_files_and_categories(tmp_path) -> None:
    root = make_pope_authors(tmp_path / "pope")
    conv = convert_pope(str(root), image_dir=str(root / "val2014"))
    rows = _rows(conv, "test")
    assert len(rows) == 6 and {r["meta"]["category"] for r in rows} == {"adversarial", "popular", "random"}
    first = rows[0]
    assert first["id"] == "pope-adversarial-1" and first["answer"] == "yes"
    assert first["question"] == "Is there a dog in the image?" + POST_SHORT and first["evidence"]["boxes"] == []
    only = convert_pope(str(root / "coco_pope_random.json"), image_dir=str(root / "val2014"))
    assert {r["meta"]["category"] for r in _rows(only, "test")} == {"random"}
    with pytest.raises(ValueError, match="unknown POPE split"):
        convert_pope(str(root), image_dir=str(root / "val2014"), categories=["hard"])


def test_pope_lmms_lab_parquet(tmp_path) -> None:
    rows = _rows(convert_pope(str(make_pope_parquet(tmp_path / "pp"))), "test")
    assert [(r["meta"]["category"], r["answer"]) for r in rows] == [("adversarial", "yes"), ("random", "no")]


def test_pope_missing_images_are_counted(tmp_path) -> None:
    root = make_pope_authors(tmp_path / "pope")
    conv = convert_pope(str(root / "coco_pope_popular.json"), image_dir=str(tmp_path))  # wrong image folder
    assert conv.report.skipped["missing image file"] == 2 and conv.report.total_kept == 0
    with pytest.raises(ValueError, match="nothing written"):
        conv.save(tmp_path / "out")


def test_refcoco_lmms_lab_parquet(tmp_path) -> None:
    rows = _rows(convert_refcoco(str(make_refcoco_parquet(tmp_path / "ref"))), "validation")
    assert rows[0]["evidence"]["boxes"] == [[20.0, 30.0, 100.0, 90.0]]
    assert rows[0]["question"] == "Where is the object number 0? Answer with the bounding box."


def test_converter_command_one_line_error(tmp_path, capsys) -> None:
    from klal.data.vstar import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere.parquet")], prog="vstar")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere.parquet" in err[0]
    main([str(make_vstar_folder(tmp_path / "vb")), "--out", str(tmp_path / "klal_vstar")], prog="vstar")
    assert "kept 3 (test 3)" in capsys.readouterr().out
    assert datasets.load_from_disk(str(tmp_path / "klal_vstar"))["test"].num_rows == 3
    # The same through the klal command.
    from klal.__main__ import main as klal_main

    pope = make_pope_authors(tmp_path / "pope")
    assert klal_main(["convert-pope", str(pope), "--image_dir", str(pope / "val2014")]) == 0
    assert "kept 6 (test 6)" in capsys.readouterr().out
