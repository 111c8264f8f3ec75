"""The public benchmarks' exact download layouts, written in a folder (a few rows, images drawn here), for the
benchmark tests; the converted datasets are the fixture of :mod:`tests.bench_data`.

Layouts (docs/benchmarks.md): V* Bench as the authors' folder (``test_questions.jsonl`` + per-image JSON) and as
lmms-lab's parquet; TextVQA as the authors' ``TextVQA_0.5.1_val.json`` + Rosetta OCR file + ``train_images/`` and as
lmms-lab's parquet; POPE as the authors' ``coco_pope_<split>.json`` JSON-lines files + COCO images and as lmms-lab's
parquet; RefCOCO as lmms-lab's parquet.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw


def draw_image(w: int, h: int, boxes: list[list[float]], seed: int = 0) -> Image.Image:
    """A grey image with a coloured rectangle at each ``[x0, y0, x1, y1]``."""
    im = Image.new("RGB", (w, h), (200 - 10 * seed % 60, 200, 200))
    d = ImageDraw.Draw(im)
    for k, b in enumerate(boxes):
        d.rectangle(b, fill=((60 * k + 40 * seed) % 255, 80, 200))
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: list[dict], image_column: str = "image") -> None:
    """Rows as a parquet file the way the hub stores an ``Image`` column (``{"bytes", "path"}`` structs)."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if image_column in ds.column_names:
        ds = ds.cast_column(image_column, datasets.Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def make_vstar_folder(root: Path) -> Path:
    """The authors' V* folder: two categories, three questions; one image has two target objects."""
    specs = [
        (
            "direct_attributes",
            "sa_1",
            224,
            168,
            [[20, 30, 40, 30]],
            ["cup"],
            "What is the color of the cup?",
            ["red", "blue", "green", "white"],
            "B",
        ),
        (
            "direct_attributes",
            "sa_2",
            196,
            196,
            [[100, 100, 50, 60]],
            ["bag"],
            "What is the material of the bag?",
            ["leather", "paper", "cloth", "plastic"],
            "A",
        ),
        (
            "relative_position",
            "sa_3",
            252,
            168,
            [[10, 10, 30, 30], [180, 90, 40, 50]],
            ["dog", "cat"],
            "Is the dog on the left or right side of the cat?",
            ["left", "right"],
            "A",
        ),
    ]
    lines = []
    for qid, (cat, stem, w, h, xywh, names, q, opts, label) in enumerate(specs):
        folder = root / cat
        folder.mkdir(parents=True, exist_ok=True)
        xyxy = [[x, y, x + bw, y + bh] for x, y, bw, bh in xywh]
        draw_image(w, h, xyxy, seed=qid).save(folder / f"{stem}.jpg")
        # The per-image annotation lists the correct option first.
        correct = opts["ABCD".index(label)]
        ann_opts = [correct] + [o for o in opts if o != correct]
        (folder / f"{stem}.json").write_text(
            json.dumps({"target_object": names, "bbox": xywh, "question": q, "options": ann_opts})
        )
        text = q + "\n" + "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(opts))
        text += "\nAnswer with the option's letter from the given choices directly."
        lines.append({"image": f"{cat}/{stem}.jpg", "text": text, "category": cat, "question_id": qid, "label": label})
    (root / "test_questions.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


def make_vstar_parquet(root: Path) -> Path:
    """lmms-lab/vstar-bench's parquet (``image``, ``text``, ``category``, ``question_id``, ``label``), no boxes."""
    rows = [
        {
            "image": {"bytes": png_bytes(draw_image(224, 168, [[20, 30, 60, 60]])), "path": "sa_9.jpg"},
            "text": "What is the color of the cup?\n(A) red\n(B) blue\n(C) green\n(D) white",
            "category": "direct_attributes",
            "question_id": 9,
            "label": "C",
        },
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return root / "data"


def make_textvqa_authors(root: Path) -> Path:
    """``TextVQA_0.5.1_val.json`` + ``TextVQA_Rosetta_OCR_v0.2_val.json`` + ``train_images/<image_id>.jpg``."""
    images = root / "train_images"
    images.mkdir(parents=True)
    data = []
    ocr = []
    specs = [
        (
            "img_a",
            224,
            168,
            "what brand is the drink?",
            ["coca cola"] * 6 + ["coke"] * 3 + ["pepsi"],
            [("coca", [0.1, 0.2, 0.2, 0.1]), ("cola", [0.35, 0.2, 0.2, 0.1]), ("sale", [0.6, 0.7, 0.2, 0.1])],
        ),
        (
            "img_b",
            196,
            196,
            "what number is on the shirt?",
            ["23"] * 4 + ["twenty three"] * 3 + ["32"] * 3,
            [("23", [0.4, 0.4, 0.15, 0.1])],
        ),
        ("img_c", 224, 224, "what does the sign say?", ["stop"] * 10, []),
    ]
    for k, (image_id, w, h, q, answers, tokens) in enumerate(specs):
        boxes = [[x * w, y * h, (x + bw) * w, (y + bh) * h] for _, (x, y, bw, bh) in tokens]
        draw_image(w, h, boxes, seed=k).save(images / f"{image_id}.jpg")
        data.append(
            {
                "question": q,
                "image_id": image_id,
                "image_classes": ["Sign"],
                "flickr_original_url": "",
                "flickr_300k_url": "",
                "image_width": w,
                "image_height": h,
                "answers": answers,
                "question_tokens": q.split(),
                "question_id": 100 + k,
                "set_name": "val",
            }
        )
        ocr.append(
            {
                "image_id": image_id,
                "ocr_tokens": [t for t, _ in tokens],
                "ocr_info": [
                    {
                        "word": t,
                        "bounding_box": {
                            "top_left_x": x,
                            "top_left_y": y,
                            "width": bw,
                            "height": bh,
                            "rotation": 0,
                            "roll": 0,
                            "pitch": 0,
                            "yaw": 0,
                        },
                    }
                    for t, (x, y, bw, bh) in tokens
                ],
            }
        )
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    )
    (root / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "rosetta_ocr", "data": ocr})
    )
    return root


