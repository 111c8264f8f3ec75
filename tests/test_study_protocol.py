"""The study protocol (studies/reproduce: protocol, baselines, item-level statistics) on hand-worked numbers: McNemar
against the exact binomial, the paired bootstrap, the four reference rows on hand-made rows, answer rendering and
tokenization, the dataset manifest check, and the confirmatory / pilot rules in a temporary git repository."""

from __future__ import annotations

import json
import subprocess
from math import comb
from pathlib import Path

import pytest
import yaml

from studies.reproduce import baselines, protocol, stats
from studies.reproduce import pipeline as repro

LOOKUP = {"num": 12, "splits": [0.5, 0.25, 0.25], "preset": "easy"}


def study(**kw) -> repro.StudyConfig:
    """A study config without the default sweep (whose task, grid_patch, these configs do not have)."""
    return repro.StudyConfig(**{"sweep_task": None, **kw})


# -- statistics over items -------------------------------------------------------------------------------------------
def test_mcnemar_matches_the_exact_binomial_on_a_hand_made_table() -> None:
    # 2 x 2 table over 12 items: both right 3, both wrong 1, reference only 1 (b), arm only 7 (c).
    ref = [True] * 3 + [False] + [True] + [False] * 7
    arm = [True] * 3 + [False] + [False] + [True] * 7
    m = stats.mcnemar([ref], [arm])
    assert (m["n_pairs"], m["b"], m["c"]) == (12, 1, 7)
    # Two-sided exact: 2 * P(X <= 1 | n = 8, 1/2) = 2 * (1 + 8) / 256.
    assert m["p"] == pytest.approx(2 * (comb(8, 0) + comb(8, 1)) / 2**8) and m["p"] == pytest.approx(0.0703125)
    # Pooled over two seeds: the discordant counts add up (b 1 + 2, c 7 + 0), p = 2 * P(X <= 3 | n = 10).
    m2 = stats.mcnemar([ref, [True, True]], [arm, [False, False]])
    assert (m2["n_pairs"], m2["b"], m2["c"]) == (14, 3, 7)
    assert m2["p"] == pytest.approx(2 * sum(comb(10, k) for k in range(4)) / 2**10)
    assert stats.mcnemar([[True, False]], [[True, False]])["p"] == 1.0  # never disagree
    with pytest.raises(ValueError, match="same items"):
        stats.mcnemar([[True]], [[True, False]])


def test_bootstrap_over_items_hand_worked() -> None:
    # Every item gains exactly one: every resample's mean is the observed 1, never as far from it as |1|.
    b = stats.bootstrap_items([[False] * 5], [[True] * 5], samples=200, seed=0)
    assert b["mean_diff"] == 1.0 and (b["ci_low"], b["ci_high"]) == (1.0, 1.0) and b["p"] == pytest.approx(1 / 201)
    # No difference anywhere: p = 1.
    assert stats.bootstrap_items([[True, False]], [[True, False]], samples=50)["p"] == 1.0
    # Item differences 1 and 0 (one seed): resampled means 0, 1/2, 1 with chances 1/4, 1/2, 1/4; |m - 1/2| >= 1/2
    # for 0 and 1, so p -> 1/2; the 95 % interval spans [0, 1].
    b = stats.bootstrap_items([[False, True]], [[True, True]], samples=20000, seed=1)
    assert b["mean_diff"] == 0.5 and b["p"] == pytest.approx(0.5, abs=0.015) and (b["ci_low"], b["ci_high"]) == (0, 1)
    # Seeds are averaged per item: item 0 gains in one of two seeds (+0.5), item 1 in both (+1): mean 0.75.
    b = stats.bootstrap_items([[False, False], [True, False]], [[True, True], [True, True]], samples=10)
    assert b["mean_diff"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one shape"):
        stats.bootstrap_items([[True]], [[True, False]])


# -- reference rows and tokenization ---------------------------------------------------------------------------------
def test_reference_accuracies_on_hand_made_rows() -> None:
    def obj(colour: str, shape: str) -> dict:
        return {"colour": colour, "shape": shape}

    train_q = ["What colour is the star?", "What colour is the star?", "what colour is  the STAR?", "Q circle"]
    train_a = ["red", "blue", "blue", "red"]
    test_q = ["What colour is the star?", "Q circle", "never seen"]
    test_a = ["blue", "green", "red"]
    metas = [
        {"objects": [obj("blue", "star"), obj("red", "circle")]},  # 2 colours present: 1/2
        {"objects": [obj("green", "circle"), obj("red", "star"), obj("blue", "cross"), obj("yellow", "square")]},
        json.dumps({"objects": [obj("red", "star"), obj("red", "circle"), obj("blue", "cross")]}),  # {red, blue}: 1/2
    ]
    r = baselines.reference_accuracies("colour_lookup", train_q, train_a, test_q, test_a, metas)
    assert r["n_test"] == 3
    assert r["chance"] == {"accuracy": 0.5, "answers": 2}  # red, blue seen in training
    # red and blue tie at 2: the first met in training wins; test answers red once.
    assert r["majority"] == {"answer": "red", "accuracy": pytest.approx(1 / 3)}
    # Questions, normalised: "what colour is the star?" -> blue (2 of 3), "q circle" -> red, unseen -> red.
    assert r["question_only"]["accuracy"] == pytest.approx(2 / 3) and r["question_only"]["questions"] == 2
    assert r["question_blind"]["accuracy"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 2) / 3)


