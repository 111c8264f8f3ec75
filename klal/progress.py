"""Training progress counted in optimizer steps: a bar on a terminal, a plain line every few steps elsewhere.

Lightning's default bars count batches per epoch. klal's runs are step-limited (``trainer.max_steps``) and usually
cross epochs, so the default shows ``Epoch 9/-2`` and a bar that restarts every epoch; without a terminal (a SLURM log,
``train.py ... | tee``) it also redraws into a column of fragments. :class:`StepProgressBar` shows one bar for the
whole run, ``step N/max_steps``, with the logged loss parts, and when stdout is not a terminal prints one line
``step 120/400 (30%) loss 3.21 ntp 2.10 klal 1.11 | 41 s, ~96 s left`` every ``print_every`` steps and after each
validation. It is added by ``train.py`` unless the config names a progress bar of its own.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


class StepProgressBar(ProgressBar):
    """One progress display for a whole run, in optimizer steps.

    Args:
        print_every: without a terminal, print a line every this many steps (and after each validation).
        keys: logged metrics shown beside the step count, when present (names without the ``train/`` prefix).
        interactive: force the bar (True) or the plain lines (False); default: bar exactly when stdout is a terminal.
    """

    def __init__(
        self,
        print_every: int = 50,
        keys: tuple[str, ...] = ("loss", "ntp", "klal", "target_mass"),
        interactive: bool | None = None,
    ) -> None:
        super().__init__()
        if print_every < 1:
            raise ValueError(f"StepProgressBar: print_every must be >= 1, got {print_every}")
        self.print_every = print_every
        self.keys = keys
        self.interactive = interactive
        self._enabled = True
        self._bar: Any = None
        self._start = 0.0
        self._first_step = 0
        self._shown_step = -1

    # -- the ProgressBar interface -------------------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    # -- what is shown -------------------------------------------------------------------------------------------------
    def total_steps(self, trainer: L.Trainer) -> int | None:
        """The run's last optimizer step: ``max_steps`` when set, else Lightning's estimate (None when unknown)."""
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            est = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - an unsized loader has no estimate; the display then counts up
            return None
        return int(est) if est != float("inf") else None

    def describe(self, trainer: L.Trainer) -> str:
        """The logged values named by ``keys``, formatted ``loss 3.21 ntp 2.10``."""
        metrics = trainer.callback_metrics
        parts = []
        for key in self.keys:
            for name in (f"train/{key}_step", f"train/{key}", key):
                if name in metrics:
                    parts.append(f"{key} {float(metrics[name]):.4g}")
                    break
        return " ".join(parts)

    def _line(self, trainer: L.Trainer, step: int, total: int | None, extra: str = "", train: bool = True) -> str:
        elapsed = time.monotonic() - self._start
        done = step - self._first_step
        head = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        timing = f"{elapsed:.0f} s"
        if total and done > 0 and step < total:
            timing += f", ~{elapsed / done * (total - step):.0f} s left"
        body = " ".join(p for p in (self.describe(trainer) if train else "", extra) if p)
        return f"{head} {body} | {timing}" if body else f"{head} | {timing}"

    def _use_bar(self) -> bool:
        return self.interactive if self.interactive is not None else sys.stdout.isatty()

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_step = self._shown_step = trainer.global_step
        if not self.is_enabled:
            return
        total = self.total_steps(trainer)
        if self._use_bar():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step", dynamic_ncols=True)
        else:
            resumed = f" (resumed at step {trainer.global_step})" if trainer.global_step else ""
            print(f"training: {total if total else '?'} optimizer steps{resumed}", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self.is_enabled or step == self._shown_step:
            return
        if self._bar is not None:
            self._bar.update(step - self._shown_step)
            self._bar.set_postfix_str(self.describe(trainer), refresh=False)
        elif step % self.print_every == 0:
            print(self._line(trainer, step, self.total_steps(trainer)), flush=True)
        self._shown_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking:
            return
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        text = "validation " + " ".join(f"{k[4:]} {v:.4g}" for k, v in sorted(val.items())) if val else "validation"
        if self._bar is not None:
            self._bar.write(f"step {trainer.global_step}: {text}")
        else:
            print(self._line(trainer, trainer.global_step, self.total_steps(trainer), text, train=False), flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.is_enabled and trainer.global_step != self._first_step:
            print(self._line(trainer, trainer.global_step, self.total_steps(trainer), "done"), flush=True)

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)))
        else:
            print(*args, **kwargs)
