"""Grounding probes during training: run grounding methods on a fixed probe subset every N steps and at the end of
validation, log their metrics and heat-map overlays.

Add to a training config::

    trainer:
      callbacks:
        - class_path: klal.callbacks.GroundingProbes
          init_args:
            every_n_steps: 100
            num_samples: 16
            methods:
              - {name: attention_probe, label: answer attention, options: {query: answer_last}}
              - {name: entropy_gradient}

The probe subset is the first ``num_samples`` rows *that have an image*: text-only rows (``image`` None, see
:mod:`klal.data.schema`) have nothing to ground, so they are passed over when the subset is built, with a warning that
counts them (``text_only_skipped``); a split without any image row is an error naming it.

Each probe runs the evaluation engine's loop (:func:`klal.eval.engine.run_method`, as ``evaluate.py`` does): every
method is built once, when the callback is, and prepared at each probe on the whole subset and the model as it is
then (localization-head discovery), so every rank prepares on the same rows.

Metrics are logged as ``probe/<label>/<task>/<metric>`` to every logger; the full scores with their sample counts
(loggers get only the values) go to ``<log_dir>/probes/step_<N>/metrics.json``, galleries to
``<log_dir>/probes/step_<N>/gallery_<label>.png`` and, when the logger is TensorBoard or W&B, to its image panel.
Under DDP rank ``r`` of ``k`` probes rows ``r, r + k, ...`` of the subset and the metrics' sum states are synced, so
the logged values equal one process probing the whole subset (every rank must reach the hook, which Lightning
guarantees); the pictures are drawn by rank 0 from its own share. The probes use the module's live model (eval mode
and frozen weights while probing, restored after), so FSDP/DeepSpeed sharded models are not supported here: the
callback skips with a warning under those strategies.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from klal.data.io import load_split
from klal.eval.config import MethodSpec
from klal.eval.engine import run_method
from klal.eval.metrics import GroundingMetrics
from klal.eval.report import save_gallery, slug
from klal.grounding import GroundingModel, build_method
from klal.session import image_rows


class GroundingProbes(Callback):
    """Run grounding methods on a fixed probe subset during training.

    Args:
        methods: rows to run (default: the answer token's attention, teacher-forced, i.e. what KLAL trains).
        data: dataset directory of the probe subset (default: the datamodule's validation split).
        split: split of ``data``.
        num_samples: size of the probe subset (the first samples with an image, fixed for the whole run).
        every_n_steps: probe every N optimizer steps (None or 0: only at validation end).
        at_validation_end: also probe after every validation run (not the sanity check).
        gallery_size: samples per gallery picture (0: none).
    """

    def __init__(
        self,
        methods: list[MethodSpec] | None = None,
        data: str | None = None,
        split: str = "validation",
        num_samples: int = 8,
        every_n_steps: int | None = 100,
        at_validation_end: bool = True,
        gallery_size: int = 4,
    ) -> None:
        self.methods = [m if isinstance(m, MethodSpec) else MethodSpec(**m) for m in methods] if methods else None
        if self.methods is None:
            self.methods = [MethodSpec("attention_probe", "answer attention", options={"query": "answer_last"})]
        for m in self.methods:
            if m.weights != "base":
                raise ValueError(f"GroundingProbes row {m.row!r}: probes run on the model in training; drop 'weights'")
        # Built once (bad names and options fail here); each probe prepares them again on the model as it is then.
        self._built = [build_method(m.name, **m.options) for m in self.methods]
        if num_samples < 1:
            raise ValueError(f"GroundingProbes num_samples must be >= 1, got {num_samples}")
        self.data = data
        self.split = split
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps or 0
        self.at_validation_end = at_validation_end
        self.gallery_size = gallery_size
        self.rows: list[dict[str, Any]] = []
        self.text_only_skipped = 0
        """Text-only rows passed over while building the probe subset."""
        self._last_step = -1
        self._gm: GroundingModel | None = None
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build the probe subset once: the first ``num_samples`` image rows of the probe split.

        Raises:
            ValueError: no validation split to probe, or a split without any row that has an image.
        """
        if self.rows:
            return
        if self.data:
            ds = load_split(self.data, self.split)
            source = f"{self.data} [{self.split}]"
        else:
            dm = trainer.datamodule
            splits = getattr(dm, "splits", None) or {}
            if "val" not in splits:
                dm.setup(stage)
                splits = dm.splits
            if "val" not in splits:
                raise ValueError("GroundingProbes: no validation split to probe; set GroundingProbes.data")
            ds = splits["val"]
            paths = list(getattr(dm, "paths", None) or [])
            if getattr(dm, "generate", None) is not None:
                paths.append(dm.generate.out)
            val_name = getattr(dm, "split_names", {}).get("val", "validation")
            source = f"{', '.join(paths) or 'the datamodule'} [{val_name}]"
        # The image column is scanned as Arrow, so finding the image rows decodes no image.
        kept, self.text_only_skipped = image_rows(ds, self.num_samples)
        if len(kept) == 0:
            what = f"{len(ds)} row(s), all text-only" if len(ds) else "the split is empty"
            raise ValueError(
                f"GroundingProbes: {source} has no row with an image ({what}); grounding probes need images: point "
                "GroundingProbes.data/split at a split with image rows"
            )
        if self.text_only_skipped:
            rank_zero_warn(
                f"GroundingProbes: skipped {self.text_only_skipped} text-only row(s) of {source} building the probe "
                f"subset (no image to ground); probing {len(kept)} image row(s)"
            )
        self.rows = list(kept)

    def _supported(self, trainer: L.Trainer) -> bool:
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name:
            warnings.warn(f"GroundingProbes: skipped under {name} (sharded weights)", stacklevel=2)
            return False
        return True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.probe(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_validation_end and not trainer.sanity_checking:
            self.probe(trainer, pl_module)

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Run every method on this rank's share of the subset; log and return the synced metrics."""
        if not self._supported(trainer):
            return {}
        if self._gm is None or self._gm.model is not pl_module.model:
            self._gm = GroundingModel(pl_module.model, pl_module.processor)
        rank, world = trainer.global_rank, trainer.world_size
        mine = self.rows[rank::world]
        metrics = GroundingMetrics(device=pl_module.device if trainer.strategy.root_device.type != "cpu" else None)
        galleries: dict[str, list[Any]] = {}
        with self._gm.borrowed():
            for spec, method in zip(self.methods, self._built):
                # Every rank prepares on the whole subset (not its share), so all ranks discover the same heads.
                run = run_method(
                    self._gm, spec.row, method, {"probe": mine}, metrics, self.rows, gallery_size=self.gallery_size
                )
                galleries[spec.row] = run.gallery
        scores = metrics.compute()  # every rank takes part in the sync
        step = trainer.global_step
        flat = GroundingMetrics.flatten(scores, "probe")
        self.history.append({"step": step, **flat})
        # trainer.log_dir is a collective under DDP: every rank resolves it.
        root = Path(trainer.log_dir or trainer.default_root_dir) / "probes" / f"step_{step}"
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=step)
            # The counts show which samples were scored after the sync (under DDP: every rank's share, summed).
            root.mkdir(parents=True, exist_ok=True)
            record = {
                "step": step,
                "world_size": world,
                "samples": [row.get("id") for row in self.rows],
                "text_only_skipped": self.text_only_skipped,
                "scores": scores,
            }
            (root / "metrics.json").write_text(json.dumps(record, indent=2))
            for label, items in galleries.items():
                if items:
                    path = root / f"gallery_{slug(label)}.png"
                    save_gallery(items, path, title=f"{label} @ step {step}")
                    _log_image(trainer, f"probe/{label}", path, step)
        return scores


def _log_image(trainer: L.Trainer, key: str, path: Path, step: int) -> None:
    """Send a PNG to the image panel of TensorBoard / W&B loggers (others get the file only)."""
    import numpy as np
    from PIL import Image

    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            arr = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, arr, global_step=step, dataformats="HWC")
        elif kind == "WandbLogger":
            logger.log_image(key=key, images=[os.fspath(path)], step=step)


__all__ = ["GroundingProbes"]
