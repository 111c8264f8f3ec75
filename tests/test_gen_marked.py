"""Marked colour lookups (ring_colour, outline_colour, beside_colour): the answer is the fill colour found in the pixels
next to the named marker colour, the boxes are the pixels' boxes, colours are distinct and the sets disjoint, objects
are at least 2 x 2 visual tokens, answers are balanced and one token each for tiny-base, bad configs are named."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from data_gen.base import GenerationError
from data_gen.tasks import build_task
from data_gen.tasks.grid_patch import BACKGROUND, COLOURS
from data_gen.tasks.marked import FILL_COLOURS, MARKER_COLOURS

NAMES = ("ring_colour", "outline_colour", "beside_colour")


def _mask(img: np.ndarray, colour: str) -> np.ndarray:
    return np.all(img == np.array(COLOURS[colour]), axis=-1)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _distance(img: np.ndarray, colour: str, centre: np.ndarray) -> float:
    x0, y0, x1, y1 = _bbox(_mask(img, colour))
    return float(np.linalg.norm(np.array([(x0 + x1) / 2, (y0 + y1) / 2]) - centre))


@pytest.mark.parametrize("name", NAMES)
def test_answer_is_the_fill_next_to_the_named_marker(name: str) -> None:
    task = build_task(name, preset="easy")
    for index in range(16):
        s = task.sample(seed=3, index=index)
        img = np.asarray(s.image)
        objects = s.meta["objects"]
        named = s.meta["query_word"]
        assert named in s.question and named == objects[0]["marker"]
        # Every pixel is white, a fill colour or a marker colour; each colour drawn is one connected blob.
        known = [BACKGROUND, *(COLOURS[c] for c in FILL_COLOURS + MARKER_COLOURS)]
        assert np.all(np.any([np.all(img == np.array(k), axis=-1) for k in known], axis=0))
        fills = [c for c in FILL_COLOURS if _mask(img, c).any()]
        markers = [c for c in MARKER_COLOURS if _mask(img, c).any()]
        assert sorted(fills) == sorted(o["colour"] for o in objects)
        assert sorted(markers) == sorted(o["marker"] for o in objects)
        for c in fills + markers:
            assert ndimage.label(_mask(img, c), structure=np.ones((3, 3)))[1] == 1
        # The named marker's pixels and the answer's pixels: the answer is the fill whose box is nearest to the
        # named marker's pixels (inside the ring / outline, or beside the square), found from the image alone.
        mk = _mask(img, named)
        assert _bbox(mk) == objects[0]["marker_box"]
        mx0, my0, mx1, my1 = _bbox(mk)
        centre = np.array([(mx0 + mx1) / 2, (my0 + my1) / 2])

        assert min(fills, key=lambda c, img=img, centre=centre: _distance(img, c, centre)) == s.answer
        for o in objects:
            assert _bbox(_mask(img, o["colour"])) == o["box"]
            assert _bbox(_mask(img, o["marker"])) == o["marker_box"]
            x0, y0, x1, y1 = o["box"]
            assert x1 - x0 >= 56 and y1 - y0 >= 56, "an object covers at least 2 x 2 visual tokens of 28 px"
        assert s.evidence.boxes == [objects[0]["box"]]
        if name == "ring_colour":  # the ring encloses the fill, with white between them
            x0, y0, x1, y1 = objects[0]["box"]
            assert mx0 < x0 and my0 < y0 and mx1 > x1 and my1 > y1
            ring_inside = ndimage.binary_fill_holes(mk) & ~mk
            assert ring_inside[_mask(img, s.answer)].all()


@pytest.mark.parametrize("name", NAMES)
def test_answers_balanced_and_one_token_for_tiny_base(name: str) -> None:
    from klal.models.loader import ModelConfig, load_processor
    from studies.reproduce.pipeline import render_answer

    task = build_task(name, preset="easy")
    answers = [task.sample(seed=0, index=i).answer for i in range(20)]
    assert Counter(answers) == {c: 5 for c in FILL_COLOURS}
    tok = load_processor(ModelConfig(name_or_path="tiny-base", max_pixels=224 * 224)).tokenizer
    for c in FILL_COLOURS:
        assert len(tok(render_answer(c, "fewest_tokens", tok), add_special_tokens=False)["input_ids"]) == 1


def test_deterministic_and_one_object_images() -> None:
    task = build_task("ring_colour", preset="easy")
    a, b = task.sample(seed=1, index=7), task.sample(seed=1, index=7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.meta == b.meta
    one = build_task("outline_colour", preset="easy", overrides={"num_objects": (1, 1)}).sample(seed=0, index=0)
    assert len(one.meta["objects"]) == 1


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"colours": ("red", "orange"), "num_objects": (1, 2)}, "marker_colours"),
        ({"num_objects": (3, 5)}, "num_objects"),
        ({"object_px": (56, 120)}, "object_px"),
        ({"shapes": ("star",)}, "shapes"),
        ({"gap_px": 0}, "gap_px"),
        ({"colours": ("red", "mauve")}, "colours"),
    ],
)
def test_invalid_config_names_option(overrides: dict, option: str) -> None:
    with pytest.raises(GenerationError, match=option):
        build_task("ring_colour", overrides=overrides)
