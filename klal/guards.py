"""Two callbacks ``train.py`` adds to every run, so that a run loses nothing and fails nothing silently.

:class:`SigtermCheckpoint`: SIGTERM is how schedulers (SLURM, Kubernetes, systemd) stop a job. Lightning notices it
between two batches and raises ``SIGTERMException``, a ``SystemExit`` with status 0, so a stopped run used to exit 0
without a checkpoint newer than the last scheduled one and without an adapter, and ``train.py ... && evaluate.py ...``
went on with nothing. This callback writes ``last.ckpt`` at the step reached into the run's checkpoint folder (the
one ``--ckpt_path last`` resumes from) and says so in one line; ``train.py`` then exits with status 143 (128 +
SIGTERM). See ``docs/checkpoints.md``.

:class:`TargetMapGuard`: a sample whose evidence gives no target map (evidence outside the image, of zero area, no
evidence, no image) trains with next-token loss only. When that is every sample the KLAL term is zero for the whole
run and the only trace was ``train/no_map`` in the CSV. The guard stops a run whose first ``check_batches`` training
batches hold no target map at all while ``klal_weight > 0``, with the reasons the collator gave, and prints at the end
of every run the share of training (and validation) samples without a map.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_SIGTERM = 143
"""Exit status of a run stopped by SIGTERM (128 + 15, what a shell reports for a process killed by it)."""


class NoTargetMapError(ValueError):
    """A KLAL run whose data gives no target map; the message says why (the collator's reasons)."""


def _say(trainer: L.Trainer, text: str) -> None:
    # Through the progress bar when there is one, so a terminal bar is not torn by the line.
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None:
        bar.print(text)
    else:
        print(text, flush=True)


class SigtermCheckpoint(Callback):
    """On SIGTERM, save ``last.ckpt`` at the step reached (see the module docstring).

    Args:
        filename: checkpoint file name, in the folder of the trainer's ``ModelCheckpoint`` (else
            ``<log_dir>/checkpoints``); ``last.ckpt`` is what ``--ckpt_path last`` picks.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.filename = filename
        self.saved: str | None = None

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        """Where the SIGTERM checkpoint goes."""
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None)
        if not folder:
            folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(str(folder), self.filename)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        path = self.checkpoint_path(trainer)
        # Every rank takes part (sharded strategies gather the weights); rank 0 writes, atomically (klal.checkpoint).
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            _say(
                trainer,
                f"SIGTERM: stopped at step {trainer.global_step}; saved {path} (continue with --ckpt_path last); "
                f"exiting with status {EXIT_SIGTERM}",
            )


class TargetMapGuard(Callback):
    """Stop a KLAL run without target maps early; report the share of samples without a map at the end.

    Args:
        check_batches: how many training batches (or all of a shorter run) must pass without any target map, on any
            rank, before the run stops. A few batches of text-only rows or of evidence-free samples are normal; twenty
            in a row at the start of a run are a data mistake.
    """

    def __init__(self, check_batches: int = 20) -> None:
        super().__init__()
        if check_batches < 1:
            raise ValueError(f"TargetMapGuard: check_batches must be >= 1, got {check_batches}")
        self.check_batches = check_batches
        self.samples = {"train": 0, "val": 0}
        self.without = {"train": 0, "val": 0}
        self.reasons: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self._batches = 0
        self._checked = False
        self._reported = False

    # -- counting ------------------------------------------------------------------------------------------------------
    def _count(self, stage: str, batch: Any) -> None:
        has = batch.get("has_target") if isinstance(batch, dict) else None
        if has is None:
            return
        self.samples[stage] += int(has.numel())
        self.without[stage] += int((~has.bool()).sum())
        for reason in batch.get("no_map_reason") or []:
            if reason is not None:
                self.reasons[stage][reason] += 1

    def _check_after(self, trainer: L.Trainer) -> int:
        # The whole of a run shorter than check_batches (in batches, so with gradient accumulation too).
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            return self.check_batches
        return max(1, min(self.check_batches, (total - trainer.global_step) * trainer.accumulate_grad_batches))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_at = self._check_after(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count("train", batch)
        self._batches += 1
        if self._checked or self._batches < getattr(self, "_check_at", self.check_batches):
            return
        self._checked = True
        if not getattr(pl_module, "klal_weight", 0) > 0:
            return
        with_map = torch.tensor(float(self.samples["train"] - self.without["train"]), device=pl_module.device)
        if trainer.world_size > 1:
            with_map = trainer.strategy.reduce(with_map, reduce_op="sum")  # every rank checks at the same batch
        if float(with_map) > 0:
            return
        why = ", ".join(f"{r}: {n}" for r, n in self.reasons["train"].most_common()) or "no reason recorded"
        raise NoTargetMapError(
            f"none of the {self.samples['train']} training samples of the first {self._batches} batches has a target "
            f"map ({why}), so KLAL (klal_weight={pl_module.klal_weight:g}) would train nothing: check the evidence "
            "coordinates (pixels of the stored image, x before y) and the width/height columns, or train with "
            "--model.klal_weight 0"
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._count("val", batch)

    # -- reporting -----------------------------------------------------------------------------------------------------
    def summary(self) -> str | None:
        """``samples without a target map: train 3/40 (7.5%; evidence ...: 3), validation 0/8 (0.0%)``, or None when
        no sample was seen."""
        parts = []
        for stage, name in (("train", "train"), ("val", "validation")):
            n = self.samples[stage]
            if not n:
                continue
            k = self.without[stage]
            reasons = "; ".join(f"{r}: {c}" for r, c in self.reasons[stage].most_common())
            parts.append(f"{name} {k}/{n} ({100 * k / n:.1f}%{'; ' + reasons if reasons else ''})")
        return "samples without a target map: " + ", ".join(parts) if parts else None

    def _report(self, trainer: L.Trainer) -> None:
        if self._reported:
            return
        self._reported = True
        text = self.summary()
        if text and trainer.is_global_zero:
            _say(trainer, text)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            # Totals over all ranks (every rank ends training here); the reasons stay this rank's, so they are dropped.
            counts = torch.tensor(
                [float(self.samples[s]) for s in ("train", "val")] + [float(self.without[s]) for s in ("train", "val")],
                device=pl_module.device,
            )
            counts = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
            self.samples = {"train": int(counts[0]), "val": int(counts[1])}
            self.without = {"train": int(counts[2]), "val": int(counts[3])}
            self.reasons = {"train": Counter(), "val": Counter()}
        self._report(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, NoTargetMapError):
            self._report(trainer)
