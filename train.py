"""Train Qwen2.5-VL with LoRA on next-token loss plus the KL attention loss (KLAL).

A thin LightningCLI over :class:`klal.module.KLALModule` and :class:`klal.datamodule.KLALDataModule`; every option of
both (and of the Trainer) is a flag or a YAML key, and the resolved config is saved with every run.

Examples::

    # tiny random model on CPU, a synthetic grid-patch set generated on the fly (a few minutes on 2 cores)
    python train.py fit --config configs/demo.yaml
    # override anything from the command line
    python train.py fit --config configs/demo.yaml --model.klal_weight 0.5 --trainer.max_steps 20
    # real checkpoint on 8 GPUs
    python train.py fit --config configs/qwen2.5-vl-3b_lora_klal.yaml --trainer.devices 8
    # validation only, from a checkpoint
    python train.py validate --config configs/demo.yaml --ckpt_path runs/demo/.../last.ckpt
    # continue a killed run from its newest last.ckpt (docs/checkpoints.md)
    python train.py fit --config configs/demo.yaml --ckpt_path last
"""

from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from klal.checkpoint import resolve_ckpt_path, use_atomic_checkpoint_io
from klal.datamodule import KLALDataModule
from klal.module import KLALModule


class KLALCLI(LightningCLI):
    """LightningCLI with klal's checkpointing: atomic, weights-only checkpoints (:mod:`klal.checkpoint`), and
    ``--ckpt_path last`` meaning the newest ``last*.ckpt`` of earlier runs under the same folders."""

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def _resolve_last(self) -> None:
        cfg = self.config_init[self.subcommand]
        cfg["ckpt_path"] = resolve_ckpt_path(cfg.get("ckpt_path"), self.trainer)

    before_fit = before_validate = before_test = _resolve_last


def main(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (``cli.model``, ``cli.trainer``)."""
    # Show the config dataclasses' field docstrings in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if argv is not None:
        # LightningCLI also inspects sys.argv; when called from Python the explicit argv is the whole command line.
        sys.argv = sys.argv[:1]
    return KLALCLI(
        KLALModule,
        KLALDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
