"""The wrong-answer diagnostic (studies/reproduce/leak.py): each task's wrong answer on hand-worked items, and, on a
real tiny model, the control it rests on: the last prompt token sees no answer, so its attention is the same whatever
answer is fed, while an answer token's attention changes with the fed answer."""

from __future__ import annotations

import json

import pytest

from studies.reproduce import leak


def _row(task: str, answer: str, meta: dict, box: list[float]) -> dict:
    ev = {"boxes": [box], "points": [], "polylines": []}
    return {"id": f"{task}-0", "answer": answer, "meta": json.dumps(meta), "evidence": ev}


def test_grid_patch_wrong_answer_is_another_occupied_cell_with_its_box() -> None:
    obj = {"colour": "red", "shape": "star"}
    # 2 x 3 grid; target at (2, 3); the other object at (1, 2) is the first occupied cell in row-major order.
    meta = {
        "cells": [[None, obj, None], [None, None, obj]],
        "target": {"row": 2, "col": 3},
        "x_edges": [0, 30, 60, 90],
        "y_edges": [0, 40, 80],
    }
    gold, wrong, on_fed = leak.wrong_answer_rows(
        "grid_patch", [_row("grid_patch", "(2, 3)", meta, [60, 40, 90, 80])], str
    )
    assert gold[0]["answer"] == "(2, 3)" and wrong[0]["answer"] == "(1, 2)"
    assert wrong[0]["evidence"]["boxes"] == [[60, 40, 90, 80]]  # the gold evidence is kept
    assert on_fed[0]["evidence"]["boxes"] == [[30.0, 0.0, 60.0, 40.0]]  # cell (1, 2)


def test_other_tasks_wrong_answers_and_rendering() -> None:
    spaced = lambda a: " " + a  # noqa: E731 - the study's answer rendering, as a callable
    m = {"objects": [{"colour": "red", "box": [0, 0, 5, 5]}, {"colour": "blue", "box": [10, 10, 20, 20]}]}
    _, wrong, on_fed = leak.wrong_answer_rows("colour_lookup", [_row("colour_lookup", " red", m, [0, 0, 5, 5])], spaced)
    assert wrong[0]["answer"] == " blue" and on_fed[0]["evidence"]["boxes"] == [[10, 10, 20, 20]]
    _, wrong, on_fed = leak.wrong_answer_rows("line_intersection", [_row("x", "2", {}, [0, 0, 1, 1])], str)
    assert wrong[0]["answer"] == "3" and on_fed[0]["evidence"]["boxes"] == []
    _, wrong, _ = leak.wrong_answer_rows("line_tracing", [_row("x", "Yes", {}, [0, 0, 1, 1])], str)
    assert wrong[0]["answer"] == "No"
    with pytest.raises(ValueError, match="no rule for task 'shape_lookup'"):
        leak.wrong_answer_rows("shape_lookup", [], str)


@pytest.mark.slow
def test_prompt_last_is_blind_to_the_fed_answer_and_answer_tokens_are_not(tmp_path) -> None:
    """On a real tiny Qwen2.5-VL, the diagnostic's control holds exactly and the answer-token query moves."""
    from studies.reproduce import pipeline as repro

    cfg = repro.StudyConfig(
        tasks={"grid_patch": {"num": 16, "preset": "easy", "splits": [0.5, 0.125, 0.375]}},
        image_size=112,
        data_dir=str(tmp_path / "data"),
        tiny_overrides={"num_hidden_layers": 2, "vision_depth": 1, "vision_fullatt_block_indexes": [0]},
        sweep_task=None,
        generate=False,
    )
    repro.make_data(cfg)
    rows = repro.task_split(cfg, "grid_patch", "test")
    m = leak.leak_metrics(repro.build_module(cfg), "grid_patch", rows, str, batch_size=4)
    assert m["n"] == 6
    assert m["prompt_last/gold_fed"] == pytest.approx(m["prompt_last/wrong_fed"], abs=1e-7)
    assert m["prompt_last/shift"] == pytest.approx(0.0, abs=1e-7)
    # A random model's answer-token attention depends on the answer's tokens: feeding another answer moves it.
    assert abs(m["last/shift"]) > 1e-6
    assert 0.0 <= m["last/on_fed"] <= 1.0
