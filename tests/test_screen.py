"""The testbed screen (studies/reproduce/screen.py): the verdict on hand-worked numbers, and the stage on a toy study
(a marked colour lookup, the tiny random model, 2 steps), its numbers checked against the evaluation stage's per-item
results and the generator's meta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from studies.reproduce.pipeline import ScreenSettings
from studies.reproduce.screen import judge


def test_judge_hand_worked() -> None:
    s = ScreenSettings()
    ok = judge(0.95, 0.12, 0.02, 0.15, s)
    assert ok["passed"] and ok["failed"] == []
    # At the thresholds: readout 90 % and gains of exactly 10 points pass; a control gain of 10 points fails.
    edge = judge(0.90, 0.10, 0.10, 0.10, s)
    assert edge["failed"] == ["control"] and not edge["passed"]
    bad = judge(0.57, 0.30, -0.2, 0.05, s)
    assert bad["failed"] == ["readout", "ntp_gap"] and bad["oracle_gain"] and bad["control"]


def test_screen_stage_toy(tmp_path: Path) -> None:
    """data -> train -> eval -> screen on a toy ring_colour study: the oracle at beta 0 is the evaluated model, the
    readout images hold one object, the gains and the gap are the differences of the reported accuracies, and a task
    that fails is in the table with its numbers."""
    from klal.data.io import load_split
    from studies.reproduce import run as reproduce
    from studies.reproduce.screen import readout_path

    toy = {
        "data_dir": str(tmp_path / "data"),
        "run_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "image_size": 112,
        "tasks": {
            "ring_colour": {
                "num": 16,
                "splits": [0.5, 0.25, 0.25],
                "seed": 3,
                "preset": "easy",
                "overrides": {"object_px": [20, 24], "marker_px": 3, "gap_px": 2},
            }
        },
        "tiny_overrides": {"num_hidden_layers": 2, "vision_depth": 1, "vision_fullatt_block_indexes": [0]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "attention"},
        "steps": 2,
        "batch_size": 2,
        "warmup_steps": 1,
        "seeds": [0],
        "arms": {"ntp": {"klal_weight": 0.0}},
        "eval_every": 2,
        "curve_samples": 2,
        "test_samples": 4,
        "eval_batch_size": 4,
        "generate": False,
        "sweep_task": None,
        "probe_arms": [],
        "answer_render": "fewest_tokens",
        "confirmatory_scan": str(tmp_path),
        "screen": {
            "samples": 4,
            "readout_samples": 5,
            "betas": [1.0, 1.0e4],
            "readout_phrasings": {
                "ring_colour": ["What colour is the object?", "Which colour is in the {selector} ring?"]
            },
        },
    }
    cfg_p = tmp_path / "toy.yaml"
    cfg_p.write_text(yaml.safe_dump(toy))
    reproduce.main(["--config", str(cfg_p), "--stages", "data,train,eval,screen"])
    res = json.loads((tmp_path / "results" / "screen.json").read_text())["screen"]["ring_colour"]

    # Beta 0 of the oracle (its own per-row forward passes) equals the eval stage's exact match on the same items.
    items = json.loads((tmp_path / "runs" / "ring_colour" / "ntp_s0" / "eval.json").read_text())["items"]
    assert res["per_beta"]["exact"][0][0] == pytest.approx(np.mean([it["exact_tf"] for it in items]))
    assert res["betas"] == [0.0, 1.0, 1.0e4] and res["beta"] in (1.0, 1.0e4)
    assert res["ntp_test"] == [pytest.approx(np.mean([it["exact_tf"] for it in items]))]
    # The criteria's numbers are the differences of the reported accuracies.
    assert res["oracle_gain"] == pytest.approx(res["oracle"][0] - res["plain"][0])
    assert res["control_gain"] == pytest.approx(res["control"][0] - res["plain"][0])
    assert res["ntp_gap"] == pytest.approx(res["oracle"][0] - res["ntp_test"][0])
    # The most frequent first answer token's share, counted from the oracle's per-item tokens at beta 0.
    first = json.loads((tmp_path / "runs" / "ring_colour" / "ntp_s0" / "screen.json").read_text())["first"][0]
    assert len(first) == 4 and res["top_answer_share"] == [pytest.approx(max(map(first.count, first)) / 4)]
    # The readout's images hold one object and its ring; its exact match is its items' mean.
    rows = load_split(readout_path(repro_cfg(cfg_p), "ring_colour"), "test")
    assert len(rows) == 5 and all(len(json.loads(m)["objects"]) == 1 for m in rows["meta"])
    base = json.loads((tmp_path / "runs" / "ring_colour" / "base" / "readout.json").read_text())
    assert res["readout"]["exact"] == pytest.approx(np.mean([it["exact_tf"] for it in base["items"]]))
    # Reference rows: the question-blind guess is a fill colour of the image, 1 / (objects) on the scored items.
    test = load_split(tmp_path / "data" / "ring_colour_112_fewest_tokens", "test", 4)
    blind = np.mean([1 / len(json.loads(m)["objects"]) for m in test["meta"]])
    assert res["refs"]["question_blind"]["accuracy"] == pytest.approx(blind)
    # A random model cannot read colours: the task fails criterion 1 and the table says so, with its numbers.
    assert not res["verdict"]["passed"] and "readout" in res["verdict"]["failed"]
    md = (tmp_path / "results" / "screen.md").read_text()
    assert "| ring_colour |" in md and "fail: readout" in md and "Dropped (not studied): ring_colour" in md
    assert set(res["readout"]["phrasings"]) == set(toy["screen"]["readout_phrasings"]["ring_colour"])
    # "names the selector" counts greedy answers naming the image's marker colour, also for a phrasing without it.
    marker = [json.loads(m)["query_word"] for m in rows["meta"]]
    for q, got in [(None, res["readout"]), *res["readout"]["phrasings"].items()]:
        its = base["items"] if q is None else base["phrasings"][q]["items"]
        named = [(it["prediction"] or "").strip().split(" ")[0] == k for it, k in zip(its, marker)]
        assert got["names_selector"] == pytest.approx(np.mean(named))
    assert "| ring_colour | Which colour is in the {selector} ring? | 5 |" in md
    preds = [json.loads(x) for x in (tmp_path / "results" / "screen_predictions" / "ring_colour.jsonl").open()]
    parts = ["readout"] + [f"readout: {q}" for q in toy["screen"]["readout_phrasings"]["ring_colour"]]
    assert [p["part"] for p in preds] == [x for x in parts for _ in range(5)] + ["test"] * 4
    assert [p["exact_tf"] for p in preds[15:]] == [it["exact_tf"] for it in items]


def test_rephrase_names_the_selector() -> None:
    from studies.reproduce.screen import _rephrase

    row = {"question": "q", "meta": json.dumps({"query_word": "cyan", "objects": []})}
    named = _rephrase(row, "Which colour is in the {selector} ring?")
    assert (
        named["question"] == "Which colour is in the cyan ring?" and json.loads(named["meta"])["query_word"] == "cyan"
    )
    # A phrasing without the selector drops it from the meta: the collator would look for it in the question.
    plain = _rephrase(row, "What colour is the object?")
    assert plain["question"] == "What colour is the object?" and "query_word" not in json.loads(plain["meta"])


def repro_cfg(path: Path):
    from studies.reproduce.pipeline import load_config

    return load_config(path)
