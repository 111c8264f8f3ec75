"""``train.py`` / ``klal train``: the LightningCLI over :class:`klal.module.KLALModule` and
:class:`klal.datamodule.KLALDataModule`, with klal's checkpointing (atomic, weights-only checkpoints and
``--ckpt_path last``, :mod:`klal.checkpoint`). ``train.py`` at the repository root is a two-line wrapper of
:func:`main`; the examples are in its docstring.
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI

from klal.checkpoint import resolve_ckpt_path, use_atomic_checkpoint_io
from klal.datamodule import KLALDataModule
from klal.module import KLALModule
from klal.noise import quiet
from klal.progress import StepProgressBar


class KLALCLI(LightningCLI):
    """LightningCLI with klal's checkpointing: atomic, weights-only checkpoints (:mod:`klal.checkpoint`), and
    ``--ckpt_path last`` meaning the newest ``last*.ckpt`` of earlier runs under the same folders."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]):
        # klal's step-counted progress display, unless the config brings a progress bar or turns it off.
        given = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def _resolve_last(self) -> None:
        cfg = self.config_init[self.subcommand]
        cfg["ckpt_path"] = resolve_ckpt_path(cfg.get("ckpt_path"), self.trainer)

    before_fit = before_validate = before_test = _resolve_last


def main(argv: list[str] | None = None, run: bool = True, prog: str | None = None) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (``cli.model``, ``cli.trainer``).

    Args:
        argv: the command line after the program name (``fit --config ...``).
        run: run the subcommand (False: only build model, data and trainer).
        prog: program name in help and errors.
    """
    quiet()
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
