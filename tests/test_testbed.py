"""The lookup testbed (configs/testbed/): the paired statistics on hand-worked numbers, and the testbed config run
through the whole study pipeline at a toy size (its arms, sweep, per-seed table and paired tests in the report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from studies.reproduce import pipeline as repro
from studies.reproduce import stats

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "configs" / "testbed" / "lookup.yaml"


def test_sign_flip_hand_worked() -> None:
    # d = 1, 2, 3: of the 8 sign assignments only +++ and --- have |mean| >= 2.
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # Five positive differences: the smallest two-sided p of 5 pairs, 2 / 32.
    assert stats.sign_flip_p([0.1, 0.2, 0.15, 0.05, 0.12]) == pytest.approx(2 / 32)
    # d = 1, -1, 2: |mean| = 2/3; assignments reaching it: (+,-,+), (-,+,+) and mirrors, and (+,+,+)/(-,-,-): 6 / 8.
    assert stats.sign_flip_p([1.0, -1.0, 2.0]) == pytest.approx(6 / 8)


def test_paired_t_hand_worked() -> None:
    # d = 1, 2, 3: mean 2, std 1, t = 2 sqrt(3); with 2 degrees of freedom the t tail has the closed form
    # P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2, so the two-sided p is 1 - t / sqrt(t^2 + 2).
    t = 2 * math.sqrt(3)
    assert stats.paired_t_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert stats.paired_t_p([0.5, 0.5]) == 0.0 and stats.paired_t_p([0.0, 0.0]) == 1.0


def test_sign_test_and_compare_hand_worked() -> None:
    # 3 wins, 1 loss, 1 tie: two-sided binomial p = 2 * P(X >= 3 | n=4) = 2 * 5 / 16.
    assert stats.sign_test_p([1.0, 2.0, 3.0, 0.0, -1.0]) == pytest.approx(10 / 16)
    c = stats.compare([0.1, 0.2, 0.3], [0.2, 0.4, 0.6])
    assert c["diffs"] == pytest.approx([0.1, 0.2, 0.3]) and c["mean_diff"] == pytest.approx(0.2)
    assert (c["wins"], c["losses"], c["ties"]) == (3, 0, 0) and c["std_diff"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same seeds"):
        stats.compare([0.1], [0.2, 0.3])


def test_testbed_config_fixes_design() -> None:
    """The design is fixed in the file: >= 5 seeds, an NTP arm, the four query tokens, a lambda sweep."""
    cfg = repro.load_config(TESTBED)
    assert len(cfg.seeds) >= 5
    arms = [a for a in cfg.arms.values() if a["klal_weight"] > 0]
    queries = {a.get("klal_query", "last") for a in arms} | {s.klal_query for s in repro.extra_runs(cfg)}
    assert queries == {"last", "all", "first", "prompt_last"}
    assert any(a["klal_weight"] == 0 for a in cfg.arms.values())
    assert cfg.sweep_task in cfg.tasks and len({w for w in cfg.sweep_lambdas if w > 0}) >= 3
    assert set(cfg.tasks) <= {"shape_lookup", "colour_lookup", "neighbour_lookup"}


def test_testbed_pipeline_toy(tmp_path: Path) -> None:
    """The testbed config, shrunk to a toy size, through data -> train -> eval -> report."""
    from studies.reproduce import run as reproduce

    raw = yaml.safe_load(TESTBED.read_text())
    task = raw["sweep_task"]
    toy = {
        "data_dir": str(tmp_path / "data"),
        "run_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "image_size": 112,
        "tasks": {task: {**raw["tasks"][task], "num": 16, "splits": [0.5, 0.25, 0.25]}},
        "tiny_overrides": {"num_hidden_layers": 2, "vision_depth": 1, "vision_fullatt_block_indexes": [0]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": "attention"},
        "train_extra": ["merger"],
        "steps": 2,
        "batch_size": 2,
        "warmup_steps": 1,
        "seeds": [0, 1],
        "eval_every": 2,
        "curve_samples": 2,
        "test_samples": 4,
        "eval_batch_size": 4,
        "generate": False,
        "sweep_lambdas": [0.0, 1.0],  # both are main runs: no extra training
        "sweep_seeds": [0],
        "primary": {"arm": "klal", "test": "mcnemar"},
        "answer_render": "fewest_tokens",
        "bootstrap_samples": 200,
        "confirmatory_scan": str(tmp_path),  # a pilot: checked against the confirmatory configs found there (none)
    }
    cfg_p = tmp_path / "toy.yaml"
    cfg_p.write_text(yaml.safe_dump({**raw, **toy}))
    table = reproduce.main(["--config", str(cfg_p), "--stages", "data,train,eval,report"])
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    arms = set(raw["arms"])
    paired = res["paired"][task]
    assert set(paired["per_seed"]) == arms and set(paired["vs"]) == arms - {paired["reference"]}
    for arm, v in paired["vs"].items():
        assert v["seeds"] == [0, 1]
        c = v["exact_tf"]
        assert c["n"] == 2 and 0.0 <= c["p_sign_flip"] <= 1.0 and c["wins"] + c["losses"] + c["ties"] == 2
        # The reported difference is the arm's per-seed values minus the reference's.
        ours = [paired["per_seed"][arm][str(s)]["exact_tf"] for s in (0, 1)]
        ref = [paired["per_seed"][paired["reference"]][str(s)]["exact_tf"] for s in (0, 1)]
        assert c["diffs"] == pytest.approx([o - r for o, r in zip(ours, ref)])
    t = res["tasks"][task]
    assert set(t["curves"]) == arms and all(len(c) == 2 for c in t["curves"].values())
    assert {v["lambda"] for v in res["sweep"].values()} == {0.0, 1.0}
    assert {v["query"] for v in res["extra"]} == {s.klal_query for s in repro.extra_runs(repro.load_config(TESTBED))}
    md = table.read_text()
    assert "Every seed, and paired tests" in md and "p (sign-flip)" in md and "| seed 1 |" in md
    # The protocol's parts: reference rows, per-item predictions and tests, the primary test, the tokenization.
    b = t["baselines"]
    assert b["n_test"] == 4 and b["chance"]["accuracy"] == pytest.approx(1 / b["chance"]["answers"])
    for row in (
        "chance: uniform over",
        f"always `{b['majority']['answer']}`",
        "question-blind, image",
        "question-only",
    ):
        assert f"| {task} | {row}" in md
    lines = [json.loads(x) for x in (tmp_path / "results" / "predictions" / f"{task}.jsonl").read_text().splitlines()]
    assert len(lines) == (1 + len(arms) * 2) * 4  # Base and every arm x seed, 4 test items each
    # fewest_tokens: a leading space where it saves tokens ("blue" = b|l|ue, " blue" one), "red" as it is.
    assert {x["arm"] for x in lines} == {"base", *arms}
    assert {x["gold"] for x in lines} <= {"red", " green", " blue", " yellow"}
    for arm, v in res["items"][task]["vs"].items():
        c = v["exact_tf"]
        mine = [x["exact_tf"] for x in lines if x["arm"] == arm]
        ref = [x["exact_tf"] for x in lines if x["arm"] == res["items"][task]["reference"]]
        # b / c are counted from the saved predictions, pairing the same seed and item.
        assert (c["mcnemar"]["b"], c["mcnemar"]["c"]) == (
            sum(r and not m for r, m in zip(ref, mine)),
            sum(m and not r for r, m in zip(ref, mine)),
        )
    assert res["primary"]["test"] == "mcnemar" and "**Primary test**" in md and "**(primary)**" in md
    assert res["tokens"][task]["tokens"] == {"1": 1.0} and "## Answer tokenization" in md
    assert res["protocol"] == {"confirmatory": False, "checked_against": []} and "Pilot (not confirmatory)" in md
    assert (tmp_path / "results" / "curves.png").stat().st_size > 0
    # The diagnostics read these runs: beta 0 of the oracle is the model as evaluated, the per-layer masses average to
    # the evaluation's all-layer mass (the mass of a mean map is the mean of the masses), every prediction is split.
    from studies.reproduce import diagnose

    md_path = diagnose.main([str(cfg_p)], out=str(tmp_path / "diag"), samples=4)
    d = json.loads((tmp_path / "diag" / "diagnose.json").read_text())
    cfg = repro.load_config(cfg_p)
    assert len(d["runs"]) == len(repro.main_runs(cfg)) + len(repro.extra_runs(cfg))
    for r in d["runs"]:
        spec = next(s for s in [*repro.main_runs(cfg).values(), *repro.extra_runs(cfg)] if s.name == r["run"])
        ev = json.loads((repro.run_path(cfg, spec) / "eval.json").read_text())
        assert r["oracle"]["betas"][0] == 0.0 and r["oracle"]["exact"][0] == pytest.approx(ev["exact_tf"])
        for q in ("prompt_last", "last"):
            assert np.mean(r["layers"][q]) == pytest.approx(ev[f"{q}/evidence_mass"], abs=1e-6)
    split = d["split"][str(cfg_p)]
    assert {arm: sum(v["n"] for v in by_n.values()) for arm, by_n in split.items()} == {a: 2 * 4 for a in arms}
    assert "## Oracle attention" in md_path.read_text() and (tmp_path / "diag" / "diagnose.png").stat().st_size > 0


def test_object_count_split_hand_worked() -> None:
    from studies.reproduce.diagnose import object_count_split

    def row(i: str, colours: list[str]) -> dict:
        return {"id": i, "meta": json.dumps({"objects": [{"colour": c} for c in colours]})}

    rows = [
        row("a", ["red", "green", "blue"]),
        row("b", ["blue", "red", "green", "yellow"]),
        row("c", ["green", "red", "blue"]),
    ]
    preds = [
        {"arm": "ntp", "seed": 0, "id": "a", "prediction": "red", "exact_tf": True},
        {"arm": "ntp", "seed": 0, "id": "c", "prediction": "yellow", "exact_tf": False},  # a colour not in the image
        {"arm": "ntp", "seed": 1, "id": "a", "prediction": " blue", "exact_tf": False},  # present, not asked
        {"arm": "ntp", "seed": 0, "id": "b", "prediction": "(1, 2)", "exact_tf": False},  # no colour at all
        {"arm": "base", "seed": None, "id": "a", "prediction": "red", "exact_tf": True},  # the base is not an arm here
    ]
    got = object_count_split(preds, rows)
    assert set(got) == {"ntp"}
    assert got["ntp"]["3"] == {"n": 3, "accuracy": 1 / 3, "present": 2 / 3, "absent": 1 / 3, "blind": 1 / 3}
    assert got["ntp"]["4"] == {"n": 1, "accuracy": 0.0, "present": 0.0, "absent": 0.0, "blind": 0.25}
