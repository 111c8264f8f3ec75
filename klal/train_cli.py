"""``train.py`` / ``klal train``: the LightningCLI over :class:`klal.module.KLALModule` and
:class:`klal.datamodule.KLALDataModule`, with klal's checkpointing (atomic, weights-only checkpoints and
``--ckpt_path last``, :mod:`klal.checkpoint`). ``train.py`` at the repository root is a two-line wrapper of
:func:`main`; the examples are in its docstring.

Resuming (``fit --ckpt_path last`` or a path) continues the run it names: ``last`` is the newest ``last*.ckpt`` of
this run's own folder (the logger version being resumed, never another run under the same root), the resumed run
writes into that version (its ``metrics.csv`` continues), and the command line must agree with the checkpoint:
other model options are refused, other run hyperparameters (KLAL weight and layers, LoRA, optimizer, data) are
refused unless ``--allow_changed_hparams true`` (see ``docs/checkpoints.md``).
"""

from __future__ import annotations

import os
import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from klal.checkpoint import (
    check_resume_hparams,
    checkpoint_state,
    continue_csv_metrics,
    resolve_ckpt_path,
    use_atomic_checkpoint_io,
)
from klal.datamodule import KLALDataModule
from klal.module import KLALModule


class KLALCLI(LightningCLI):
    """LightningCLI with klal's checkpointing: atomic, weights-only checkpoints (:mod:`klal.checkpoint`), and
    resuming that continues the run's own folder and refuses settings the checkpoint was not trained with."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--allow_changed_hparams",
            type=bool,
            default=False,
            help="Resume a checkpoint with other run hyperparameters (KLAL weight/layers, LoRA, optimizer, data) than "
            "it was trained with, e.g. a deliberate second stage. Model options must always agree.",
        )

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the command line's model options with the checkpoint's, silently; klal compares
        # them instead (check_resume_hparams, in _resolve_last).
        return

    def _resolve_last(self) -> None:
        cfg = self.config_init[self.subcommand]
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), self.trainer)
        cfg["ckpt_path"] = ckpt_path
        if self.subcommand != "fit" or not ckpt_path or not os.path.exists(ckpt_path):
            return
        checkpoint = checkpoint_state(ckpt_path)
        if checkpoint is not None:
            allow = bool(cfg.get("allow_changed_hparams", False))
            check_resume_hparams(checkpoint, self.model, self.datamodule, f"checkpoint {ckpt_path}", allow)
        step = int(checkpoint["global_step"]) if checkpoint and "global_step" in checkpoint else None
        continue_csv_metrics(self.trainer, step)

    before_fit = before_validate = before_test = _resolve_last


def main(argv: list[str] | None = None, run: bool = True, prog: str | None = None) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (``cli.model``, ``cli.trainer``).

    Args:
        argv: the command line after the program name (``fit --config ...``).
        run: run the subcommand (False: only build model, data and trainer).
        prog: program name in help and errors.
    """
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
        parser_kwargs={"prog": prog} if prog else None,
    )
