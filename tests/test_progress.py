"""klal.progress (step-counted progress) and klal.noise (third-party console noise), on a real Lightning Trainer."""

from __future__ import annotations

import logging
import re
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from klal.noise import quiet
from klal.progress import StepProgressBar


class _Regression(L.LightningModule):
    """A one-weight model: the progress bar's behaviour does not depend on the model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.w(x), y)
        self.log("train/loss", loss, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.w(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 6) -> DataLoader:
    x = torch.linspace(0, 1, n)[:, None]
    return DataLoader(TensorDataset(x, 2 * x), batch_size=2)


def _fit(tmp_path, bar: StepProgressBar, max_steps: int, val_every: int) -> None:
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(_Regression(), _loader(), _loader())


def test_plain_lines_count_optimizer_steps_across_epochs(tmp_path, capsys):
    """7 steps over 3-batch epochs: lines at steps 2, 4, 6 with step/total and percentage, one per validation, one at
    the end; no epoch counter anywhere."""
    _fit(tmp_path, StepProgressBar(print_every=2, interactive=False), max_steps=7, val_every=3)
    out = capsys.readouterr().out
    steps = [int(m) for m in re.findall(r"^step (\d+)/7 \(\d+%\) loss", out, flags=re.M)]
    assert steps == [2, 4, 6, 7]  # every 2 steps, then the final "done" line at step 7
    assert "step 7/7 (100%)" in out and "done" in out
    assert len(re.findall(r"validation loss", out)) == 2  # validation after epochs 1 and 2 (steps 3 and 6)
    assert "Epoch" not in out
    assert out.splitlines()[0] == "training: 7 optimizer steps"


def test_bar_mode_prints_no_plain_lines(tmp_path, capsys):
    bar = StepProgressBar(print_every=1, interactive=True)
    _fit(tmp_path, bar, max_steps=4, val_every=3)
    out = capsys.readouterr().out
    assert not re.search(r"^step \d+/4 \(", out, flags=re.M)


def test_bad_print_every_names_the_option():
    with pytest.raises(ValueError, match="print_every must be >= 1, got 0"):
        StepProgressBar(print_every=0)


def test_quiet_drops_only_the_named_noise(monkeypatch, caplog):
    monkeypatch.delenv("KLAL_DEBUG", raising=False)
    quiet()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing X")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet()  # re-install the filters after simplefilter reset them
        warnings.warn("`is_gradient_checkpointing` is deprecated.", FutureWarning, stacklevel=1)
        warnings.warn("something the user should see", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]
