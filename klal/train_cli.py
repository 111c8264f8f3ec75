"""``train.py`` / ``klal train``: the LightningCLI over :class:`klal.module.KLALModule` and
:class:`klal.datamodule.KLALDataModule`, with klal's checkpointing (atomic, weights-only checkpoints and
``--ckpt_path last``, :mod:`klal.checkpoint`). ``train.py`` at the repository root is a two-line wrapper of
:func:`main`; the examples are in its docstring.

Resuming (``fit --ckpt_path last`` or a path) continues the run it names: ``last`` is the newest ``last*.ckpt`` of
this run's own folder (the logger version being resumed, never another run under the same root), the resumed run
writes into that version (its ``metrics.csv`` continues), and the command line must agree with the checkpoint:
other model options are refused, other run hyperparameters (KLAL weight and layers, LoRA, optimizer, data) are
refused unless ``--allow_changed_hparams true`` (see ``docs/checkpoints.md``).

Every run also gets :class:`klal.progress.StepProgressBar` (unless the config brings a progress bar or turns it off),
:class:`klal.guards.TargetMapGuard` (stops a KLAL run whose data gives no target map, reports the share of samples
without one), :class:`klal.guards.SigtermCheckpoint` (SIGTERM saves ``last.ckpt`` and exits with status 143) and
:class:`klal.guards.LossGuard` (stops a diverging loss before its update); third-party console noise is silenced
(:mod:`klal.noise`). ``--trainer.max_steps 0`` (nothing to train) and ``--ckpt_path last`` with no checkpoint to
resume are errors, not a run that ends at once or starts afresh. A command that fails removes the run folder it
created (``version_N/`` with its ``config.yaml``) unless a checkpoint was saved in it, which is kept for
``--ckpt_path last``. Exit status: 0 after success, 2 for a mistake in the input or data (a non-finite or diverging
loss included), 130 after Ctrl-C, 143 after SIGTERM.

Errors. A mistake on the command line or in a config file (an unknown key, a bad value) is one line,
``train.py: error: MESSAGE``, exit status 2, with the closest valid key for a misspelt one; so are the data and config
errors raised while building or running (a missing dataset, a damaged checkpoint, evidence that gives no target map).
``KLAL_DEBUG=1`` shows jsonargparse's usage text and the full traceback instead (:mod:`klal.cli`).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import sys
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from klal.checkpoint.compat import check_resume_hparams
from klal.checkpoint.lightning_io import use_atomic_checkpoint_io
from klal.checkpoint.loading import checkpoint_state
from klal.checkpoint.resume import check_ckpt_path, continue_csv_metrics, resolve_ckpt_path
from klal.cli import debug_enabled, fail, list_options, union_message, user_errors
from klal.datamodule import KLALDataModule
from klal.guards import (
    EXIT_SIGTERM,
    LossGuard,
    SigtermCheckpoint,
    TargetMapGuard,
    check_trains_something,
    new_run_dir,
    remove_unless_checkpointed,
)
from klal.module import KLALModule
from klal.noise import quiet
from klal.progress import StepProgressBar

LIST_OPTIONS = {"data.paths"}
"""List options that also take one value without brackets (``--data.paths DIR``, :func:`klal.cli.list_options`)."""

MODEL_SHORTHANDS = {"--model.name_or_path": "--model.backbone.name_or_path"}
"""Flags spelt as ``evaluate.py`` spells them, for the same model option."""


def model_shorthands(args: list[str]) -> list[str]:
    """``args`` with :data:`MODEL_SHORTHANDS` written out (``--flag value`` and ``--flag=value`` alike)."""
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        out.append(MODEL_SHORTHANDS.get(name, name) + eq + value)
    return out


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

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]):
        # klal's step-counted progress display (unless the config brings a progress bar or turns it off), the target
        # map guard and the SIGTERM checkpoint, each unless the config already has one.
        given = [*(config.get("callbacks") or []), *callbacks]
        extra: list[Any] = []
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(StepProgressBar())
        for kind in (TargetMapGuard, SigtermCheckpoint, LossGuard):
            if not any(isinstance(c, kind) for c in given):
                extra.append(kind())
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def parse_arguments(self, parser, args) -> None:
        # sys.argv holds the command that starts this run again in another process (main()); LightningCLI warns when
        # it sees both that and ``args``, which are the same words here.
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            self._parse_arguments(parser, argv[1:] if args is None else args)
        finally:
            sys.argv = argv

    def _parse_arguments(self, parser, args) -> None:
        # jsonargparse prints its whole usage (~100 lines) before the one line that matters; keep that line, and
        # name the closest valid key when the mistake is an unknown one.
        if debug_enabled():
            return super().parse_arguments(parser, args)
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                super().parse_arguments(parser, args)
        except SystemExit as e:
            if e.code in (None, 0):  # --help, --print_config
                sys.stderr.write(captured.getvalue())
                raise
            fail(parser.prog.replace(" [options]", ""), self._parse_error(captured.getvalue(), args))
        sys.stderr.write(captured.getvalue())

    def _parse_error(self, text: str, args: Any) -> str:
        """jsonargparse's error message (after its usage text) as one line, with ``did you mean`` for an unknown key."""
        lines = text.strip().splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.startswith("error: ")), None)
        if start is None:
            return " ".join(ln.strip() for ln in lines if ln.strip()) or "invalid arguments"
        message = " ".join(ln.strip() for ln in [lines[start][len("error: ") :], *lines[start + 1 :]] if ln.strip())
        message = union_message(re.sub(r'Parser key "([\w.]+)"', r"\1", message))
        words = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        sub = next((w for w in words if w in self.subcommands()), None)
        parser = getattr(self, "_subcommand_parsers", {}).get(sub) if sub else None
        unknown = re.search(r"does not accept option '([\w.]+)'|unrecognized arguments: --?([\w.]+)", message)
        if unknown:
            key = unknown.group(1) or unknown.group(2)
            keys = sorted({a.dest for a in (parser or self.parser)._actions if a.dest and a.dest != "help"})
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        elif sub is None and not any(w in self.subcommands() for w in words):
            close = difflib.get_close_matches(words[0] if words else "", list(self.subcommands()), n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
        return message

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the command line's model options with the checkpoint's, silently; klal compares
        # them instead (check_resume_hparams, in _resolve_last).
        return

    def _resolve_last(self) -> None:
        cfg = self.config_init[self.subcommand]
        if self.subcommand == "fit":
            check_trains_something(self.trainer)
        ckpt_path = check_ckpt_path(resolve_ckpt_path(cfg.get("ckpt_path"), self.trainer))
        if ckpt_path and os.path.isfile(ckpt_path):
            check_is_torch_file(ckpt_path)
        cfg["ckpt_path"] = ckpt_path
        # Known now that "last" has chosen its version: a folder this command creates is removed again if it fails.
        self._new_run_dir = new_run_dir(self.trainer)
        if self.subcommand != "fit" or not ckpt_path or not os.path.exists(ckpt_path):
            return
        checkpoint = checkpoint_state(ckpt_path)
        if checkpoint is not None:
            allow = bool(cfg.get("allow_changed_hparams", False))
            check_resume_hparams(checkpoint, self.model, self.datamodule, f"checkpoint {ckpt_path}", allow)
        step = int(checkpoint["global_step"]) if checkpoint and "global_step" in checkpoint else None
        continue_csv_metrics(self.trainer, step)

    before_fit = before_validate = before_test = _resolve_last

    def _run_subcommand(self, subcommand: str) -> None:
        self._new_run_dir = None
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            # A failed run (bad data, a full disk, Ctrl-C, a diverging loss) leaves nothing in a folder it created,
            # unless a checkpoint was saved there: that one is complete (atomic) and what --ckpt_path last resumes.
            if self._new_run_dir is not None and self.trainer.is_global_zero:
                remove_unless_checkpointed(self._new_run_dir)
            raise


def check_is_torch_file(path: str) -> None:
    """Refuse a ``--ckpt_path`` file that ``torch.save`` did not write, by its first bytes: torch writes a zip archive
    (``PK``) or, in its legacy format, a pickle (protocol 2+ starts with byte 0x80). torch's own message does not
    name the file.

    Raises:
        ValueError: naming the file and what it starts with.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return
    raise ValueError(
        f"--ckpt_path {path} is not a checkpoint (torch.save writes a zip archive; this file starts with {head!r}); "
        "name a .ckpt file a klal run saved, or --ckpt_path last"
    )


def main(argv: list[str] | None = None, run: bool = True, prog: str | None = None) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (``cli.model``, ``cli.trainer``).

    Args:
        argv: the command line after the program name (``fit --config ...``).
        run: run the subcommand (False: only build model, data and trainer).
        prog: program name in help and errors.
    """
    # Show the config dataclasses' field docstrings in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # `--data.paths DIR` (one folder, no brackets) is read as the list `[DIR]`, as `--data.paths A B` is `[A, B]`.
    # Lightning's DDP launchers (subprocess spawn on CPU and GPU) start the other processes by running
    # ``sys.executable sys.argv...`` again (or ``-m`` the ``__main__`` module), so sys.argv must stay the whole command:
    # for ``klal train fit ...`` that is ``klal train`` followed by ``argv`` (the words ``klal`` passes on). torchrun
    # and SLURM start every process with the user's command themselves.
    if argv is not None:
        argv = list(argv)
        head = len(sys.argv) - len(argv)
        rewritten = list_options(model_shorthands(argv), LIST_OPTIONS)
        if argv and head >= 1 and sys.argv[head:] == argv:  # `klal train ...`: keep `klal train`, rewritten args
            sys.argv[head:] = rewritten
        else:  # called from Python: the explicit argv is the whole command line
            sys.argv = sys.argv[:1]
        argv = rewritten
    else:
        # Rewritten in place, for the same reason.
        sys.argv[1:] = list_options(model_shorthands(sys.argv[1:]), LIST_OPTIONS)
    quiet()
    name = prog or os.path.basename(sys.argv[0]) or "train.py"
    try:
        with user_errors(name):
            try:
                return KLALCLI(
                    KLALModule,
                    KLALDataModule,
                    args=argv,
                    run=run,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"prog": name},
                )
            except FloatingPointError as e:
                # A non-finite or diverging loss (klal.module, klal.guards.LossGuard): the message names the step,
                # the loss and the batch's samples; the run stopped before the bad update.
                if debug_enabled():
                    raise
                fail(name, e)
    except SIGTERMException:
        # Lightning ends a SIGTERM-ed run with SystemExit(0); a scheduler's stop is not a success (the checkpoint was
        # saved by SigtermCheckpoint, which said where).
        raise SystemExit(EXIT_SIGTERM) from None
