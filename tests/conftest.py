"""Shared fixtures: the embedded tiny Qwen2.5-VL and small schema rows built in memory."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from PIL import Image

HANG_S = 3600
"""The one wall-clock limit in the tests: a guard against a hung process (a deadlock, a worker that never exits), set
far beyond any run on a loaded machine, so it never decides a verdict by itself. Nothing else in the tests is timed."""

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (pyproject's addopts, -n auto): one torch thread each, here and in the processes the tests
    # start, instead of every worker's threads contending for every core (the threads' spin-waits then cost more
    # than they compute).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Stored --help texts (klal.helpcache) go to a folder of this test session, not the user's ~/.cache.
os.environ.setdefault("KLAL_CACHE_DIR", tempfile.mkdtemp(prefix="klal-test-cache-"))


@pytest.fixture(scope="session")
def tiny_processor():
    from klal.models.qwen2_5_vl.tiny import build_tiny_processor

    return build_tiny_processor(min_pixels=56 * 56, max_pixels=224 * 224)


def make_row(idx: int, width: int, height: int, box: list[float] | None, answer: str = "(2, 3)") -> dict:
    """A schema row with a random-noise image and (optionally) one evidence box."""
    rng = np.random.default_rng(idx)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    return {
        "id": f"row-{idx}",
        "task": "test",
        "image": img,
        "question": "Which cell contains the red star? Answer as (row, column).",
        "answer": answer,
        "width": width,
        "height": height,
        "evidence": {"boxes": [box] if box else [], "points": [], "polylines": []},
        "meta": "{}",
    }


def make_text_row(idx: int, answer: str = "Paris", question: str = "What is the capital of France?") -> dict:
    """A text-only schema row: no image (``image`` None, size 0 x 0) and empty evidence."""
    return {
        "id": f"text-{idx}",
        "task": "test",
        "image": None,
        "question": question,
        "answer": answer,
        "width": 0,
        "height": 0,
        "evidence": {"boxes": [], "points": [], "polylines": []},
        "meta": "{}",
    }


@pytest.fixture
def mixed_rows():
    """Three rows with different image sizes (so different token grids) and one without evidence."""
    return [
        make_row(0, 224, 224, [28.0, 56.0, 84.0, 112.0], answer="(3, 2)"),
        make_row(1, 168, 112, [0.0, 0.0, 56.0, 56.0], answer="(1, 1)"),
        make_row(2, 140, 196, None, answer="(12, 10)"),
    ]
