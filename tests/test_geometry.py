"""Qwen2.5-VL token geometry (klal.models.qwen2_vl.geometry and the family's grids): constants and smart_resize
parity with transformers' own function."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from klal.models.qwen2_5_vl import FAMILY
from klal.models.qwen2_vl.geometry import MERGE, PATCH_PX, TOKEN_PX, smart_resize_hw


def token_grid(h: int, w: int, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The Qwen2.5-VL family's one grid for an image of this size."""
    (grid,) = FAMILY.grids_for_size(h, w, min_pixels, max_pixels)
    return grid


SQ = (224, 224)


def test_constants_match_the_qwen25_vl_config_and_processor():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = Qwen2_5_VLConfig().vision_config
    assert (PATCH_PX, MERGE) == (vision.patch_size, vision.spatial_merge_size) == (14, 2)
    processor = Qwen2VLImageProcessorPil()
    assert (processor.patch_size, processor.merge_size) == (PATCH_PX, MERGE)
    assert TOKEN_PX == 28 and DEFAULT_MIN_PIXELS == int(processor.size["shortest_edge"]) == 3136


def test_one_project_default_max_pixels_is_the_models():
    from klal.models.loader import ModelConfig

    cfg = ModelConfig()
    assert DEFAULT_MAX_PIXELS == cfg.max_pixels == 448 * 448
    assert cfg.min_pixels == DEFAULT_MIN_PIXELS
    # 448 x 448 is exactly at the bound: 16 x 16 = 256 tokens, the cap; a larger square is shrunk to it.
    assert token_grid(448, 448) == (16, 16)
    assert token_grid(1000, 1000) == (16, 16)


def test_processed_size_of_224_is_itself():
    assert smart_resize_hw(224, 224) == SQ
    assert token_grid(224, 224) == (8, 8)
    assert token_grid(448, 448) == (16, 16)


def test_smart_resize_matches_transformers_on_a_few_sizes_with_the_defaults():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h, w in [(224, 224), (480, 640), (1080, 1920), (13, 200), (37, 41), (3024, 4032), (100, 300)]:
        lo, hi = DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
        expected = tuple(smart_resize(h, w, factor=TOKEN_PX, min_pixels=lo, max_pixels=hi))
        assert smart_resize_hw(h, w) == expected, (h, w)
        assert token_grid(h, w) == (expected[0] // 28, expected[1] // 28)


def test_smart_resize_matches_transformers_over_a_sweep():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    sides = [1, 5, 13, 14, 15, 27, 28, 29, 41, 42, 43, 56, 69, 70, 71, 98, 100, 127, 224, 333, 448, 500, 640, 1000]
    sides += [1023, 1080, 1920, 2001, 3024, 4032]
    bounds = [
        (56 * 56, 28 * 28 * 1280),
        (3136, 12845056),
        (256 * 28 * 28, 1280 * 28 * 28),
        (4 * 28 * 28, 64 * 28 * 28),
        (28 * 28, 28 * 28),
        (200_000, 400_000),
    ]
    checked = 0
    for (h, w), (lo, hi) in itertools.product(itertools.product(sides, sides), bounds):
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError):
                smart_resize(h, w, min_pixels=lo, max_pixels=hi)
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize_hw(h, w, lo, hi)
            continue
        assert smart_resize_hw(h, w, lo, hi) == tuple(smart_resize(h, w, min_pixels=lo, max_pixels=hi)), (h, w, lo, hi)
        checked += 1
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(10, 5000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.integers(28 * 28, 300 * 28 * 28))
        hi = int(rng.integers(lo, 2000 * 28 * 28))
        assert smart_resize_hw(h, w, lo, hi) == tuple(smart_resize(h, w, min_pixels=lo, max_pixels=hi)), (h, w, lo, hi)
        checked += 1
    assert checked > 5000


def test_processor_grid_matches_token_grid(tiny_processor):
    from PIL import Image

    for h, w in [(100, 300), (37, 41), (500, 90), (224, 224), (13, 200), (70, 42)]:
        thw = tiny_processor.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="np")["image_grid_thw"]
        _, gh14, gw14 = (int(v) for v in thw[0])
        assert (gh14 * PATCH_PX, gw14 * PATCH_PX) == smart_resize_hw(h, w, 56 * 56, 224 * 224), (h, w)
        assert (gh14 // MERGE, gw14 // MERGE) == token_grid(h, w, 56 * 56, 224 * 224)


def test_smart_resize_rounds_half_to_even():
    # 42 / 28 = 1.5 -> 2 and 70 / 28 = 2.5 -> 2 (Python's round, as the processor uses): both give 56 px.
    assert smart_resize_hw(42, 2000, min_pixels=28 * 28, max_pixels=10**8)[0] == 56
    assert smart_resize_hw(70, 2000, min_pixels=28 * 28, max_pixels=10**8)[0] == 56


@pytest.mark.parametrize(("h", "w", "message"), [(0, 10, "positive"), (10, -1, "positive"), (1, 201, "aspect")])
def test_smart_resize_refuses_what_the_processor_refuses(h, w, message):
    with pytest.raises(ValueError, match=message):
        smart_resize_hw(h, w)
