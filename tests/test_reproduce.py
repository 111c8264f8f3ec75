"""The small-scale reproduction study (bench/reproduce.py, klal/repro.py): its metrics on hand-worked inputs, its run
bookkeeping, and the whole pipeline (data, train, eval, report) at a toy size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from klal.data.collate import IGNORE_INDEX
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


def test_teacher_forced_exact_hand_worked():
    # Vocabulary of 4; labels supervise positions 2 and 3 (predicted from logits at 1 and 2).
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, IGNORE_INDEX, 3, 1]])
    logits = torch.zeros(2, 4, 4)
    logits[:, 1, 3] = 5.0  # both samples predict token 3 after position 1
    logits[0, 2, 1] = 5.0  # sample 0 then predicts 1 (right) ...
    logits[1, 2, 2] = 5.0  # ... sample 1 predicts 2 (wrong at the last supervised position)
    logits[:, 0, 0] = 9.0  # a wrong argmax on an unsupervised position must not count
    assert repro.teacher_forced_exact(logits, labels).tolist() == [True, False]
    # A sample with no supervised token is never counted as right.
    none = torch.full((1, 4), IGNORE_INDEX)
    assert repro.teacher_forced_exact(torch.zeros(1, 4, 4), none).tolist() == [False]


def test_teacher_forced_exact_matches_greedy_decoding(tiny_processor):
    """The one-pass rule agrees with an explicit greedy loop on the (random) tiny model."""
    from PIL import Image

    from klal.data.collate import KLALCollator
    from klal.models.loader import ModelConfig, load_model_and_processor

    model, proc = load_model_and_processor(ModelConfig(max_pixels=112 * 112), processor=tiny_processor)
    col = KLALCollator(proc)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    row = {
        "id": "x",
        "image": img,
        "question": "Where?",
        "answer": "(1, 2)",
        "width": 112,
        "height": 112,
        "evidence": {"boxes": [], "points": [], "polylines": []},
    }
    batch = col([row])
    n_prompt = int((batch["labels"][0] == IGNORE_INDEX).sum())
    ids = batch["input_ids"][:, :n_prompt]
    extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    mm = batch["mm_token_type_ids"][:, :n_prompt]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra).logits
            greedy.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], 1)
            mm = torch.cat([mm, torch.zeros(1, 1, dtype=mm.dtype)], 1)
        # Teacher-force the greedy tokens themselves: every supervised label is the argmax, so exact must be True.
        seq = torch.cat([batch["input_ids"][:, :n_prompt], torch.tensor([greedy])], 1)
        mm_full = torch.cat([batch["mm_token_type_ids"][:, :n_prompt], torch.zeros(1, 3, dtype=mm.dtype)], 1)
        labels = torch.full_like(seq, IGNORE_INDEX)
        labels[0, n_prompt:] = seq[0, n_prompt:]
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=mm_full, **extra).logits
        assert repro.teacher_forced_exact(out, labels).tolist() == [True]
        # Changing the last greedy token to anything else makes it wrong.
        labels[0, -1] = (greedy[-1] + 1) % out.shape[-1]
        assert repro.teacher_forced_exact(out, labels).tolist() == [False]


def test_pointing_and_mass_hand_worked():
    att = np.array([[0.1, 0.5], [0.3, 0.1]])
    cells = np.array([[False, True], [False, False]])
    assert repro.pointing_and_mass(att, cells) == pytest.approx((1.0, 0.5))
    # Scale-free; the peak (0.5) is outside these cells, 0.1 + 0.3 of the mass inside.
    assert repro.pointing_and_mass(att * 4, np.array([[True, False], [True, False]])) == pytest.approx((0.0, 0.4))
    # Two tied peaks, one inside: the expected hit under random tie-breaking.
    assert repro.pointing_and_mass(np.array([[1.0, 1.0], [0.0, 0.0]]), cells)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="do not match"):
        repro.pointing_and_mass(att, np.ones((3, 3), bool))


def test_evidence_cells_on_the_study_grid():
    # 112 px image on a 112 px grid: 4 x 4 cells of 28 px; a box over columns 1-2 of row 0, a point in cell (1, 3).
    ev = {"boxes": [[30.0, 2.0, 60.0, 20.0]], "points": [[85.0, 29.0]], "polylines": []}
    want = np.zeros((4, 4), bool)
    want[0, 1:3] = True
    want[1, 3] = True
    assert (repro.evidence_cells(ev, (112, 112), (112, 112)) == want).all()


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
