"""The GroundingProbes callback (klal.callbacks) in real Lightning runs on the tiny model: metrics and pictures logged,
every registered method probed, text-only rows left out of the probe subset, images reaching TensorBoard and W&B."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from klal.grounding import available_methods
from tests.eval_data import QUICK_OPTIONS, REPO

pytest_plugins = ["tests.eval_data"]


def test_probe_images_reach_tensorboard(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from klal.callbacks import _log_image

    png = tmp_path / "gallery.png"
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[5:10, 20:30] = (255, 0, 0)
    Image.fromarray(pixels).save(png)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    _log_image(trainer, "probe/answer attention", png, step=7)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("probe/answer attention")
    assert event.step == 7 and (event.width, event.height) == (40, 30)
    import io

    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, pixels)


def run_with_probes(tmp_path: Path, data: str, *flags: str, stage: str = "fit"):
    """``train.py STAGE`` of the demo config on ``data`` with GroundingProbes every 2 steps on 2 rows (more ``flags``
    after those, e.g. the steps); returns the LightningCLI."""
    import train

    return train.main(
        [
            stage,
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--data.paths",
            f"[{data}]",
            "--data.generate",
            "null",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.callbacks+",
            "klal.callbacks.GroundingProbes",
            "--trainer.callbacks.every_n_steps",
            "2",
            "--trainer.callbacks.num_samples",
            "2",
            *flags,
        ]
    )


def test_probe_callback_logs_metrics_and_pictures(tmp_path, task_data):
    steps = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    cli = run_with_probes(tmp_path, task_data["grid_patch"], *steps)
    probes = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GroundingProbes")
    steps = [h["step"] for h in probes.history]
    assert steps[:1] == [2] and 4 in steps
    key = "probe/answer attention/grid_patch/evidence_mass"
    assert all(0.0 <= h[key] <= 1.0 for h in probes.history)
    pngs = list(Path(tmp_path).rglob("probes/step_2/gallery_answer_attention.png"))
    assert pngs and pngs[0].stat().st_size > 1000
    # probing leaves the trained weights trainable and without stray gradients from the probes
    assert any(p.requires_grad for p in cli.model.model.parameters())
    assert cli.model.model.training


def test_probe_images_reach_wandb_offline(tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from klal.callbacks import _log_image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    png = tmp_path / "gallery.png"
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[5:10, 20:30] = (0, 0, 255)
    Image.fromarray(pixels).save(png)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="klal-test")
    trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    _log_image(trainer, "probe/answer attention", png, step=3)
    logger.experiment.finish()
    (stored,) = (tmp_path / "wandb").glob("offline-run-*/files/media/images/probe/answer attention_*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(stored).convert("RGB")), pixels)


def test_probe_subset_leaves_out_text_only_rows(mixed_data):
    import lightning as L

    from klal.callbacks import GroundingProbes
    from klal.data.io import load_split

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    images = list(load_split(mixed_data["image_only"], "test"))
    probes = GroundingProbes(data=mixed_data["mixed"], split="test", num_samples=3)
    # The first 3 image rows sit among rows 0-5 of the split; rows 0, 3 and 4 before them are text-only.
    with pytest.warns(UserWarning, match=r"skipped 3 text-only row\(s\) of .*mixed \[test\].*probing 3 image row"):
        probes.setup(trainer, None, "fit")
    assert [r["id"] for r in probes.rows] == [r["id"] for r in images[:3]]
    assert probes.text_only_skipped == 3
    # Fewer image rows than asked for: all of them, and every text row counted.
    probes = GroundingProbes(data=mixed_data["mixed"], split="test", num_samples=10)
    with pytest.warns(UserWarning, match=r"skipped 4 text-only row\(s\)"):
        probes.setup(trainer, None, "fit")
    assert [r["id"] for r in probes.rows] == [r["id"] for r in images]
    # A split without any image is refused, naming it.
    probes = GroundingProbes(data=mixed_data["text_only"], split="validation", num_samples=2)
    with pytest.raises(ValueError, match=r"GroundingProbes: .*text_only \[validation\] has no row with an image"):
        probes.setup(trainer, None, "fit")


def test_probe_callback_on_a_validation_split_with_text_rows(tmp_path, mixed_data):
    """Through the datamodule (train.py validate): the subset is the first image rows of the validation split, the
    warning names the dataset and split, and the probe scores only those rows."""
    with pytest.warns(UserWarning, match=r"skipped 3 text-only row\(s\) of .*mixed \[validation\]"):
        flags = ["--trainer.callbacks.num_samples", "3", "--trainer.callbacks.gallery_size", "0"]
        cli = run_with_probes(tmp_path, mixed_data["mixed"], *flags, stage="validate")
    from klal.data.io import load_split

    probes = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GroundingProbes")
    # The validation split holds the test rows (ids suffixed "-val"): its first 3 image rows are the image-only set's
    # first 3.
    first = load_split(mixed_data["image_only"], "test", 3)["id"][:]
    assert [r["id"] for r in probes.rows] == [f"{i}-val" for i in first]
    (record,) = [json.loads(p.read_text()) for p in Path(tmp_path).rglob("probes/step_0/metrics.json")]
    assert record["samples"] == [r["id"] for r in probes.rows]
    assert record["text_only_skipped"] == 3
    assert record["scores"]["answer attention"]["grid_patch"]["evidence_mass"]["count"] == 3


def test_probe_callback_runs_every_registered_method(tmp_path, task_data):
    """Every registered method, localization_heads included (it needs prepare() before its first row), probes the
    model in a short fit and logs its grounding metrics."""
    options = QUICK_OPTIONS
    assert set(options) == set(available_methods())  # a newly registered method must be added here
    methods = [{"name": name, "options": opts} for name, opts in options.items()]
    flags = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.callbacks.gallery_size", "0"]
    cli = run_with_probes(tmp_path, task_data["grid_patch"], *flags, "--trainer.callbacks.methods", json.dumps(methods))
    probes = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GroundingProbes")
    assert [h["step"] for h in probes.history] == [2]
    (record,) = [json.loads(p.read_text()) for p in Path(tmp_path).rglob("probes/step_2/metrics.json")]
    for name in options:
        scores = record["scores"][name]["grid_patch"]
        # Both probe rows have box evidence and every method gives a map for each.
        assert scores["evidence_mass"]["count"] == 2, name
        assert 0.0 <= probes.history[0][f"probe/{name}/grid_patch/evidence_mass"] <= 1.0, name