def make_textvqa_parquet(root: Path) -> Path:
    """lmms-lab/textvqa's parquet columns (images inline, ten answers, OCR tokens without boxes)."""
    rows = [
        {
            "image_id": "img_z",
            "question_id": 7,
            "question": "what is written on the cup?",
            "question_tokens": ["what"],
            "image": {"bytes": png_bytes(draw_image(200, 150, [])), "path": None},
            "image_width": 200,
            "image_height": 150,
            "flickr_original_url": "",
            "flickr_300k_url": "",
            "answers": ["tea"] * 10,
            "image_classes": ["Cup"],
            "set_name": "val",
            "ocr_tokens": ["tea"],
        },
    ]
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", rows)
    return root / "data"


def make_pope_authors(root: Path) -> Path:
    """``coco_pope_{adversarial,popular,random}.json`` (JSON lines) + COCO ``val2014`` images."""
    images = root / "val2014"
    images.mkdir(parents=True)
    for k in range(2):
        draw_image(224, 168, [[30, 30, 90, 90]], seed=k).save(images / f"COCO_val2014_00000000000{k}.jpg")
    for cat in ("adversarial", "popular", "random"):
        rows = [
            {
                "question_id": 1,
                "image": "COCO_val2014_000000000000.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "COCO_val2014_000000000001.jpg",
                "text": f"Is there a {cat} in the image?",
                "label": "no",
            },
        ]
        (root / f"coco_pope_{cat}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def make_pope_parquet(root: Path) -> Path:
    """lmms-lab/POPE's parquet columns."""
    rows = [
        {
            "id": "0",
            "question_id": "1",
            "question": "Is there a snowboard in the image?",
            "answer": "yes",
            "image_source": "COCO_val2014_000000310196",
            "category": "adversarial",
            "image": {"bytes": png_bytes(draw_image(224, 168, [])), "path": None},
        },
        {
            "id": "1",
            "question_id": "2",
            "question": "Is there a car in the image?",
            "answer": "no",
            "image_source": "COCO_val2014_000000310196",
            "category": "random",
            "image": {"bytes": png_bytes(draw_image(224, 168, [])), "path": None},
        },
    ]
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return root / "data"


def make_refcoco_parquet(root: Path) -> Path:
    """lmms-lab/RefCOCO's parquet columns (``bbox`` COCO ``[x, y, w, h]``, ``answer`` = the referring sentences)."""
    rows = []
    for k, (w, h, xywh) in enumerate([(224, 168, [20, 30, 80, 60]), (196, 224, [100, 40, 60, 120])]):
        x, y, bw, bh = xywh
        rows.append(
            {
                "question_id": str(k),
                "question": "Please carefully observe the area circled in the image",
                "answer": [f"the object number {k}"],
                "segmentation": [0.0],
                "bbox": [float(v) for v in xywh],
                "iscrowd": 0,
                "file_name": f"COCO_train2014_00000000000{k}.jpg",
                "image": {"bytes": png_bytes(draw_image(w, h, [[x, y, x + bw, y + bh]], seed=k)), "path": None},
            }
        )
    write_parquet(root / "data" / "val-00000-of-00001.parquet", rows)
    return root / "data"
