"""Quiet by default: the console lines of third-party libraries that say nothing about a klal run.

Every ``train.py`` run used to print five to seven lines that were not about the run: Lightning's advertisements for
its cloud products, a transformers deprecation triggered inside peft (``is_gradient_checkpointing``), a Lightning
deprecation triggered by its own pytree code, and peft's failed network look-up of the base model's config on every
adapter save (fixed where klal saves adapters, not here). :func:`quiet` removes exactly those, by message, and
nothing else: every other warning and log line still shows. ``KLAL_DEBUG=1`` leaves everything on. ``train.py`` and
every command run by :func:`klal.cli.run` (export, evaluate, head discovery, the converters) call it. This module
imports nothing of klal: :mod:`klal.cli` builds on it, not the other way round.
"""

from __future__ import annotations

import logging
import os
import warnings


def debug_enabled() -> bool:
    """True when ``KLAL_DEBUG`` asks for everything: full tracebacks (:mod:`klal.cli`) and every console line."""
    return os.environ.get("KLAL_DEBUG", "") not in ("", "0")


ADVERTISEMENTS = ("💡 Tip: For seamless cloud",)
"""Starts of Lightning info lines that advertise products (logged on every Trainer construction)."""

IRRELEVANT_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # peft reads model.is_gradient_checkpointing; transformers 5 deprecated the name. Nothing for a user to change.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # Lightning's own pytree helper on torch >= 2.10; fixed upstream, nothing for a user to change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)
"""(message regex, category) of warnings raised inside third-party code about third-party code."""


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(ADVERTISEMENTS)


_FILTER = _DropAdvertisements()


_KLAL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PLAIN_FORMAT = warnings.formatwarning


def _one_line(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' own signature
    """klal's own warnings as one line (``UserWarning: <message>``): the message names the sample, file or option, so
    the source line Python adds (``rank_zero_warn(`` in klal/datamodule.py) says nothing to a user. Everything else
    keeps Python's format."""
    if str(filename).startswith(_KLAL_DIR):
        return f"{category.__name__}: {message}\n"
    return _PLAIN_FORMAT(message, category, filename, lineno, line)


def quiet() -> None:
    """Silence :data:`ADVERTISEMENTS` and :data:`IRRELEVANT_WARNINGS`, and print klal's own warnings on one line
    (idempotent; a no-op with ``KLAL_DEBUG``)."""
    if debug_enabled():
        return
    warnings.formatwarning = _one_line
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for message, category in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