def test_question_blind_rules_per_task() -> None:
    blind = {task: rule for task, (_, rule) in baselines.QUESTION_BLIND.items()}
    cells = [[None, {"shape": "star", "colour": "red"}], [{"shape": "cross", "colour": "blue"}, None]]
    assert blind["grid_patch"]({"cells": cells}, "(1, 2)") == 0.5
    assert blind["grid_patch"]({"cells": cells}, "(1, 1)") == 0.0
    crossings = {"crossings": [{"point": [1, 1]}, {"point": [5, 5]}]}
    assert blind["line_intersection"](crossings, "2") == 1.0 and blind["line_intersection"](crossings, "1") == 0.0
    # Nodes A-B-C joined, D alone: connected pairs 3 of 6 = a tie -> 1/2 either way.
    nodes = [{"label": x} for x in "ABCD"]
    tie = {"nodes": nodes, "edges": [{"nodes": ["A", "B"]}, {"nodes": ["B", "C"]}]}
    assert blind["line_tracing"](tie, "Yes") == 0.5
    # Everything joined: 6 of 6 connected -> "Yes".
    full = {"nodes": nodes, "edges": [{"nodes": ["A", "B"]}, {"nodes": ["C", "D"]}, {"nodes": ["B", "C"]}]}
    assert blind["line_tracing"](full, "Yes") == 1.0 and blind["line_tracing"](full, "No") == 0.0
    # Only A-B: 1 of 6 -> "No".
    assert blind["line_tracing"]({"nodes": nodes, "edges": [{"nodes": ["A", "B"]}]}, "No") == 1.0
    assert blind["shape_lookup"]({"objects": [{"shape": "star"}, {"shape": "cross"}]}, "cross") == 0.5


def test_render_answer_and_tokens(tiny_processor) -> None:
    tok = tiny_processor.tokenizer
    # The tiny tokenizer: "blue" = b|l|ue, " blue" one token; "Yes" = Y|es, " Yes" three tokens.
    assert repro.render_answer("blue", "fewest_tokens", tok) == " blue"
    assert repro.render_answer("Yes", "fewest_tokens", tok) == "Yes"
    assert repro.render_answer("Yes", "leading_space", tok) == " Yes"
    assert repro.render_answer("blue", "as_generated", tok) == "blue"
    assert repro.render_answer(" blue", "leading_space", tok) == " blue"  # never a second space


