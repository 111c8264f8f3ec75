"""Grid patch generator: answers agree with the drawn pixels and the evidence box, targets are uniform, bad configs
are rejected by name."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from data_gen.base import GenerationError
from data_gen.tasks import build_task
from data_gen.tasks.grid_patch import COLOURS, GRID_COLOUR, GridPatchConfig, GridPatchTask, _edges

ANSWER = re.compile(r"^\((\d+), (\d+)\)$")


def _grid_line_runs(img: np.ndarray, axis: int) -> int:
    """Number of runs of pixel columns (axis=1) or rows (axis=0) that are mostly grid-line grey."""
    grey = np.all(img == np.array(GRID_COLOUR), axis=-1)
    frac = grey.mean(axis=0 if axis == 1 else 1)
    on = frac > 0.9
    return int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))


def test_edges_hand_worked() -> None:
    # 100 px in 3 cells: 33.3 -> 33, 66.7 -> 67.
    assert _edges(3, 100) == [0, 33, 67, 100]
    assert _edges(4, 448) == [0, 112, 224, 336, 448]


@pytest.mark.parametrize("index", range(12))
def test_answer_matches_box_and_pixels(index: int) -> None:
    size = 160
    cfg = GridPatchConfig(image_size=size, rows=(2, 7), cols=(2, 7), num_distractors=3, share_attribute_prob=0.0)
    # Odd indices: the largest shapes and thick odd-width lines, the worst case for touching a line.
    if index % 2:
        cfg.shape_scale, cfg.line_width = 1.0, 3
    task = GridPatchTask(cfg)
    s = task.sample(seed=5, index=index)
    r, c = (int(v) for v in ANSWER.match(s.answer).groups())
    n_rows, n_cols = s.meta["rows"], s.meta["cols"]
    assert 1 <= r <= n_rows and 1 <= c <= n_cols
    img = np.asarray(s.image)
    assert img.shape == (size, size, 3)

    # The drawn grid has as many cells as the meta says: C + 1 vertical and R + 1 horizontal lines.
    assert _grid_line_runs(img, axis=1) == n_cols + 1
    assert _grid_line_runs(img, axis=0) == n_rows + 1

    # The box is the cell of (r, c) under the documented 1-based convention, edges at floor(k * size / n + 0.5).
    x0, x1 = math.floor((c - 1) * size / n_cols + 0.5), math.floor(c * size / n_cols + 0.5)
    y0, y1 = math.floor((r - 1) * size / n_rows + 0.5), math.floor(r * size / n_rows + 0.5)
    assert s.evidence.boxes == [[x0, y0, x1, y1]]

    # With share_attribute_prob=0 no distractor has the target's colour, so every pixel of that exact colour belongs
    # to the target shape: they all lie inside the box, and there are enough of them to be a shape.
    target = s.meta["target"]
    assert target["shape"] in s.question and target["colour"] in s.question
    ys, xs = np.nonzero(np.all(img == np.array(COLOURS[target["colour"]]), axis=-1))
    assert len(xs) >= 10
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    # ... and none touches a grid line (no grey pixel in the shape's bounding box grown by one pixel).
    grey = np.all(img == np.array(GRID_COLOUR), axis=-1)
    assert not grey[ys.min() - 1 : ys.max() + 2, xs.min() - 1 : xs.max() + 2].any()


def test_distractors_differ_from_target_and_fill_cells() -> None:
    task = GridPatchTask(
        GridPatchConfig(
            image_size=128,
            rows=(3, 4),
            cols=(3, 4),
            shapes=("circle", "star"),
            colours=("red", "blue"),
            num_distractors=8,
            share_attribute_prob=1.0,
        )
    )
    for i in range(30):
        s = task.sample(seed=1, index=i)
        t = s.meta["target"]
        pairs = [(cell["shape"], cell["colour"]) for row in s.meta["cells"] for cell in row if cell is not None]
        assert len(pairs) == 9
        assert pairs.count((t["shape"], t["colour"])) == 1
        assert s.meta["cells"][t["row"] - 1][t["col"] - 1] == {"shape": t["shape"], "colour": t["colour"]}
        # share_attribute_prob=1: every distractor shares exactly one attribute.
        for shape, colour in pairs:
            assert (shape == t["shape"]) + (colour == t["colour"]) in (1, 2)


def test_target_cell_uniform_over_seeds() -> None:
    task = GridPatchTask(GridPatchConfig(image_size=64, rows=(3, 3), cols=(4, 4), num_distractors=2, line_width=1))
    counts = Counter(task.sample(seed, 0).answer for seed in range(1200))
    expected = {f"({r}, {c})" for r in range(1, 4) for c in range(1, 5)}
    assert set(counts) == expected
    assert chisquare([counts[a] for a in sorted(expected)]).pvalue > 1e-3
    assert task.answer_classes() is None


def test_grid_size_range_covered() -> None:
    task = GridPatchTask(GridPatchConfig(image_size=96, rows=(2, 4), cols=(5, 6), num_distractors=0, line_width=1))
    sizes = Counter((task.sample(0, i).meta["rows"], task.sample(0, i).meta["cols"]) for i in range(120))
    assert set(sizes) == {(r, c) for r in (2, 3, 4) for c in (5, 6)}


def test_deterministic_per_index() -> None:
    task = build_task("grid_patch", preset="medium", overrides={"image_size": 128})
    a, b, c = task.sample(3, 7), task.sample(3, 7), task.sample(3, 8)
    assert a.image.tobytes() == b.image.tobytes() and a.question == b.question and a.meta == b.meta
    assert a.image.tobytes() != c.image.tobytes()


def test_state_grid_size_in_question() -> None:
    task = GridPatchTask(GridPatchConfig(image_size=96, rows=(2, 2), cols=(5, 5), state_grid_size=True))
    assert task.sample(0, 0).question.startswith("The grid has 2 rows and 5 columns.")


@pytest.mark.parametrize("preset", ["easy", "medium", "hard"])
def test_presets_generate(preset: str) -> None:
    task = build_task("grid_patch", preset=preset)
    s = task.sample(0, 0)
    lo, hi = GridPatchTask.presets[preset]["rows"]
    assert lo <= s.meta["rows"] <= hi
    n_shapes = sum(cell is not None for row in s.meta["cells"] for cell in row)
    assert n_shapes == 1 + GridPatchTask.presets[preset]["num_distractors"]


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"rows": (5, 3)}, "rows"),
        ({"cols": (0, 3)}, "cols"),
        ({"rows": (2, 2), "cols": (2, 2), "num_distractors": 4}, "num_distractors"),
        ({"shapes": ("circle", "blob")}, "shapes"),
        ({"colours": ("red", "red")}, "colours"),
        ({"image_size": 60, "rows": (4, 12)}, "image_size"),
        ({"shape_scale": 0.0}, "shape_scale"),
        ({"share_attribute_prob": 1.5}, "share_attribute_prob"),
        ({"shapes": ("star",), "colours": ("red",), "num_distractors": 1}, "num_distractors"),
        ({"line_width": 0}, "line_width"),
    ],
)
def test_invalid_config_names_option(overrides: dict, option: str) -> None:
    with pytest.raises(GenerationError, match=option):
        build_task("grid_patch", overrides=overrides)
