"""Lookup generators (shape_lookup, colour_lookup, neighbour_lookup): answers agree with the drawn pixels, evidence
boxes are the objects' pixel boxes, the named attribute is unique, answers are balanced, generation is deterministic
for any worker count, bad configs are rejected by name, the CLI and the preview work."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_gen.base import GenerationError
from data_gen.cli import main
from data_gen.preview import render_preview
from data_gen.tasks import build_task, get_task_class
from data_gen.tasks.grid_patch import BACKGROUND, COLOURS, GRID_COLOUR
from data_gen.tasks.lookup import RELATIONS, ColourLookupTask, LookupConfig, NeighbourLookupTask, ShapeLookupTask
from data_gen.writer import generate_dataset

LOOKUP_TASKS = ("shape_lookup", "colour_lookup", "neighbour_lookup")

# Shape signatures worked out by hand from the drawing rules in grid_patch._draw_shape, for an object of radius r:
# (area / bounding-box area, box width / height, share of the box's top pixel row that is filled).
#   circle: pi r^2 / (2r)^2 = 0.785, 1, a short chord;   square: 1, 1, 1;
#   triangle (inscribed, apex up): (3 sqrt3 / 4) r^2 / (sqrt3 r x 1.5 r) = 0.5, 1.155, apex (0);
#   diamond: 0.5, 1, apex (0);   cross (bars 2r x 2r/3): (8/3 - 4/9) / 4 = 0.556, 1, the vertical bar (1/3);
#   hexagon (vertex right): (3 sqrt3 / 2) / (2 sqrt3) = 0.75, 2 / sqrt3 = 1.155, the top edge (1/2);
#   star (inner radius 0.42 r): 5 x 0.42 sin36 / (2 sin72 x (1 + cos36)) = 0.359, 1.05, apex (0).
SIGNATURES = {
    "circle": (0.785, 1.0, 0.25),
    "square": (1.0, 1.0, 1.0),
    "triangle": (0.5, 1.155, 0.0),
    "diamond": (0.5, 1.0, 0.0),
    "cross": (0.556, 1.0, 0.333),
    "hexagon": (0.75, 1.155, 0.5),
    "star": (0.359, 1.05, 0.0),
}


def classify(mask: np.ndarray) -> str:
    """The shape whose signature is nearest to that of the pixel mask."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    feats = np.array([box.mean(), box.shape[1] / box.shape[0], box[0].mean()])
    return min(SIGNATURES, key=lambda s: float(np.sum((np.array(SIGNATURES[s]) - feats) ** 2 * [4.0, 4.0, 1.0])))


def colour_mask(img: np.ndarray, colour: str) -> np.ndarray:
    return np.all(img == np.array(COLOURS[colour]), axis=-1)


@pytest.mark.parametrize("name", LOOKUP_TASKS)
@pytest.mark.parametrize("preset", ["easy", "medium"])
def test_answer_and_evidence_match_pixels(name: str, preset: str) -> None:
    task = build_task(name, preset=preset, overrides={"image_size": 224})
    for index in range(20):
        s = task.sample(seed=3, index=index)
        img = np.asarray(s.image)
        objects = s.meta["objects"]
        # Every pixel is background or exactly one object's colour (unique colours: one colour per object).
        drawn = np.zeros(img.shape[:2], dtype=bool)
        for o in objects:
            m = colour_mask(img, o["colour"])
            assert m.any() and not (drawn & m).any()
            drawn |= m
            ys, xs = np.nonzero(m)
            # The box is the object's pixel box (x1, y1 one past the last pixel), inside its layout cell.
            assert o["box"] == [xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]
            assert o["box"][2] - o["box"][0] >= 20
            # The drawn pixels have the shape the meta names (independent check: hand-worked signatures).
            assert classify(m) == o["shape"], (index, o)
        assert np.all(img[~drawn] == np.array(BACKGROUND))
        assert s.evidence.boxes == [objects[i]["box"] for i in s.meta["evidence_objects"]]
        target = objects[0]
        if name == "shape_lookup":
            assert s.answer == target["shape"] and target["colour"] in s.question
        elif name == "colour_lookup":
            assert s.answer == target["colour"] and target["shape"] in s.question
        else:
            anchor = objects[1]
            assert s.answer == target["shape"] and f"{anchor['colour']} {anchor['shape']}" in s.question
            phrase, dr, dc = RELATIONS[s.meta["direction"]]
            assert phrase in s.question
            assert (target["row"], target["col"]) == (anchor["row"] + dr, anchor["col"] + dc)
            assert s.evidence.boxes == [anchor["box"], target["box"]]
        assert "one word" in s.question


@pytest.mark.parametrize("name", LOOKUP_TASKS)
def test_named_attribute_unique(name: str) -> None:
    # hard: unique_attributes=False, so only what the question names is unique and the answer may repeat.
    task = build_task(name, preset="hard", overrides={"image_size": 224})
    repeats = 0
    for index in range(60):
        s = task.sample(seed=1, index=index)
        objs = s.meta["objects"]
        shapes = [o["shape"] for o in objs]
        colours = [o["colour"] for o in objs]
        pairs = [(o["shape"], o["colour"]) for o in objs]
        cells = [(o["row"], o["col"]) for o in objs]
        assert len(set(cells)) == len(cells)
        if name == "shape_lookup":
            assert colours.count(objs[0]["colour"]) == 1
            repeats += shapes.count(s.answer) > 1
        elif name == "colour_lookup":
            assert shapes.count(objs[0]["shape"]) == 1
            repeats += colours.count(s.answer) > 1
        else:
            assert pairs.count(pairs[1]) == 1
            repeats += shapes.count(s.answer) > 1
    # The hard preset does let the answered attribute repeat (otherwise "unique" would be untested).
    assert repeats > 0
    easy = build_task(name, preset="easy", overrides={"image_size": 224})
    for index in range(30):
        objs = easy.sample(seed=1, index=index).meta["objects"]
        assert len({o["shape"] for o in objs}) == len(objs) == len({o["colour"] for o in objs})