def test_baselines_tokens_and_manifest_check_on_a_generated_dataset(tmp_path: Path, tiny_processor) -> None:
    cfg = study(
        tasks={"colour_lookup": LOOKUP},
        image_size=112,
        data_dir=str(tmp_path / "data"),
        answer_render="fewest_tokens",
    )
    (path,) = repro.make_data(cfg).values()
    assert path.name == "colour_lookup_112_fewest_tokens"
    test = repro.task_split(cfg, "colour_lookup", "test")
    assert len(test) == 3 and all(a.startswith(" ") for a in test["answer"])
    tokens = baselines.answer_tokens(cfg, "colour_lookup", tiny_processor.tokenizer)
    assert tokens["tokens"] == {1: 1.0} and tokens["n_test"] == 3
    assert all(len(a["pieces"]) == 1 and a["pieces"][0].startswith("Ġ") for a in tokens["answers"])
    b = baselines.baselines(cfg, "colour_lookup")
    assert b["n_test"] == 3 and 0.25 <= b["question_blind"]["accuracy"] <= 1 / 3
    # Before the data stage there are no reference rows (a report without the data skips them).
    assert (
        baselines.baselines(study(tasks={"colour_lookup": LOOKUP}, data_dir=str(tmp_path / "none")), "colour_lookup")
        is None
    )
    # Another seed (or another generator setting) must not read this folder.
    other = study(**{**cfg.__dict__, "tasks": {"colour_lookup": {**LOOKUP, "seed": 1}}})
    with pytest.raises(ValueError, match=r"other settings.*seed 0 \(config: 1\)"):
        repro.task_split(other, "colour_lookup", "test")


# -- config rules ----------------------------------------------------------------------------------------------------
def test_confirmatory_config_needs_a_primary_test_and_1000_test_items() -> None:
    big = {"colour_lookup": {"num": 8000, "splits": [0.8, 0.05, 0.15]}}  # 1200 test items
    with pytest.raises(ValueError, match="primary"):
        study(tasks=big, confirmatory=True)
    with pytest.raises(ValueError, match=r">= 1000 test items; tasks.colour_lookup gives 999"):
        study(tasks=big, confirmatory=True, primary={"arm": "klal"}, test_samples=999)
    cfg = study(tasks=big, confirmatory=True, primary={"arm": "klal", "test": "bootstrap"})
    assert repro.primary_task(cfg) == "colour_lookup" and repro.reference_arm(cfg) == "ntp"
    with pytest.raises(ValueError, match="primary.arm 'ntp'"):
        study(tasks=big, primary={"arm": "ntp"})
    with pytest.raises(ValueError, match="primary.task must name"):
        study(tasks={**big, "shape_lookup": {}}, primary={"arm": "klal"})


def test_primary_result_reads_the_declared_test() -> None:
    cfg = study(tasks={"colour_lookup": {}}, primary={"arm": "klal", "test": "sign_flip"})
    paired = {"colour_lookup": {"vs": {"klal": {"exact_tf": stats.compare([0.2, 0.2, 0.2], [0.3, 0.25, 0.4])}}}}
    r = stats.primary_result(cfg, paired, {})
    assert r["p"] == pytest.approx(2 / 8) and r["mean_diff"] == pytest.approx(0.35 / 3) and not r["significant"]
    md = "\n".join(stats.render_primary(r))
    assert "**Primary test**" in md and "sign_flip" in md and "not significant" in md
    assert stats._mark(cfg, "colour_lookup", "klal", "exact_tf", "sign_flip") == " **(primary)**"
    assert stats._mark(cfg, "colour_lookup", "klal", "exact_tf", "t") == ""


# -- git: confirmatory configs and pilots ----------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    import os

    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


