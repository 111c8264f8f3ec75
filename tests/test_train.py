"""train.py end to end: every config parses, fit runs from main(argv) (with gradient checkpointing), and 2-process
DDP on CPU (gloo) runs through the same command line users type."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Imported at collection (train.py imports it only when it runs): Lightning's console handler binds the sys.stderr of
# the moment, which must not be a test's captured, later closed, stream.
import klal.train_cli  # noqa: F401
import train
from tests.conftest import HANG_S

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses_and_names_its_command(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python "), f"{path.name} must start with the command that runs it"
    if "train.py" not in first:
        pytest.skip("not a train.py config")
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["klal_weight"] >= 0
    assert cfg["model"]["backbone"]["name_or_path"]
    # Every run can be resumed: last.ckpt is written periodically, not only at the end (issue 19, item 2).
    checkpoints = [
        c["init_args"] for c in cfg["trainer"].get("callbacks") or [] if c["class_path"].endswith("ModelCheckpoint")
    ]
    assert any(
        c.get("save_last") and ((c.get("every_n_train_steps") or 0) > 0 or c.get("train_time_interval"))
        for c in checkpoints
    ), f"{path.name}: no ModelCheckpoint that saves last.ckpt every N steps or minutes"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset

    out = tmp_path_factory.mktemp("data") / "gp"
    generate_dataset(
        build_task("grid_patch", preset="easy", overrides={"image_size": 112}),
        num=24,
        seed=0,
        out=str(out),
        workers=1,
        progress=False,
    )
    return str(out)


def _flags(tmp_path: Path, data: str, steps: int = 4) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--data.generate",
        "null",
        "--data.paths",
        f"[{data}]",
        "--data.batch_size",
        "2",
    ]


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "grad_ckpt"])
def test_train_main_fit_end_to_end(tmp_path, tiny_dataset, grad_ckpt):
    cli = train.main(["fit", *_flags(tmp_path, tiny_dataset), "--model.gradient_checkpointing", str(grad_ckpt).lower()])
    assert cli.trainer.global_step == 4
    log_dir = Path(cli.trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "metrics.csv").read_text().splitlines()))
    logged = {k for r in rows for k, v in r.items() if v}
    for name in (
        "train/loss_step",
        "train/ntp_step",
        "train/klal_step",
        "train/target_mass_step",
        "val/loss",
        "val/ntp",
        "val/klal",
        "val/target_mass",
        "val/no_map",
    ):
        assert name in logged, name
    assert (log_dir / "config.yaml").exists(), "the resolved config is saved with the run"
    assert (log_dir / "adapter" / "adapter_config.json").exists()
    ckpts = list(log_dir.rglob("*.ckpt"))
    assert ckpts


def _fit_two_process_ddp(tmp_path: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    """``train.py fit`` for 3 steps as 2 CPU processes (DDP over gloo), the command line users type; fails the test
    with the run's stderr when it does not exit cleanly."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        *_flags(tmp_path, data, steps=3),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_train_two_process_ddp_on_cpu(tmp_path, tiny_dataset):
    proc = _fit_two_process_ddp(tmp_path, tiny_dataset)
    metrics = list(Path(tmp_path).rglob("metrics.csv"))
    assert metrics, proc.stderr[-2000:]
    rows = list(csv.DictReader(metrics[0].read_text().splitlines()))
    assert any(r.get("train/klal_step") for r in rows)


