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
of every run the share of distinct training (and validation) samples without a map (a sample seen in several epochs
or validation runs counts once).

:class:`LossGuard`: a NaN or infinite loss stops a run (:mod:`klal.module`), but a learning rate that is too high can
drive the loss to 1e12 while it stays finite; such a run used to finish with exit status 0 and write its adapter. The
guard stops a training loss that grows far past the run's first one, before that batch updates the weights.

The run-folder helpers (:func:`new_run_dir`, :func:`remove_unless_checkpointed`) let ``train.py`` leave nothing
behind when a command fails, and :func:`check_trains_something` refuses a run that would train nothing.
"""

from __future__ import annotations

import math
import os
import shutil
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
        # stage -> sample key -> why it has no map (None: it has one). The key is the sample id where the batch
        # names its samples (klal's collator does), so a sample seen in several epochs counts once; else every
        # sample seen gets its own key.
        self.seen: dict[str, dict[str, str | None]] = {"train": {}, "val": {}}
        self._unnamed = 0
        self._batches = 0
        self._checked = False
        self._reported = False

    @property
    def samples(self) -> dict[str, int]:
        """Distinct samples seen, per stage (``train``, ``val``)."""
        return {stage: len(seen) for stage, seen in self.seen.items()}

    @property
    def without(self) -> dict[str, int]:
        """Distinct samples seen without a target map, per stage."""
        return {stage: sum(r is not None for r in seen.values()) for stage, seen in self.seen.items()}

    @property
    def reasons(self) -> dict[str, Counter]:
        """Why the samples without a map have none, per stage (counts of distinct samples)."""
        return {stage: Counter(r for r in seen.values() if r is not None) for stage, seen in self.seen.items()}

    # -- counting ------------------------------------------------------------------------------------------------------
    def _count(self, stage: str, batch: Any) -> None:
        has = batch.get("has_target") if isinstance(batch, dict) else None
        if has is None:
            return
        flags = has.bool().tolist()
        reasons = list(batch.get("no_map_reason") or [None] * len(flags))
        ids = batch.get("ids")
        if ids is None or len(ids) != len(flags):
            ids = [f"#{self._unnamed + i}" for i in range(len(flags))]
            self._unnamed += len(flags)
        for key, has_map, reason in zip(ids, flags, reasons):
            self.seen[stage][str(key)] = None if has_map else (reason or "no reason recorded")

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
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The samples of all ranks (every rank ends training here); a sample two ranks saw counts once.
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self.seen)
            for other in gathered:
                for stage, seen in (other or {}).items():
                    self.seen[stage].update(seen)
        self._report(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, NoTargetMapError):
            self._report(trainer)


# -- a diverging loss -------------------------------------------------------------------------------------------------
class DivergedLossError(FloatingPointError):
    """A training loss that grew far past the run's first one (raised by :class:`LossGuard`); names step and loss."""


class LossGuard(Callback):
    """Stop a run whose training loss diverges, before the diverging batch updates the weights.

    Every training loss is compared with the first one this run computed (after a resume: the first resumed step's).
    The run stops when a loss exceeds ``max_ratio x max(first loss, 1.0)``: a KLAL or next-token loss that grows a
    hundredfold has diverged (too high a learning rate, broken data), while the floor of 1.0 keeps a run that starts
    near zero loss from being stopped by ordinary batch-to-batch noise. Under DDP the compared loss is the global
    batch's (one all-reduce of a scalar per step), so every rank stops together; with gradient accumulation it is the
    micro-batch's loss before Lightning divides it by the accumulation count.

    Args:
        max_ratio: how many times the first loss (at least 1.0) a loss may reach; must be > 1.
    """

    def __init__(self, max_ratio: float = 100.0) -> None:
        super().__init__()
        if not (math.isfinite(max_ratio) and max_ratio > 1):
            raise ValueError(f"LossGuard: max_ratio must be a finite number > 1, got {max_ratio}")
        self.max_ratio = float(max_ratio)
        self.first: float | None = None
        self._ids: Any = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ids = batch.get("ids") if isinstance(batch, dict) else None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach().float() * trainer.accumulate_grad_batches
        if trainer.world_size > 1:
            value = trainer.strategy.reduce(value, reduce_op="sum")  # each rank's loss is its share of the global mean
        current = float(value)
        if not math.isfinite(current):
            return  # klal.module stops non-finite losses itself, naming the rank and samples
        if self.first is None:
            self.first = current
            return
        limit = self.max_ratio * max(self.first, 1.0)
        if current <= limit:
            return
        lr = getattr(getattr(pl_module, "optim", None), "lr", None)
        advice = f"lower --model.optim.lr (now {lr:g})" if lr is not None else "lower the learning rate"
        raise DivergedLossError(
            f"diverging train loss at global step {trainer.global_step} (optimizer steps done; this batch's update "
            f"was not applied): loss={current:.4g}, over {self.max_ratio:g} x max(first loss {self.first:.4g}, 1) = "
            f"{limit:.4g}; {advice} or check the data; batch sample ids: {self._ids}"
        )


# -- the run folder ---------------------------------------------------------------------------------------------------
def check_trains_something(trainer: L.Trainer) -> None:
    """Refuse a ``fit`` that would end at once with nothing trained and no adapter (``max_steps`` or ``max_epochs``
    0, ``limit_train_batches`` 0).

    Raises:
        ValueError: naming the option.
    """
    for option, value in (
        ("trainer.max_steps", trainer.max_steps),
        ("trainer.max_epochs", trainer.max_epochs),
        ("trainer.limit_train_batches", trainer.limit_train_batches),
    ):
        if value is not None and value == 0:
            raise ValueError(
                f"--{option} 0 trains nothing (no step, no adapter); give a positive value (max_steps -1 with "
                "max_epochs N trains N epochs)"
            )


def new_run_dir(trainer: L.Trainer) -> str | None:
    """The outermost folder that this command's run folder (``trainer.log_dir``) will create, or None when the run
    folder already exists (a resumed run, a version given explicitly) or is not local."""
    log_dir = trainer.log_dir
    if not log_dir or "://" in str(log_dir):
        return None
    path = os.path.abspath(str(log_dir))
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def _holds_checkpoint(folder: str) -> bool:
    return any(n.endswith(".ckpt") for _, dirs, files in os.walk(folder) for n in (*files, *dirs))


def remove_unless_checkpointed(folder: str) -> bool:
    """Delete ``folder`` (a run folder this command created) unless a checkpoint (``*.ckpt``) was saved in it;
    returns whether it was deleted. Temporary files of an interrupted checkpoint write (``.last.ckpt.*.tmp``) are no
    checkpoint."""
    if not os.path.isdir(folder) or _holds_checkpoint(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not os.path.exists(folder)