@pytest.mark.parametrize("name", LOOKUP_TASKS)
def test_answers_balanced_by_index(name: str) -> None:
    task = build_task(name, preset="easy", overrides={"image_size": 112, "object_scale": (0.7, 0.8)})
    classes = task.answer_classes()
    assert classes == list(task.config.shapes if name != "colour_lookup" else task.config.colours)
    counts = Counter(task.sample(0, i).answer for i in range(3 * len(classes)))
    assert counts == {c: 3 for c in classes}


def test_neighbour_directions_and_positions_vary() -> None:
    task = NeighbourLookupTask(LookupConfig(image_size=112, rows=(2, 3), cols=(2, 3), num_objects=(2, 3)))
    samples = [task.sample(4, i) for i in range(80)]
    assert {s.meta["direction"] for s in samples} == set(RELATIONS)
    assert len({(s.meta["objects"][1]["row"], s.meta["objects"][1]["col"]) for s in samples}) >= 6


def test_grid_lines_drawn_and_avoided() -> None:
    task = ShapeLookupTask(LookupConfig(image_size=168, rows=(3, 3), cols=(3, 3), grid_lines=True, line_width=3))
    s = task.sample(0, 0)
    img = np.asarray(s.image)
    grey = np.all(img == np.array(GRID_COLOUR), axis=-1)
    assert grey[:, 0].all() and grey[:, 56].all() and grey[0].all()  # border and the first inner line
    for o in s.meta["objects"]:
        x0, y0, x1, y1 = (int(v) for v in o["box"])
        assert not grey[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1].any()


def test_deterministic_for_any_worker_count(tmp_path: Path) -> None:
    task = build_task("colour_lookup", preset="medium", overrides={"image_size": 112})
    a, b, c = task.sample(3, 7), task.sample(3, 7), task.sample(3, 8)
    assert a.image.tobytes() == b.image.tobytes() and a.question == b.question and a.meta == b.meta
    assert a.image.tobytes() != c.image.tobytes()
    one = generate_dataset(task, 12, 5, tmp_path / "w1", workers=1, progress=False)
    two = generate_dataset(task, 12, 5, tmp_path / "w2", workers=2, progress=False)
    for split in ("train", "validation", "test"):
        ra = one[split].cast_column("image", datasets.Image(decode=False)).to_list()
        rb = two[split].cast_column("image", datasets.Image(decode=False)).to_list()
        assert ra == rb


@pytest.mark.parametrize("name", LOOKUP_TASKS)
@pytest.mark.parametrize("preset", ["easy", "medium", "hard"])
def test_presets_generate(name: str, preset: str) -> None:
    cls = get_task_class(name)
    s = build_task(name, preset=preset).sample(0, 0)
    lo, hi = cls.presets[preset]["num_objects"]
    assert lo <= len(s.meta["objects"]) <= hi
    assert s.image.size == (448, 448)


@pytest.mark.parametrize(
    ("cls", "overrides", "option"),
    [
        (ShapeLookupTask, {"num_objects": (5, 3)}, "num_objects"),
        (ShapeLookupTask, {"rows": (2, 2), "cols": (2, 2), "num_objects": (3, 5)}, "num_objects"),
        (ShapeLookupTask, {"shapes": ("circle", "blob")}, "shapes"),
        (ColourLookupTask, {"colours": ("red", "red")}, "colours"),
        (ColourLookupTask, {"shapes": ("circle", "star"), "num_objects": (2, 3)}, "unique_attributes"),
        (ColourLookupTask, {"shapes": ("circle", "star"), "num_objects": (2, 3), "unique_attributes": False}, "shape"),
        (NeighbourLookupTask, {"num_objects": (1, 3)}, "num_objects"),
        (ShapeLookupTask, {"object_scale": (0.9, 0.5)}, "object_scale"),
        (ShapeLookupTask, {"jitter": 1.5}, "jitter"),
        (ShapeLookupTask, {"image_size": 40}, "image_size"),
        (ShapeLookupTask, {"line_width": 0}, "line_width"),
    ],
)
def test_invalid_config_names_option(cls: type, overrides: dict, option: str) -> None:
    with pytest.raises(GenerationError, match=option):
        build_task(cls.name, overrides=overrides)


def test_cli_writes_dataset_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    argv = ["neighbour_lookup", "--num", "6", "--seed", "1", "--out", str(out), "--image-size", "112"]
    assert main([*argv, "--preset", "easy", "--quiet"]) == 0
    dd = datasets.load_from_disk(str(out))
    row = dd["train"][0]
    ref = build_task("neighbour_lookup", preset="easy", overrides={"image_size": 112}).sample(1, 0)
    assert row["answer"] == ref.answer and row["question"] == ref.question
    assert np.array_equal(np.asarray(row["image"]), np.asarray(ref.image))
    assert json.loads(row["meta"])["direction"] == ref.meta["direction"]
    png = render_preview(out, tmp_path / "preview.png", num=2, cols=2, max_pixels=112 * 112)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
