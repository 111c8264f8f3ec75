"""The ``klal`` command: every klal tool as a subcommand (``klal NAME --help`` documents each one).

Usage::

    klal                                   # this list
    klal train fit --config configs/demo.yaml
    klal evaluate --config configs/eval/synthetic_compare.yaml
    klal generate grid_patch --num 200 --seed 0 --out data/grid_patch
    klal export --adapter RUN/adapter --out exported --merge

``python -m klal`` is the same command. Each subcommand is also its module's own entry point (``python -m
klal.export``); both spellings parse the same typed signature (:mod:`klal.cli`). Only the chosen subcommand's module
is imported, and ``klal NAME --help`` is answered from the help texts shipped with the package (or stored after a
first use; :mod:`klal.helpcache`), so it loads no torch. ``klal generate`` is data_gen's command, found through the
``klal.commands`` entry point (:mod:`klal.plugins`), as ``data.generate`` finds data_gen's writer.

Multi-process training (``klal train fit ... --trainer.devices N``) starts its other processes by running this same
command line again (Lightning's DDP launcher; :func:`klal.train_cli.main` keeps ``sys.argv`` whole for it).

Exit status: 0 when the subcommand succeeds (what it returns is not printed), 2 for a mistake in the input, 130 after
Ctrl-C (also while the subcommand's libraries are being imported), so ``klal train fit ... && klal evaluate ...``
goes on exactly when training succeeded.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from klal.cli import user_errors
from klal.helpcache import cached_help
from klal.plugins import load_entry_point

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("klal.train_cli", "train with NTP + KLAL (LightningCLI: fit / validate / test)"),
    "evaluate": ("klal.eval.cli", "compare grounding methods and adapters on klal datasets"),
    "generate": ("klal.commands:generate", "generate a synthetic grounding dataset, or preview one"),
    "convert-refcoco": ("klal.data.refcoco", "convert RefCOCO / RefCOCO+ / RefCOCOg into the klal schema"),
    "convert-pixmo": ("klal.data.pixmo", "convert PixMo-Points into the klal schema"),
    "convert-vstar": ("klal.data.vstar", "convert V* Bench into the klal schema"),
    "convert-textvqa": ("klal.data.textvqa", "convert TextVQA into the klal schema"),
    "convert-pope": ("klal.data.pope", "convert POPE into the klal schema"),
    "discover-heads": ("klal.grounding.loc_heads", "find a model's localization heads and save them as JSON"),
    "export": ("klal.export", "export a trained adapter (optionally merged) as a stock checkpoint"),
}
"""Subcommand -> (module whose ``main(argv, prog)`` runs it, one-line description). ``GROUP:NAME`` names an entry
point instead (:mod:`klal.plugins`): ``klal generate`` is data_gen's, which the library does not import by name."""


def usage() -> str:
    """The subcommand list that ``klal`` and ``klal --help`` print."""
    width = max(map(len, COMMANDS))
    lines = ["usage: klal COMMAND [options]   (klal COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to its subcommand's module; returns the exit status.

    The console script passes the return value to ``sys.exit``: a subcommand's ``main`` that returns an ``int``
    returns its exit status (``klal generate``), any other result (a CLI object, a results dict, a path) means
    success, 0.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"klal: error: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    prog = f"klal {name}"

    def run() -> object:
        target = COMMANDS[name][0]
        with user_errors(prog):  # Ctrl-C while torch & co. are imported is "interrupted", not a traceback
            if ":" in target:
                command = load_entry_point(*target.split(":"), needed_for=prog)
            else:
                command = importlib.import_module(target).main
        return command(rest, prog=prog)

    result = cached_help(prog, rest, run)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
