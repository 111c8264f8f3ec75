"""``evaluate.py`` / ``klal evaluate``: compare grounding methods and adapters on klal datasets, in one table.

Every field of :class:`~klal.eval.config.EvalConfig` is a flag or a YAML key (``--config``); ``--data`` takes one
dataset directory or a list. Errors in the input are one line, ``PROG: error: MESSAGE``, exit status 2
(:mod:`klal.cli`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from klal.cli import fail, run, user_errors
from klal.eval.config import EvalConfig


@dataclass
class EvalCommand(EvalConfig):
    """Compare grounding on klal datasets: adapters' and the base model's attention and the training-free methods."""

    print_methods: bool = False
    """List the grounding methods and exit."""


def print_methods() -> None:
    """One line per registered grounding method: its name and the first line of its docstring."""
    from klal.grounding import available_methods, method_class

    for name in available_methods():
        doc = (method_class(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:20s} {doc}")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Run the evaluation on ``argv`` (default ``sys.argv[1:]``); returns the dict written to ``results.json``."""
    prog = prog or "evaluate.py"
    cmd = run(EvalCommand, sys.argv[1:] if argv is None else argv, prog)
    if cmd.print_methods:
        print_methods()
        return {}
    cfg = EvalConfig(**{f.name: getattr(cmd, f.name) for f in fields(EvalConfig)})
    with user_errors(prog):  # Ctrl-C while torch & co. are imported is "interrupted", not a traceback
        cfg.check_adapter_rows()  # before torch & co. are imported
        from klal.eval.engine import evaluate
        from klal.eval.report import check_ranges

        results = evaluate(cfg)
    print(Path(cfg.out, "results.md").read_text())
    bad = check_ranges(results["metrics"])
    if bad:
        fail(prog, "metrics out of range: " + "; ".join(bad))
    return results


if __name__ == "__main__":
    main()
