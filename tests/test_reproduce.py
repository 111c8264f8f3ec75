"""The small-scale reproduction study (studies/reproduce): its run bookkeeping and the whole pipeline (data, train,
eval, report) at a toy size. Its metrics are the evaluation engine's (tests/test_eval_*.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from studies.reproduce import pipeline as repro

TOY = {
    "image_size": 112,
    "tasks": {"grid_patch": {"num": 24, "preset": "easy", "splits": [0.5, 0.25, 0.25]}},
    "tiny_overrides": {"num_hidden_layers": 2, "vision_depth": 1, "vision_fullatt_block_indexes": [0]},
    "train_extra": ["merger"],
    "steps": 3,
    "batch_size": 2,
    "warmup_steps": 1,
    "seeds": [0, 1],
    "eval_every": 2,
    "curve_samples": 3,
    "test_samples": 4,
    "eval_batch_size": 4,
    "generate": False,
    "sweep_task": "grid_patch",
    "sweep_lambdas": [0.0, 1.0],
    "sweep_queries": ["last", "all"],
    "sweep_seeds": [0],
    "probe_methods": [],
    "probe_seeds": [0],
}


def test_run_bookkeeping_dedupes_sweep_and_main():
    cfg = repro.StudyConfig(**{**TOY, "tasks": {"grid_patch": {}}, "seeds": [0, 1, 2]})
    main = repro.main_runs(cfg)
    assert len(main) == 6  # 1 task x 2 arms x 3 seeds
    sweep = repro.sweep_runs(cfg)
    # lambda 0 is one run whatever the query; lambda 1/last/seed 0 is the main KLAL run.
    assert sweep[(0.0, "last", 0)] == sweep[(0.0, "all", 0)] == main[("grid_patch", "ntp", 0)]
    assert sweep[(1.0, "last", 0)] == main[("grid_patch", "klal", 0)]
    names = [r.name for r in repro.all_runs(cfg)]
    assert len(names) == len(set(names)) == 7  # 6 main + klal/all
    assert "klal_w1_all_s0" in names


def test_config_errors_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"tasks": {"grid_patch": {}}, "stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        repro.load_config(p)
    with pytest.raises(ValueError, match="unknown task"):
        repro.StudyConfig(tasks={"grid_path": {}})
    with pytest.raises(ValueError, match="train_extra"):
        repro.StudyConfig(tasks={"grid_patch": {}}, train_extra=["visual"])
    with pytest.raises(ValueError, match="tasks.grid_patch"):
        repro.StudyConfig(tasks={"grid_patch": {"nums": 3}})


def test_unfreeze_merger_counts_its_parameters():
    cfg = repro.StudyConfig(**{**TOY, "train_extra": []})
    module = repro.build_module(cfg)
    merger = sum(p.numel() for n, p in module.model.named_parameters() if ".visual.merger." in f".{n}")
    before = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert merger > 0 and not any("visual" in n for n in before)
    assert repro.unfreeze(module.model, ["merger"]) == merger
    after = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {n for n in after - before} == {n for n, _ in module.model.named_parameters() if ".merger." in n}


def test_pipeline_toy(tmp_path, monkeypatch):
    """data -> train -> eval -> report on a toy study; a second train pass reuses the finished runs."""
    from studies.reproduce import run as reproduce

    cfg_d = {
        **TOY,
        "data_dir": str(tmp_path / "data"),
        "run_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
    }
    cfg_p = tmp_path / "toy.yaml"
    cfg_p.write_text(yaml.safe_dump(cfg_d))
    table = reproduce.main(["--config", str(cfg_p), "--stages", "data,train,eval,probes,report"])
    res = json.loads((tmp_path / "results" / "results.json").read_text())
    t = res["tasks"]["grid_patch"]
    assert set(t["arms"]) == {"base", "ntp", "klal"}
    for arm in ("ntp", "klal"):
        vals = t["arms"][arm]["exact_tf"]["values"]
        assert len(vals) == 2 and all(0.0 <= v <= 1.0 for v in vals)
        mass = t["arms"][arm]["last/evidence_mass"]
        assert 0.0 <= mass["mean"] <= 1.0 and mass["std"] is not None
        # Learning curve: step 0, every eval_every steps, and the last step.
        assert [p["step"] for p in t["curves"][arm][0]] == [0, 2, 3]
    # The untrained model's answer-token attention is the same for both arms at step 0 (LoRA B starts at zero).
    c0 = {arm: t["curves"][arm][0][0]["evidence_mass"] for arm in ("ntp", "klal")}
    assert math.isclose(c0["ntp"], c0["klal"], rel_tol=1e-5)
    assert set(res["sweep"]) == {"0/last/0", "0/all/0", "1/last/0", "1/all/0"}
    md = table.read_text()
    assert "| grid_patch | NTP + KLAL |" in md and "Sweep on grid_patch" in md
    assert (tmp_path / "results" / "curves.png").stat().st_size > 0
    assert (tmp_path / "results" / "sweep.png").stat().st_size > 0

    # The module's peft adapter lands in the run directory, not the working directory.
    assert (tmp_path / "runs" / "grid_patch" / "ntp_s0" / "lora_adapter" / "adapter_config.json").is_file()

    # Rerunning the train stage skips finished runs (run.json untouched).
    run_json = next((tmp_path / "runs" / "grid_patch").glob("ntp_s0/run.json"))
    before = run_json.stat().st_mtime_ns
    reproduce.main(["--config", str(cfg_p), "--stages", "train"])
    assert run_json.stat().st_mtime_ns == before


def test_load_trained_reads_train_py_adapters(tmp_path):
    """With adapter_pattern (the full-size recipe), runs are read from peft adapters that train.py wrote."""
    cfg = repro.StudyConfig(
        **{**TOY, "train_extra": [], "adapter_pattern": str(tmp_path / "{task}" / "{arm}_s{seed}" / "adapter")}
    )
    spec = repro.main_runs(cfg)[("grid_patch", "klal", 1)]
    assert repro.adapter_path(cfg, spec) == tmp_path / "grid_patch" / "klal_s1" / "adapter"
    with pytest.raises(FileNotFoundError, match="klal_s1"):
        repro.load_trained(cfg, spec)
    trained = repro.build_module(cfg, 1.0, "last", seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in trained.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    trained.model.save_pretrained(str(repro.adapter_path(cfg, spec)))
    loaded = repro.load_trained(cfg, spec)
    want = {n: p for n, p in trained.model.named_parameters() if "lora_" in n}
    got = dict(loaded.model.named_parameters())
    assert want and all(torch.equal(got[n], p) for n, p in want.items())