CONFIRMATORY = {
    "tasks": {"colour_lookup": {"num": 8000, "splits": [0.8, 0.05, 0.15], "seed": 7}},
    "data_dir": "data/conf",
    "results_dir": "results/conf",
    "confirmatory": True,
    "primary": {"arm": "klal", "test": "mcnemar"},
    "sweep_task": None,
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    (tmp_path / "configs").mkdir()
    return tmp_path


def test_confirmatory_record_in_a_temporary_git_repository(repo: Path, monkeypatch) -> None:
    monkeypatch.chdir(repo)  # the runner resolves results_dir from the working directory, the repository root
    conf = repo / "configs" / "conf.yaml"
    conf.write_text(yaml.safe_dump(CONFIRMATORY))
    cfg = repro.load_config(conf)
    results = repo / cfg.results_dir
    with pytest.raises(ValueError, match="conf.yaml: not committed in git"):
        protocol.confirmatory_record(conf, cfg)
    # Committed together with a result file of the study: refused.
    results.mkdir(parents=True)
    (results / "table.md").write_text("a result\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "config and results together")
    with pytest.raises(ValueError, match=r"already holds result files of the study \(results/conf/table.md\)"):
        protocol.confirmatory_record(conf, cfg)
    # Committed alone (the results removed first), then results added in a later commit: accepted, and the record
    # names the config's blob and its commit, not the later one.
    _git(repo, "rm", "-rq", "results")
    conf.write_text(conf.read_text() + "# design fixed\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "design")
    design = _git(repo, "rev-parse", "HEAD")
    results.mkdir(parents=True)
    (results / "table.md").write_text("a result\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "results")
    rec = protocol.confirmatory_record(conf, cfg)
    assert rec["commit"] == design and rec["blob"] == _git(repo, "hash-object", str(conf))
    assert rec["config"] == "configs/conf.yaml"
    # Changed since its commit: refused; a command-line override: refused.
    conf.write_text(conf.read_text() + "# later edit\n")
    with pytest.raises(ValueError, match="changed since its last commit"):
        protocol.confirmatory_record(conf, cfg)
    _git(repo, "checkout", "-q", "--", "configs/conf.yaml")
    changed = repro.load_config(conf, {"steps": 10})
    with pytest.raises(ValueError, match="the command line changes steps"):
        protocol.confirmatory_record(conf, changed, given=cfg)


def test_pilots_keep_off_the_confirmatory_data(repo: Path) -> None:
    (repo / "configs" / "conf.yaml").write_text(yaml.safe_dump(CONFIRMATORY))
    (repo / "configs" / "train.yaml").write_text("trainer: {max_steps: 3}\n")  # not a study config: ignored
    scan = str(repo / "configs")
    same_seed = study(tasks={"colour_lookup": {"seed": 7}}, data_dir="data/pilot", confirmatory_scan=scan)
    with pytest.raises(ValueError, match=r"pilot p.yaml: tasks.colour_lookup.seed 7 is the data seed of confirmatory"):
        protocol.check_pilot("p.yaml", same_seed)
    same_dir = study(tasks={"colour_lookup": {"seed": 8}}, data_dir="data/conf", confirmatory_scan=scan)
    with pytest.raises(ValueError, match="the dataset folder of confirmatory config"):
        protocol.check_pilot("p.yaml", same_dir)
    ok = study(tasks={"colour_lookup": {"seed": 8}}, data_dir="data/pilot", confirmatory_scan=scan)
    assert protocol.check_pilot("p.yaml", ok) == [str(repo / "configs" / "conf.yaml")]
    other_task = study(tasks={"grid_patch": {"seed": 7}}, confirmatory_scan=scan, sweep_task="grid_patch")
    assert protocol.protocol_record("p.yaml", other_task) == {"confirmatory": False, "checked_against": []}


def test_the_runner_refuses_an_uncommitted_confirmatory_config_in_one_line(tmp_path: Path, capsys) -> None:
    from studies.reproduce.run import main

    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump({**CONFIRMATORY, "confirmatory_scan": str(tmp_path)}))
    with pytest.raises(SystemExit) as e:
        main(["--config", str(conf), "--stages", "report"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m studies.reproduce: error: confirmatory config {conf}: ")
    # A confirmatory study's size rule names the config file too.
    conf.write_text(yaml.safe_dump({**CONFIRMATORY, "test_samples": 10}))
    with pytest.raises(SystemExit):
        main(["--config", str(conf), "--stages", "report"])
    assert f"error: {conf}: repro config: a confirmatory study scores >= 1000" in capsys.readouterr().err
