"""RefCOCO and PixMo-Points loaders on tiny fixtures in each upstream layout (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import datasets
import numpy as np
import pytest
from PIL import Image

from klal.data import io as kio
from klal.data.io import RecordError, load_source
from klal.data.pixmo import convert_pixmo_points, url_hash
from klal.data.refcoco import classic_refcoco_rows, convert_refcoco
from klal.data.schema import REQUIRED_COLUMNS, Evidence
from klal.data.targets import build_target_map
from klal.geometry import DEFAULT_MAX_PIXELS
from klal.models.qwen2_vl.geometry import smart_resize_hw


def save_image(path, w: int, h: int, fmt: str | None = None, seed: int = 0) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    with open(path, "rb") as f:
        return f.read()


def rows_of(ds: datasets.Dataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# -- RefCOCO, classic layout -------------------------------------------------------------------------------------------


@pytest.fixture
def classic(tmp_path):
    root = tmp_path / "refcoco"
    imgs = root / "images" / "train2014"
    save_image(str(imgs / "COCO_train2014_000000000001.jpg"), 100, 80, "JPEG")
    save_image(str(imgs / "COCO_train2014_000000000002.jpg"), 60, 50, "JPEG")
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 60, "height": 50},
            {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [10, 20, 30, 40], "category_id": 1},
            {"id": 12, "image_id": 1, "bbox": [50, 5, 60, 30], "category_id": 2},  # x + w = 110 > 100: clipped
            {"id": 21, "image_id": 2, "bbox": [5, 5, 0, 10], "category_id": 1},  # zero width: malformed
            {"id": 31, "image_id": 3, "bbox": [1, 1, 5, 5], "category_id": 1},  # image file missing
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    (root / "instances.json").write_text(json.dumps(instances))

    def sent(text, sid):
        return {"sent": text, "raw": text.capitalize(), "sent_id": sid, "tokens": text.split()}

    refs = [
        {
            "ref_id": 0,
            "ann_id": 11,
            "image_id": 1,
            "split": "train",
            "sentences": [sent("man in red", 100), sent("left guy", 101)],
            "file_name": "COCO_train2014_000000000001_11.jpg",
            "category_id": 1,
            "sent_ids": [100, 101],
        },
        {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "val", "sentences": [sent("dog", 102)], "category_id": 2},
        {"ref_id": 2, "ann_id": 21, "image_id": 2, "split": "testA", "sentences": [sent("cat", 103)]},
        {"ref_id": 3, "ann_id": 31, "image_id": 3, "split": "testB", "sentences": [sent("car", 104), sent("x", 105)]},
    ]
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root


def test_classic_refcoco_rows_and_counts(classic):
    conv = convert_refcoco(str(classic))
    ds, rep = conv.dataset, conv.report
    assert list(ds.keys()) == ["train", "validation"]  # testA/testB rows were all skipped
    assert set(REQUIRED_COLUMNS) <= set(ds["train"].column_names)
    train = rows_of(ds["train"])
    assert [r["id"] for r in train] == ["refcoco-0-100", "refcoco-0-101"]
    r = train[0]
    assert r["question"] == "Where is man in red? Answer with the bounding box."
    assert r["answer"] == "[10, 20, 40, 60]"  # COCO [10, 20, 30, 40] xywh -> xyxy
    assert r["evidence"]["boxes"] == [[10.0, 20.0, 40.0, 60.0]]
    assert (r["width"], r["height"]) == (100, 80)
    assert r["image"].size == (100, 80)
    meta = json.loads(r["meta"])
    assert meta["category"] == "person" and meta["ann_id"] == 11 and meta["split"] == "train"
    val = rows_of(ds["validation"])
    assert len(val) == 1 and val[0]["evidence"]["boxes"] == [[50.0, 5.0, 100.0, 35.0]]  # clipped at x = 100
    assert val[0]["answer"] == "[50, 5, 100, 35]"
    assert rep.kept == {"train": 2, "validation": 1}
    assert rep.skipped == {"malformed box": 1, "missing image file": 2}
    assert rep.notes == {"box clipped to the image": 1}
    assert "skipped 3" in rep.summary() and "missing image file: 2" in rep.summary()


def test_classic_refcoco_strict_names_the_record(classic):
    with pytest.raises(RecordError, match=r"record refcoco-2: malformed box"):
        convert_refcoco(str(classic), strict=True)


def test_classic_refcoco_raw_sentences_and_split_filter(classic):
    ds = convert_refcoco(str(classic), sentence_field="raw", splits=["train"]).dataset
    assert list(ds.keys()) == ["train"]
    assert ds["train"][0]["question"] == "Where is Man in red? Answer with the bounding box."


def test_classic_adapter_reads_the_pickle(classic):
    rows = classic_refcoco_rows(str(classic / "refs(unc).p"), str(classic / "instances.json"))
    assert sorted(rows) == ["testA", "testB", "train", "val"]
    assert rows["train"][0]["bbox"] == [10, 20, 30, 40]
    assert rows["train"][0]["category"] == "person"


def test_classic_refcoco_needs_split_by_with_several_refs_files(classic):
    (classic / "refs(google).p").write_bytes((classic / "refs(unc).p").read_bytes())
    with pytest.raises(ValueError, match="split_by"):
        convert_refcoco(str(classic))
    assert convert_refcoco(str(classic), split_by="google").report.total_kept == 3
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        convert_refcoco(str(classic), split_by="umd")


def test_classic_refcoco_missing_image_dir_is_named(classic, tmp_path):
    os.rename(classic / "images", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="image_dir"):
        convert_refcoco(str(classic))
    conv = convert_refcoco(str(classic), image_dir=str(tmp_path / "elsewhere" / "train2014"))
    assert conv.report.total_kept == 3


def test_saved_refcoco_round_trips_to_a_target_map(classic, tmp_path):
    convert_refcoco(str(classic)).dataset.save_to_disk(str(tmp_path / "out"))
    row = datasets.load_from_disk(str(tmp_path / "out"))["train"][0]
    assert row["image"].size == (100, 80)  # image bytes were embedded on save
    processed = smart_resize_hw(row["height"], row["width"])
    grid = (processed[0] // 28, processed[1] // 28)
    m = build_target_map(Evidence.from_dict(row["evidence"]), (row["height"], row["width"]), grid)
    assert m is not None and m.shape == grid


# -- RefCOCO, flat records ---------------------------------------------------------------------------------------------


@pytest.fixture
def flat_images(tmp_path):
    d = tmp_path / "coco"
    save_image(str(d / "COCO_train2014_000000000001.jpg"), 100, 80, "JPEG")
    save_image(str(d / "b.png"), 40, 30)
    return d


def test_flat_refcoco_jsonl(flat_images, tmp_path):
    rows = [
        {  # jxu124-style: refs-style file name with an annotation suffix, sentence dicts, split column
            "file_name": "COCO_train2014_000000000001_11.jpg",
            "bbox": [10, 20, 30, 40],
            "sentences": [{"raw": "Man", "sent": "man", "sent_id": 7}],
            "split": "val",
            "ref_id": 5,
            "ann_id": 11,
        },
        {"image_path": "b.png", "bbox": [0, 0, 20, 15], "answer": ["top left", "corner"], "split": "testB"},
        {"image_path": "nope.png", "bbox": [0, 0, 5, 5], "answer": ["gone"], "split": "train"},
        {"image_path": "b.png", "bbox": [0, 0, 5], "answer": ["bad"], "split": "train"},
        {"image_path": "b.png", "bbox": [100, 100, 5, 5], "answer": ["off"], "split": "train"},
        {"image_path": "b.png", "bbox": [1, 1, 5, 5], "answer": [""], "split": "train"},
    ]
    src = tmp_path / "refcoco.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    conv = convert_refcoco(str(src), image_dir=str(flat_images))
    ds, rep = conv.dataset, conv.report
    assert list(ds.keys()) == ["validation", "testB"]
    v = ds["validation"][0]
    assert v["id"] == "refcoco-5-7" and v["answer"] == "[10, 20, 40, 60]" and v["question"].startswith("Where is man?")
    assert [r["question"] for r in rows_of(ds["testB"])] == [
        "Where is top left? Answer with the bounding box.",
        "Where is corner? Answer with the bounding box.",
    ]
    assert ds["testB"][0]["evidence"]["boxes"] == [[0.0, 0.0, 20.0, 15.0]]
    assert rep.skipped == {
        "missing image file": 1,
        "malformed box": 1,
        "box outside the image": 1,
        "empty expression": 1,
    }


def test_flat_refcoco_parquet_with_inline_images_xyxy_and_resized_answers(tmp_path):
    png = save_image(str(tmp_path / "a.png"), 100, 80)
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "bbox": datasets.List(datasets.Value("float32")),
            "answer": datasets.List(datasets.Value("string")),
            "question_id": datasets.Value("int64"),
        }
    )
    ds = datasets.Dataset.from_list(
        [{"image": {"bytes": png, "path": None}, "bbox": [10, 20, 40, 60], "answer": ["the thing"], "question_id": 9}],
        features=feats,
    )
    os.makedirs(tmp_path / "pq")
    ds.to_parquet(str(tmp_path / "pq" / "validation-00000-of-00001.parquet"))  # image bytes inside, as on the hub
    os.remove(tmp_path / "a.png")
    conv = convert_refcoco(str(tmp_path / "pq"), bbox_format="xyxy", answer_coords="resized", answer="{x0},{y0}")
    (row,) = rows_of(conv.dataset["validation"])
    # 80 x 100 -> processed 84 x 112: x scale 1.12, y scale 1.05.
    assert smart_resize_hw(80, 100) == (84, 112)
    assert row["answer"] == f"{round(10 * 1.12)},{round(20 * 1.05)}"
    assert row["evidence"]["boxes"] == [[10.0, 20.0, 40.0, 60.0]]  # evidence stays in original pixels
    assert row["image"].size == (100, 80) and row["id"] == "refcoco-9-0"


def test_flat_refcoco_saved_dataset_dict(flat_images, tmp_path):
    dd = datasets.DatasetDict(
        {
            "val": datasets.Dataset.from_list([{"file_name": "b.png", "bbox": [1, 2, 3, 4], "captions": ["x"]}]),
            "testA": datasets.Dataset.from_list([{"file_name": "b.png", "bbox": [1, 2, 3, 4], "captions": ["y"]}]),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = convert_refcoco(str(tmp_path / "saved"), image_dir=str(flat_images)).dataset
    assert list(ds.keys()) == ["validation", "testA"]
    assert ds["testA"][0]["evidence"]["boxes"] == [[1.0, 2.0, 4.0, 6.0]]


def test_refcoco_template_errors_name_the_template(classic):
    with pytest.raises(ValueError, match=r"question template .*\{label\}.*unknown field"):
        convert_refcoco(str(classic), question="Where is {label}?")


# -- PixMo-Points ------------------------------------------------------------------------------------------------------


@pytest.fixture
def pixmo(tmp_path):
    imgs = tmp_path / "pixmo_images"
    a = save_image(str(imgs / "tmp_a.jpg"), 200, 100, "JPEG", seed=1)
    sha_a = hashlib.sha256(a).hexdigest()
    os.rename(imgs / "tmp_a.jpg", imgs / f"{sha_a}.jpg")  # looked up by image_sha256 + extension
    url_b = "https://example.org/pics/b.png?size=large"
    save_image(str(imgs / url_hash(url_b)), 50, 40, "PNG", seed=2)  # by sha256(url), no extension
    save_image(str(imgs / "c%20d.png"), 30, 30, seed=3)  # by URL basename
    rows = [
        {
            "image_url": "https://example.org/a.jpg",
            "image_sha256": sha_a,
            "label": "cat",
            "points": [{"x": 50.0, "y": 25.0}, {"x": 10.0, "y": 90.0}],
            "count": 2,
            "collection_method": "counting",
        },
        {"image_url": url_b, "image_sha256": "0" * 64, "label": "dog", "points": [{"x": 100.0, "y": 0.0}], "count": 3},
        {"image_url": "https://cdn.example.org/x/c%20d.png", "image_sha256": "1" * 64, "label": "sky", "points": []},
        {"image_url": "https://example.org/missing.jpg", "image_sha256": "2" * 64, "label": "car", "points": []},
        {"image_url": url_b, "image_sha256": "0" * 64, "label": "bad", "points": [{"x": 150.0, "y": 5.0}]},
        {"image_url": url_b, "image_sha256": "0" * 64, "label": "", "points": [{"x": 1.0, "y": 5.0}]},
    ]
    src = tmp_path / "pixmo.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    return src, imgs


def test_pixmo_count_mode_percent_to_pixels(pixmo):
    src, imgs = pixmo
    conv = convert_pixmo_points(str(src), image_dir=str(imgs))
    ds, rep = conv.dataset, conv.report
    assert list(ds.keys()) == ["train"]
    rows = rows_of(ds["train"])
    assert [r["question"] for r in rows] == [
        "How many cat are there?",
        "How many dog are there?",
        "How many sky are there?",
    ]
    assert [r["answer"] for r in rows] == ["2", "3", "0"]
    # 200 x 100 image: (50 %, 25 %) -> (100, 25) px; (10 %, 90 %) -> (20, 90) px.
    assert rows[0]["evidence"]["points"] == [[100.0, 25.0], [20.0, 90.0]]
    assert (rows[0]["width"], rows[0]["height"]) == (200, 100)
    # 50 x 40 image: (100 %, 0 %) -> (50, 0) px.
    assert rows[1]["evidence"]["points"] == [[50.0, 0.0]]
    assert rows[2]["evidence"]["points"] == [] and rows[2]["image"].size == (30, 30)
    assert json.loads(rows[0]["meta"])["collection_method"] == "counting"
    assert rep.kept == {"train": 3}
    assert rep.skipped == {"missing image file": 1, "malformed points": 1, "missing label": 1}
    assert rep.notes == {"count differs from the number of points": 1}


def test_pixmo_point_mode_answer_and_templates(pixmo):
    src, imgs = pixmo
    ds = convert_pixmo_points(str(src), image_dir=str(imgs), mode="point").dataset
    r = ds["train"][0]
    assert r["question"] == "Point to the cat."
    assert json.loads(r["answer"]) == [[100, 25], [20, 90]]
    ds = convert_pixmo_points(
        str(src), image_dir=str(imgs), question="Count: {label}", answer="{count} {label}"
    ).dataset
    assert ds["train"][0]["question"] == "Count: cat" and ds["train"][0]["answer"] == "2 cat"


def test_pixmo_strict_and_hash_check(pixmo):
    src, imgs = pixmo
    with pytest.raises(RecordError, match=r"record pixmo_points-train-3: missing image file"):
        convert_pixmo_points(str(src), image_dir=str(imgs), strict=True)
    rep = convert_pixmo_points(str(src), image_dir=str(imgs), verify_sha256=True).report
    # Only image a's annotated hash matches its bytes; the hash is checked before the points.
    assert rep.skipped == {"image hash mismatch": 3, "missing image file": 1, "missing label": 1}
    assert rep.kept == {"train": 1}


def test_pixmo_pixel_units(pixmo, tmp_path):
    _, imgs = pixmo
    src = tmp_path / "px.jsonl"
    url = "https://example.org/pics/b.png?size=large"
    src.write_text(json.dumps({"image_url": url, "label": "dog", "points": [[10, 20], [50, 40]]}))
    ds = convert_pixmo_points(str(src), image_dir=str(imgs), point_units="pixels").dataset
    assert ds["train"][0]["evidence"]["points"] == [[10.0, 20.0], [50.0, 40.0]]
    assert ds["train"][0]["answer"] == "2"
    src.write_text(json.dumps({"image_url": url, "label": "dog", "points": [[51, 20]]}))
    assert convert_pixmo_points(str(src), image_dir=str(imgs), point_units="pixels").report.skipped == {
        "malformed points": 1
    }


def test_pixmo_carved_splits_keep_images_together(tmp_path):
    imgs = tmp_path / "imgs"
    rows = []
    for i in range(40):
        save_image(str(imgs / f"img{i}.png"), 8, 8, seed=i)
        for label in ("a", "b"):
            rows.append({"image_url": f"http://h/img{i}.png", "label": label, "points": [{"x": 50, "y": 50}]})
    src = tmp_path / "p.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(src))
    conv = convert_pixmo_points(str(src), image_dir=str(imgs), val_fraction=0.25, test_fraction=0.25)
    ds = conv.dataset
    assert list(ds.keys()) == ["train", "validation", "test"]
    urls = {s: [json.loads(m)["image_url"] for m in ds[s]["meta"]] for s in ds}
    for s, u in urls.items():
        assert all(u.count(x) == 2 for x in u), s  # both labels of an image land in the same split
    assert not (set(urls["train"]) & set(urls["validation"])) and not (set(urls["train"]) & set(urls["test"]))
    assert sum(len(v) for v in urls.values()) == 80
    assert all(len(set(v)) >= 4 for v in urls.values())  # 40 images at 50/25/25 %: none is near empty
    again = convert_pixmo_points(str(src), image_dir=str(imgs), val_fraction=0.25, test_fraction=0.25).dataset
    assert again["validation"]["id"] == ds["validation"]["id"]


def test_pixmo_inline_image_column(tmp_path):
    path = tmp_path / "x.png"
    save_image(str(path), 20, 10)
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Value("string"),
            "points": datasets.List({"x": datasets.Value("float64"), "y": datasets.Value("float64")}),
        }
    )
    datasets.Dataset.from_list(
        [{"image": str(path), "label": "dot", "points": [{"x": 50.0, "y": 50.0}]}], features=feats
    ).save_to_disk(str(tmp_path / "saved"))
    os.remove(path)
    ds = convert_pixmo_points(str(tmp_path / "saved")).dataset
    assert ds["train"][0]["evidence"]["points"] == [[10.0, 5.0]] and ds["train"][0]["image"].size == (20, 10)


def test_pixmo_option_errors(pixmo):
    src, imgs = pixmo
    with pytest.raises(ValueError, match="val_fraction"):
        convert_pixmo_points(str(src), image_dir=str(imgs), val_fraction=1.5)
    with pytest.raises(ValueError, match="mode"):
        convert_pixmo_points(str(src), image_dir=str(imgs), mode="segment")
    with pytest.raises(ValueError, match=r"answer template"):
        convert_pixmo_points(str(src), image_dir=str(imgs), answer="{number}")


# -- sources -----------------------------------------------------------------------------------------------------------


def test_load_source_errors_and_hub_dispatch(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_source(str(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        load_source(str(tmp_path / "empty"))
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"val": datasets.Dataset.from_list([{"a": 1}])})

    monkeypatch.setattr(kio.datasets, "load_dataset", fake_load_dataset)
    assert list(load_source("someone/refcoco")) == ["val"] and calls == ["someone/refcoco"]


def test_refcoco_cli_saves_the_dataset(classic, tmp_path, capsys):
    from klal.data.refcoco import main

    main([str(classic), "--out", str(tmp_path / "cli_out"), "--splits", "train"])
    assert "kept 2" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(tmp_path / "cli_out"))
    assert list(ds.keys()) == ["train"] and ds["train"][1]["question"].startswith("Where is left guy?")


def test_refcoco_cli_resized_answers_use_its_pixel_bounds(classic, tmp_path, capsys):
    from klal.data.refcoco import main

    # 100 x 80 with max_pixels 56 * 56: shrink sqrt(8000 / 3136) = 1.597 -> floor to 28 px multiples: 28 x 56 (scales
    # 0.35 in y, 0.56 in x); the box [10, 20, 40, 60] -> [6, 7, 22, 21]. Dashed and underscore flags both work.
    argv = [str(classic), "--out", str(tmp_path / "o"), "--splits", "train", "--answer-coords", "resized"]
    main([*argv, "--max-pixels", str(56 * 56), "--min_pixels", str(28 * 28)])
    capsys.readouterr()
    assert smart_resize_hw(80, 100, 28 * 28, 56 * 56) == (28, 56)
    row = datasets.load_from_disk(str(tmp_path / "o"))["train"][0]
    assert row["answer"] == "[6, 7, 22, 21]"


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("refcoco", ["--answer-coords", "both"], "answer_coords"),
        ("refcoco", ["--max-pixels", "0"], "max_pixels"),
        ("refcoco", ["--no-such-flag", "1"], "no_such_flag"),
        ("refcoco", ["--split-by", "google"], "refs(google).p"),
        ("pixmo", ["--mode", "where"], "mode"),
        ("pixmo", ["--val-fraction", "1.5"], "val_fraction"),
    ],
)
def test_converter_cli_bad_input_is_one_line_exit_2(classic, tmp_path, capsys, module, args, needle):
    import importlib

    main = importlib.import_module(f"klal.data.{module}").main
    source = classic
    if module == "pixmo":
        source = tmp_path / "points.jsonl"
        source.write_text(json.dumps({"image_url": "http://x/a.jpg", "label": "dog", "points": [[1, 2]]}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main([str(source), "--out", str(tmp_path / "o"), *args], prog=f"klal convert-{module}")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"klal convert-{module}: error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_converter_help_and_klal_dispatch(classic, tmp_path, capsys):
    from klal.__main__ import main as klal_main

    for name, flag in (("convert-refcoco", "--max_pixels MAX_PIXELS"), ("convert-pixmo", "--point_units")):
        with pytest.raises(SystemExit) as exc:
            klal_main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: klal {name}") and "--out OUT" in out and "--image_dir" in out and flag in out
        if name == "convert-refcoco":
            assert f"default: {DEFAULT_MAX_PIXELS}" in " ".join(out.split())  # the project's one default
    klal_main(["convert-refcoco", str(classic), "--out", str(tmp_path / "k"), "--splits", "train,validation"])
    assert "kept 3" in capsys.readouterr().out
    assert list(datasets.load_from_disk(str(tmp_path / "k"))) == ["train", "validation"]
