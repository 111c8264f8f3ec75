"""The study config (studies.reproduce.pipeline.StudyConfig) read by jsonargparse: every shipped YAML loads typed, the
fingerprint of the typed settings equals the one of the YAML mappings, and mistakes name the key."""

from __future__ import annotations

import dataclasses
import glob
import json

import pytest
import yaml

from klal.data.targets import TargetSpec
from klal.models.lora import LoraSettings
from studies.reproduce import pipeline as repro
from studies.reproduce.run import main


def read_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


STUDY_YAMLS = sorted(p for p in glob.glob("configs/repro/*.yaml") if "tasks" in read_yaml(p))


def test_the_shipped_study_yamls_are_found():
    assert {"configs/repro/small.yaml", "configs/repro/target_shape.yaml"} <= set(STUDY_YAMLS)


@pytest.mark.parametrize("path", STUDY_YAMLS)
def test_every_study_yaml_loads_typed(path):
    raw = read_yaml(path)
    cfg = repro.load_config(path)
    assert isinstance(cfg.lora, LoraSettings) and isinstance(cfg.target, TargetSpec)
    assert all(isinstance(t, repro.TaskSettings) for t in cfg.tasks.values()) and list(cfg.tasks) == list(raw["tasks"])
    for key, value in (raw.get("lora") or {}).items():
        assert getattr(cfg.lora, key) == value, key
    for key, value in (raw.get("target") or {}).items():
        assert getattr(cfg.target, key) == value, key
    for e, r in zip(cfg.extra_runs, raw.get("extra_runs") or [], strict=True):
        assert isinstance(e, repro.ExtraRun) and all(getattr(e, k) == v for k, v in r.items())
    for name, t in raw["tasks"].items():
        if "splits" in (t or {}):
            assert cfg.tasks[name].splits == tuple(t["splits"])  # a YAML list becomes the field's tuple


def test_fingerprint_keeps_the_yaml_mappings():
    # Runs trained when lora/target were plain mappings must still be recognised as finished.
    cfg = repro.load_config("configs/repro/target_shape.yaml")
    raw = read_yaml("configs/repro/target_shape.yaml")
    spec = repro.all_runs(cfg)[0]
    fp = json.loads(repro._fingerprint(cfg, spec))
    assert fp["lora"] == raw["lora"] and fp["target"] == raw["target"]
    assert "target" not in json.loads(repro._fingerprint(repro.load_config("configs/repro/small.yaml"), spec))


def test_python_mappings_are_typed_like_the_yaml():
    cfg = repro.StudyConfig(
        tasks={"grid_patch": {"splits": [0.5, 0.25, 0.25]}}, lora={"r": 4}, target={"combine": "kind"}
    )
    assert cfg.tasks["grid_patch"].splits == (0.5, 0.25, 0.25)
    # The keys a mapping leaves out keep the study's defaults, as when the YAML is read (next test).
    assert cfg.lora == LoraSettings(r=4, alpha=32, dropout=0.0) and cfg.target == TargetSpec(combine="kind")
    with pytest.raises(ValueError, match=r"repro config: lora: unknown key 'rank'; known keys: r, alpha"):
        repro.StudyConfig(tasks={"grid_patch": {}}, lora={"rank": 4})
    with pytest.raises(ValueError, match=r"repro config: target: box_mode: Expected a typing.Literal"):
        repro.StudyConfig(tasks={"grid_patch": {}}, target={"box_mode": "disc"})
    with pytest.raises(ValueError, match=r"repro config: tasks.grid_patch: splits: Expected a tuple with 3 elements"):
        repro.StudyConfig(tasks={"grid_patch": {"splits": [0.5, 0.5]}})


def test_load_config_errors_name_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"tasks": {"grid_patch": {}}, "extra_runs": [{"klal_qeury": "last"}]}))
    with pytest.raises(ValueError, match=r"c\.yaml: .*klal_qeury"):
        repro.load_config(p)
    cfg = repro.load_config("configs/repro/small.yaml", {"steps": 7, "lora": {"r": 2}})
    assert cfg.steps == 7 and cfg.lora == LoraSettings(r=2, alpha=32, dropout=0.0)  # the other keys: the defaults


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--stages", "train,evaluate"], "--stages: unknown ['evaluate']"),
        (["--set", "stepz=1"], "--set stepz: unknown field"),
        (["--lora.r", "x"], "--lora.r: Expected a <class 'int'>"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--shard", "2/2"], "--shard '2/2'"),
        (["--jobs", "0"], "--jobs"),
    ],
)
def test_study_cli_mistakes_are_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["--config", "configs/repro/small.yaml", *args], prog="study")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("study: error: ") and needle in err[0], err


def test_study_cli_options_override_the_yaml(monkeypatch):
    seen = {}

    def record(cfg, run, stages, shard, argv, config_path):
        seen.update(cfg=cfg, run=run, stages=stages, shard=shard, config=config_path)

    monkeypatch.setattr("studies.reproduce.run._run_stages", record)
    main(["--config", "configs/repro/small.yaml", "--stages", "report", "--set", "steps=9", "--lora.r=4",
          "--shard", "1/2", "--force", "--batch-size", "3"])  # fmt: skip
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.batch_size, cfg.lora.r, cfg.lora.alpha) == (9, 3, 4, 32)  # alpha from the YAML
    assert seen["run"].force is True and seen["stages"] == ["report"] and seen["shard"] == (1, 2)
    assert seen["config"] == "configs/repro/small.yaml"
    assert dataclasses.asdict(cfg.tasks["grid_patch"]) == dataclasses.asdict(
        repro.load_config(seen["config"]).tasks["grid_patch"]
    )