@pytest.mark.slow
def test_grounding_probes_under_two_process_ddp_equal_one_process(tmp_path, tiny_dataset):
    """GroundingProbes in a 2-process DDP run (gloo): each rank probes its share of the subset and the metrics are
    synced, so what rank 0 logs at step 3 equals one process probing the whole subset with the weights of step 3."""
    import json

    import datasets

    from klal.eval.metrics import GroundingMetrics
    from klal.grounding import GroundingModel, build_method
    from klal.models.loader import ModelConfig

    n = 3  # rank 0 probes rows 0 and 2, rank 1 row 1: uneven shares, so a mean of rank means would differ
    val = datasets.load_from_disk(tiny_dataset)["validation"]
    assert len(val) >= n
    _fit_two_process_ddp(
        tmp_path,
        tiny_dataset,
        "--trainer.callbacks+",
        "klal.callbacks.GroundingProbes",
        "--trainer.callbacks.every_n_steps",
        "3",
        "--trainer.callbacks.num_samples",
        str(n),
        "--trainer.callbacks.at_validation_end",
        "false",
    )
    (csv_path,) = Path(tmp_path).rglob("metrics.csv")
    log_dir = csv_path.parent
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    logged = {k: float(v) for r in rows if r.get("step") == "3" for k, v in r.items() if k.startswith("probe/") and v}
    assert logged, f"no probe metrics at step 3 in {csv_path}"
    record = json.loads((log_dir / "probes" / "step_3" / "metrics.json").read_text())
    assert record["world_size"] == 2
    assert record["samples"] == val["id"][:n]

    # The same probe in one process: the base model as evaluate.py loads it, plus the adapter saved at train end
    # (the probe at step 3 ran after the last optimizer step, so it saw these weights).
    backbone = yaml.safe_load((log_dir / "config.yaml").read_text())["model"]["backbone"]
    gm = GroundingModel.load(ModelConfig(**backbone), adapter=str(log_dir / "adapter"))
    method = build_method("attention_probe", query="answer_last")
    metrics = GroundingMetrics()
    for row in val.select(range(n)):
        metrics.update_result("answer attention", method.run(gm, row), row)
    scores = metrics.compute()
    expected = GroundingMetrics.flatten(scores, "probe")
    # The same metrics were scored (same sample counts after the sync), with the same values.
    assert set(logged) == set(expected)
    assert {"evidence_mass", "pointing_game", "target_kl"} <= {k.rsplit("/", 1)[1] for k in logged}
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for task, ms in scores["answer attention"].items():
        for name, s in ms.items():
            synced = record["scores"]["answer attention"][task][name]
            assert (synced["count"], synced["skipped"]) == (s["count"], s["skipped"]), (task, name)
            assert synced["value"] == pytest.approx(s["value"], rel=1e-5, abs=1e-6), (task, name)
    assert scores["answer attention"]["grid_patch"]["evidence_mass"]["count"] == n


def _versions(root: Path, name: str) -> list[str]:
    return sorted(p.name for p in (root / name).iterdir() if p.is_dir())


def test_resume_last_continues_its_own_run_and_refuses_other_settings(tmp_path, tiny_dataset, capsys):
    """``--ckpt_path last`` resumes the run's own logger version (not a newer run under the same root), appends to its
    metrics.csv, and refuses changed hyperparameters or model options unless allowed."""
    root = tmp_path / "runs"

    def fit(name: str, steps: int, *extra: str):
        flags = _flags(root, tiny_dataset, steps=steps)
        return train.main(["fit", *flags, "--trainer.logger.init_args.name", name, *extra])

    fit("klal", 2)
    fit("ntp", 2, "--model.klal_weight", "0")  # newer, same root: "last" used to pick this one
    cli = fit("klal", 4, "--ckpt_path", "last")
    assert cli.trainer.global_step == 4
    assert Path(cli.trainer.log_dir) == root / "klal" / "version_0" and _versions(root, "klal") == ["version_0"]
    rows = list(csv.DictReader((root / "klal" / "version_0" / "metrics.csv").read_text().splitlines()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert steps == [0, 1, 2, 3], "one curve in one file, each step once"

    def refused(match: str, *extra: str) -> None:
        # A refused resume is a user mistake: one line "PROG: error: ..." and exit status 2 (klal.cli).
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            fit("klal", 6, "--ckpt_path", "last", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(match, err) and "Traceback" not in err, err[-3000:]

    refused(
        r"resuming checkpoint .*klal_weight 1.0 in the checkpoint vs 0.5 now.*--allow_changed_hparams",
        *("--model.klal_weight", "0.5"),
    )
    refused(r"optim .*'lr': 0.002.* in the checkpoint vs .*'lr': 0.001", "--model.optim.lr", "1e-3")
    refused(r"data.batch_size 2 in the checkpoint vs 4 now", "--data.batch_size", "4")
    # Model options are never replaced silently by the checkpoint's, nor accepted when they differ.
    refused(
        r"backbone .*'max_pixels': 50176.* vs .*'max_pixels': 12544",
        *("--model.backbone.max_pixels", "12544", "--allow_changed_hparams", "true"),
    )
    cli = fit("klal", 6, "--ckpt_path", "last", "--model.klal_weight", "0.5", "--allow_changed_hparams", "true")
    assert cli.trainer.global_step == 6 and cli.model.klal_weight == 0.5
    assert _versions(root, "klal") == ["version_0"]
