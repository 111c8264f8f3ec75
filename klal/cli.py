"""One way to run a klal command: a typed function becomes a command line, and a user's mistake becomes one line.

Every command of klal (``klal NAME ...``, ``python -m klal.export``, the converters, head discovery, data generation)
is a plain function with typed parameters and a Google-style docstring, or a dataclass whose fields carry attribute
docstrings. :func:`run` hands it to jsonargparse, the machinery LightningCLI (``train.py``) already uses, so there is
no hand-mirrored argparse: the flags, their types, defaults and ``--help`` text all come from the signature, and
``--config FILE.yaml`` sets any of them. Nested dataclass parameters become dotted flags (``--spec.box_mode``).

Flags are written with underscores, as in the signature; the dashed spelling (``--image-size``) is accepted too, so the
two habits of command-line users both work.

Errors. A mistake in the input (a bad flag, a missing file, a value out of range) is reported as one line,
``PROG: error: MESSAGE``, on stderr with exit status 2; Ctrl-C exits with 130. The traceback is shown only when the
environment variable ``KLAL_DEBUG`` is set to a non-empty value other than ``0``. Errors that are not the user's
(anything but :data:`USER_ERRORS`) keep their traceback: they are bugs to report.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError)
"""Exception types that mean "the input is wrong" (bad values, missing or unreadable files, unknown names). Library
code raises these with a message that names the file, option or sample at fault."""

EXIT_USAGE = 2
"""Exit status of a user mistake (the Unix convention for bad usage)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT)."""


def debug_enabled() -> bool:
    """True when ``KLAL_DEBUG`` asks for full tracebacks."""
    return os.environ.get("KLAL_DEBUG", "") not in ("", "0")


def fail(prog: str, message: Any, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``PROG: error: MESSAGE`` (first line of the message only) on stderr and exit with ``code``."""
    text = str(message).strip() or type(message).__name__
    if isinstance(message, KeyError) and len(message.args) == 1:
        text = str(message.args[0])  # KeyError's str() quotes its argument
    print(f"{prog}: error: {text}", file=sys.stderr)
    raise SystemExit(code)


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` raised inside the block into one line and exit status 2 (see the module docstring)."""
    try:
        yield
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except USER_ERRORS as e:
        if debug_enabled():
            raise
        fail(prog, e)


def normalise_flags(argv: Sequence[str]) -> list[str]:
    """Accept ``--image-size`` for ``--image_size``: dashes inside a flag's name (before any ``=``) become underscores.

    Values are left alone, and so is everything after a bare ``--``.
    """
    out: list[str] = []
    rest = False
    for arg in argv:
        if rest or not arg.startswith("--") or arg == "--":
            rest = rest or arg == "--"
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        out.append("--" + name.replace("-", "_") + eq + value)
    return out


def build_parser(fn: Callable[..., Any], prog: str, description: str | None = None) -> Any:
    """The jsonargparse parser of ``fn``'s signature: required parameters are positional, the rest are flags."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    doc = description if description is not None else (fn.__doc__ or "").strip().split("\n\n")[0]
    parser = ArgumentParser(prog=prog, description=doc, exit_on_error=False)
    parser.add_argument("--config", action="config", help="YAML file with any of the options below")
    parser.add_function_arguments(fn, as_positional=True, as_group=False)
    for action in parser._actions:
        # A bare ``--overwrite`` means true, as users expect of a switch; ``--overwrite false`` still works.
        if getattr(action, "_typehint", None) is bool and action.option_strings:
            action.nargs, action.const = "?", True
    return parser


def run(fn: Callable[..., Any], argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) against ``fn``'s signature and call it.

    Args:
        fn: the command: a function with typed parameters and an ``Args:`` docstring section.
        argv: the command line after the program name.
        prog: the program name shown in help and errors (default: ``fn``'s module).

    Returns:
        What ``fn`` returns. A parse error or a :data:`USER_ERRORS` exception exits with one line and status 2.
    """
    from jsonargparse import ArgumentError

    prog = prog or f"python -m {fn.__module__}"
    args = normalise_flags(sys.argv[1:] if argv is None else argv)
    parser = build_parser(fn, prog)
    with user_errors(prog):
        try:
            ns = parser.parse_args(args)
            kwargs = vars(parser.instantiate(ns))
        except ArgumentError as e:
            if debug_enabled():
                raise
            fail(prog, _one_line(str(e)))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("config", "__path__")}
        return fn(**kwargs)


def _one_line(message: str) -> str:
    # jsonargparse explains a bad value over several lines (the key, then the problem): join them into one.
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip()) or message
