"""Fixtures and rows shared by the grounding tests (tests/test_grounding_*.py import what they use from here).

The tiny model is loaded once per test session (:func:`tiny_model`), so the grounding test files share it. The
fixtures reach a test file through ``pytest_plugins = ["tests.grounding_helpers"]``; this module has no asserts to
rewrite (PYTEST_DONT_REWRITE), so importing its helpers first is fine.
"""

from __future__ import annotations

import functools

import pytest
import torch

from klal.session import GroundingModel


@functools.cache
def tiny_model() -> tuple[torch.nn.Module, object]:
    """The embedded tiny Qwen2.5-VL and its processor, with images capped at 224 x 224 px (fast passes)."""
    from klal.models.loader import ModelConfig, load_model_and_processor

    return load_model_and_processor(ModelConfig(max_pixels=224 * 224))


def grid_patch_row(task, seed: int, idx: int) -> dict:
    """A klal schema row from a grid_patch task sample."""
    s = task.sample(seed, idx)
    return {
        "id": f"grid_patch-{seed}-{idx}",
        "task": "grid_patch",
        "image": s.image,
        "question": s.question,
        "answer": s.answer,
        "width": s.image.width,
        "height": s.image.height,
        "evidence": s.evidence.to_dict(),
        "meta": "{}",
    }


def text_row(k: int) -> dict:
    """A text-only schema row (no image)."""
    from klal.data.schema import Evidence, make_record

    return make_record(
        id=f"text-{k}", task="grid_patch", image=None, question="What is 2 + 3?", answer="5", evidence=Evidence()
    )


def inside(box, w, h) -> bool:
    """Whether a pixel box is a non-empty box inside a ``w x h`` image."""
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


@pytest.fixture(scope="module")
def gm() -> GroundingModel:
    """The tiny model for grounding (shared weights; a fresh pass counter per test module)."""
    return GroundingModel(*tiny_model())


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Five grid_patch rows (448 x 448 px images)."""
    from data_gen.tasks import build_task

    task = build_task("grid_patch", "easy", {})
    return [grid_patch_row(task, 0, i) for i in range(5)]


@pytest.fixture(scope="module")
def row() -> dict:
    """One grid_patch row with its image resized to 224 x 224 px, so the tiny model's passes stay fast."""
    from data_gen.tasks import build_task

    s = build_task("grid_patch", "easy", {}).sample(3, 0)
    im = s.image.resize((224, 224))
    return {
        "id": "gp-3-0",
        "task": "grid_patch",
        "image": im,
        "question": s.question,
        "answer": s.answer,
        "width": im.width,
        "height": im.height,
        "evidence": s.evidence.to_dict(),
        "meta": s.meta,
    }
