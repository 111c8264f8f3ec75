"""klal.guards on a real Lightning Trainer: the SIGTERM checkpoint and the target-map guard.

The module is a one-weight regression whose batches carry the two keys the guard reads from klal's collator
(``has_target`` and ``no_map_reason``); what the guard decides depends only on those.
"""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from klal.guards import (
    DivergedLossError,
    LossGuard,
    NoTargetMapError,
    SigtermCheckpoint,
    TargetMapGuard,
    check_trains_something,
    remove_unless_checkpointed,
)


class _Rows(Dataset):
    """``n`` samples; sample i has a target map when ``has(i)``, else the reason ``why``."""

    def __init__(self, n: int, has, why: str = "evidence entirely outside the image") -> None:
        self.n, self.has, self.why = n, has, why

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor([float(i)]), "has": bool(self.has(i)), "i": i}


def _collate(why: str):
    def collate(rows: list[dict]) -> dict:
        has = torch.tensor([r["has"] for r in rows])
        return {
            "x": torch.stack([r["x"] for r in rows]),
            "has_target": has,
            "no_map_reason": [None if h else why for h in has.tolist()],
        }

    return collate


class _Module(L.LightningModule):
    def __init__(self, klal_weight: float = 1.0, sigterm_at: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        self.klal_weight = klal_weight
        self.sigterm_at = sigterm_at

    def training_step(self, batch, batch_idx):
        if self.sigterm_at is not None and self.global_step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets a flag; the loop stops after the batch
        return self.w(batch["x"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(
    tmp_path, module, data: _Rows, callbacks, max_steps: int, val: _Rows | None = None, batch: int = 2, collate=_collate
):
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=None if val is not None else 0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    loader = DataLoader(data, batch_size=batch, collate_fn=collate(data.why))
    vloader = DataLoader(val, batch_size=batch, collate_fn=_collate(val.why)) if val is not None else None
    trainer.fit(module, loader, vloader)
    return trainer


def test_guard_stops_a_klal_run_without_any_map(tmp_path):
    guard = TargetMapGuard(check_batches=3)
    with pytest.raises(NoTargetMapError) as exc:
        _fit(tmp_path, _Module(), _Rows(40, lambda i: False), [guard], max_steps=10)
    msg = str(exc.value)
    assert "none of the 6 training samples of the first 3 batches" in msg
    assert "evidence entirely outside the image: 6" in msg and "klal_weight=1" in msg
    assert guard._batches == 3  # stopped at the check, not at the end


def test_guard_checks_the_whole_of_a_shorter_run(tmp_path):
    guard = TargetMapGuard(check_batches=20)
    with pytest.raises(NoTargetMapError, match="first 2 batches"):
        _fit(tmp_path, _Module(), _Rows(40, lambda i: False), [guard], max_steps=2)


def test_guard_lets_a_run_with_some_maps_or_without_klal_go_on(tmp_path, capsys):
    # One map in the third batch is enough; the share is reported at the end (8 steps x 2 samples, one with a map).
    guard = TargetMapGuard(check_batches=3)
    _fit(tmp_path, _Module(), _Rows(40, lambda i: i == 5), [guard], max_steps=8)
    assert guard.samples["train"] == 16 and guard.without["train"] == 15
    text = capsys.readouterr().out
    assert "samples without a target map: train 15/16 (93.8%; evidence entirely outside the image: 15)" in text
    guard = TargetMapGuard(check_batches=2)
    _fit(tmp_path, _Module(klal_weight=0.0), _Rows(8, lambda i: False), [guard], max_steps=4)
    assert guard.without["train"] == 8


def test_guard_counts_validation_but_not_the_sanity_check(tmp_path):
    guard = TargetMapGuard(check_batches=1)
    val = _Rows(6, lambda i: i < 2, why="empty evidence")
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=2,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
        accelerator="cpu",
    )
    train = DataLoader(_Rows(8, lambda i: True), batch_size=2, collate_fn=_collate("x"))
    trainer.fit(_Module(), train, DataLoader(val, batch_size=2, collate_fn=_collate(val.why)))
    # Two validations (steps 2 and 4) of 6 samples, 4 without a map each; the sanity batch is not counted.
    assert (guard.samples["val"], guard.without["val"]) == (12, 8)
    assert guard.summary() == (
        "samples without a target map: train 0/8 (0.0%), validation 8/12 (66.7%; empty evidence: 8)"
    )


def test_sigterm_saves_last_ckpt_at_the_step_reached(tmp_path, capsys):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    saver = SigtermCheckpoint()
    with pytest.raises(SIGTERMException):
        _fit(tmp_path, _Module(sigterm_at=3), _Rows(40, lambda i: True), [ckpt, saver], max_steps=50)
    path = tmp_path / "ckpts" / "last.ckpt"
    assert saver.saved == str(path)
    state = torch.load(path, weights_only=False)
    # SIGTERM arrived during the batch of step 3 (0-based); Lightning finishes that batch, so 4 steps are done.
    assert state["global_step"] == 4
    assert f"SIGTERM: stopped at step 4; saved {path}" in capsys.readouterr().out


def test_sigterm_without_model_checkpoint_goes_to_the_log_dir(tmp_path):
    saver = SigtermCheckpoint()
    with pytest.raises(SIGTERMException):
        _fit(tmp_path, _Module(sigterm_at=1), _Rows(40, lambda i: True), [saver], max_steps=50)
    assert saver.saved is not None and os.path.isfile(saver.saved)
    assert saver.saved.endswith(os.path.join("checkpoints", "last.ckpt"))


def test_other_exceptions_save_nothing(tmp_path):
    saver = SigtermCheckpoint()
    with pytest.raises(NoTargetMapError):
        _fit(tmp_path, _Module(), _Rows(40, lambda i: False), [TargetMapGuard(2), saver], max_steps=10)
    assert saver.saved is None


# -- distinct samples (issue 19: "train 0/1600" counted epochs x samples) --------------------------------------------
def _named_collate(why: str):
    """Batches that name their samples (``ids``), as klal's collator makes them."""
    plain = _collate(why)

    def collate(rows: list[dict]) -> dict:
        return {**plain(rows), "ids": [f"s{r['i']}" for r in rows]}

    return collate


def test_guard_counts_each_named_sample_once(tmp_path, capsys):
    guard = TargetMapGuard(check_batches=2)
    data = _Rows(4, lambda i: i != 0, why="empty evidence")
    _fit(tmp_path, _Module(), data, [guard], max_steps=12, collate=_named_collate)  # 6 epochs of 4: 24 draws
    assert guard.samples["train"] == 4 and guard.without["train"] == 1
    assert "samples without a target map: train 1/4 (25.0%; empty evidence: 1)" in capsys.readouterr().out


# -- a diverging loss -------------------------------------------------------------------------------------------------
class _Exploding(_Module):
    """Loss 2.0, then ``factor`` times more at every step (what too high a learning rate does)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def training_step(self, batch, batch_idx):
        return self.w(batch["x"]).pow(2).mean() * 0 + 2.0 * self.factor**self.global_step


def test_loss_guard_stops_a_diverging_loss_before_its_update(tmp_path):
    module = _Exploding(factor=10.0)
    with pytest.raises(DivergedLossError, match=r"diverging train loss at global step 3 .* loss=2000, over 100 x"):
        _fit(tmp_path, module, _Rows(40, lambda i: True), [LossGuard()], max_steps=10)
    assert module.global_step == 3, "steps 0-2 (2, 20, 200) ran; step 3 (2000 > 100 x 2) was not applied"


def test_loss_guard_lets_ordinary_noise_and_small_losses_pass(tmp_path):
    guard = LossGuard()
    _fit(tmp_path, _Exploding(factor=1.5), _Rows(40, lambda i: True), [guard], max_steps=10)  # 2 .. 77 < 100 x 2
    assert guard.first == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_ratio"):
        LossGuard(max_ratio=1.0)


# -- the run folder ---------------------------------------------------------------------------------------------------
def test_a_run_folder_is_removed_unless_it_holds_a_checkpoint(tmp_path):
    run = tmp_path / "runs" / "klal" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    (run / "checkpoints" / ".last.ckpt.abc.tmp").write_text("partial")  # an interrupted write is no checkpoint
    assert remove_unless_checkpointed(str(tmp_path / "runs")) and not (tmp_path / "runs").exists()
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("whole")
    assert not remove_unless_checkpointed(str(tmp_path / "runs")) and (run / "checkpoints" / "last.ckpt").is_file()


def test_a_fit_that_trains_nothing_is_refused(tmp_path):
    for kwargs, option in (({"max_steps": 0}, "max_steps"), ({"max_epochs": 0}, "max_epochs")):
        trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, **kwargs)
        with pytest.raises(ValueError, match=rf"--trainer.{option} 0 trains nothing"):
            check_trains_something(trainer)
    check_trains_something(L.Trainer(accelerator="cpu", logger=False, max_steps=3, default_root_dir=tmp_path))
