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
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from klal.noise import debug_enabled, quiet

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError)
"""Exception types that mean "the input is wrong" (bad values, missing or unreadable files, unknown names). Library
code raises these with a message that names the file, option or sample at fault."""

EXIT_USAGE = 2
"""Exit status of a user mistake (the Unix convention for bad usage)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT)."""


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
    except KeyboardInterrupt as e:
        if debug_enabled():
            raise
        # A SIGTERM turned into KeyboardInterrupt for its clean-up carries its own status (data_gen's Terminated).
        code = getattr(e, "exit_status", EXIT_INTERRUPTED)
        print(f"{prog}: {'interrupted' if code == EXIT_INTERRUPTED else 'terminated'}", file=sys.stderr)
        raise SystemExit(code) from None
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
    bare_bool_flags(parser)
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
    quiet()  # third-party warnings about third-party code (klal.noise), as train.py does
    prog = prog or f"python -m {fn.__module__}"
    names = sequence_options(typing.get_type_hints(fn))
    args = list_options(normalise_flags(sys.argv[1:] if argv is None else argv), names)
    parser = build_parser(fn, prog)
    with user_errors(prog):
        ns = parse_or_fail(parser, args, prog)
        kwargs = {k: v for k, v in vars(parser.instantiate(ns)).items() if k not in ("config", "__path__")}
        return fn(**kwargs)


def expand_key_values(argv: Sequence[str], flag: str, prefix: str, fields: Sequence[str], owner: str) -> list[str]:
    """Rewrite ``FLAG KEY=VALUE ...`` items as ``--PREFIXKEY=VALUE`` options, moved to the end so they win.

    Args:
        argv: the command line (flags already with underscores).
        flag: the option that takes ``KEY=VALUE`` items (``--set``); also accepted as ``FLAG=KEY=VALUE``.
        prefix: put before each key (``""`` or ``"spec."``).
        fields: the valid keys.
        owner: what the keys belong to, for messages (``"task 'grid_patch'"``).

    Raises:
        ValueError: an item without ``=``, an unknown key or a key given twice (the message names ``flag`` and the
            key).
    """
    rest: list[str] = []
    items: list[str] = []
    taking = False
    for arg in argv:
        if arg == flag:
            taking = True
        elif arg.startswith(flag + "="):
            items.append(arg[len(flag) + 1 :])
            taking = False
        elif taking and not arg.startswith("--"):
            items.append(arg)
        else:
            taking = False
            rest.append(arg)
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key not in fields:
            raise ValueError(f"{flag} {key}: unknown field of {owner}; fields: {', '.join(sorted(fields))}")
        if key in seen:
            raise ValueError(f"{flag} {key} given twice")
        seen.add(key)
        out.append(f"--{prefix}{key}={value}")
    return rest + out


def _is_sequence(tp: Any) -> bool:
    """Whether a field of type ``tp`` holds a list or tuple (also inside ``X | None``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_sequence(a) for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) in (tuple, list) or tp in (tuple, list)


def sequence_options(hints: dict[str, Any]) -> set[str]:
    """The names of the list- and tuple-typed entries of ``hints`` (``typing.get_type_hints`` of a signature)."""
    return {name for name, tp in hints.items() if _is_sequence(tp)}


def list_options(argv: Sequence[str], names: set[str]) -> list[str]:
    """List and tuple options in the spellings command lines use, as the YAML list jsonargparse reads.

    For the options in ``names``: ``--rows 4,8``, ``--rows (4, 8)`` and ``--workers 1 2 4`` (several values, as
    argparse's ``nargs="+"`` took them) become ``--rows=[4,8]`` / ``--workers=[1,2,4]``; ``[...]`` and ``null`` are
    left alone, as is every other option.
    """

    def bracket(values: list[str]) -> str:
        if len(values) > 1:
            return "[" + ", ".join(values) + "]"
        v = values[0].strip()
        if v.startswith("(") and v.endswith(")"):
            return "[" + v[1:-1] + "]"
        return v if v.startswith(("[", "{", "!")) or v in ("null", "None", "") else "[" + v + "]"

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        i += 1
        if name not in names:
            out.append(arg)
            continue
        values = [value] if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        out.append(f"--{name}={bracket(values)}" if values else arg)
    return out


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"A[x, y], B"`` -> ``["A[x, y]", "B"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [p for p in [*parts, text[start:].strip()] if p]


def _type_words(tp: str) -> str:
    """A type as jsonargparse prints it, in words: ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    tp = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", tp.strip())
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", tp)
    if literal:
        return "one of " + literal.group(1)
    if tp == "NoneType":
        return "null"
    seq = re.fullmatch(r"(?:typing\.)?(?:list|List|tuple|Tuple|Sequence)\[(.*)\]", tp)
    if seq:
        return f"a list of {seq.group(1).replace('typing.', '')} (e.g. [a, b])"
    return "a " + tp.replace("typing.", "")


def union_message(text: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes" dump (one line) as ``KEY: expected A or B,
    got VALUE``; any other message is returned as it is."""
    m = re.match(r"(.*?):? Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors: ", text)
    if not m:
        return text
    given = re.search(r"Given value: (.*)$", text)
    expected = " or ".join(_type_words(t) for t in _split_top(m.group(2)))
    got = f", got {given.group(1).strip()!r}" if given else ""
    return f"{m.group(1)}: expected {expected}{got}"


def one_line_error(message: str) -> str:
    """jsonargparse's message as one line that names the flag: ``Parser key "num": ...`` -> ``--num: ...``; a union
    type's dump becomes what was expected (:func:`union_message`)."""
    text = " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
    text = union_message(re.sub(r'Parser key "([\w.]+)"', r"--\1", text))
    m = re.match(r"(.*the following arguments are required: )(.*)$", text)
    if m:
        text = m.group(1) + ", ".join("--" + n.strip().lstrip("-") for n in m.group(2).split(","))
    return text


def bare_bool_flags(parser: Any) -> None:
    """Let a bare ``--overwrite`` mean true (as :mod:`klal.cli` does); ``--overwrite false`` still works."""
    for action in parser._actions:
        if getattr(action, "_typehint", None) is bool and action.option_strings:
            action.nargs, action.const = "?", True


def parse_or_fail(parser: Any, args: Sequence[str], prog: str) -> Any:
    """``parser.parse_args(args)``; a bad option exits with one line naming it (:func:`one_line_error`,
    :func:`group_value_hint`)."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(args)
    except ArgumentError as e:
        if debug_enabled():
            raise
        fail(prog, group_value_hint(parser, str(e)) or one_line_error(str(e)))


def group_value_hint(parser: Any, message: str) -> str | None:
    """The message for a bare value given to a group of options (``--model tiny`` where ``--model`` is a dataclass):
    jsonargparse reads such a value as a config file (``Unable to load config 'tiny'``); say which options the group
    has instead, naming the likely one. None for any other error."""
    m = re.search(r"Parser key \"([\w.]+)\": Unable to load config ['\"](.*?)['\"]", message)
    if not m:
        m = re.search(r"--([\w.]+): Unable to load config ['\"](.*?)['\"]", message)
    if not m:
        return None
    group, value = m.group(1), m.group(2)
    fields = [a.dest[len(group) + 1 :] for a in parser._actions if a.dest.startswith(group + ".")]
    if not fields:
        return None
    likely = next((f for f in fields if "name" in f or "path" in f), fields[0])
    return (
        f"--{group} takes its options one by one ({', '.join('--' + group + '.' + f for f in fields[:4])}, ...) or a "
        f"YAML file of them; {value!r} is not a file: did you mean --{group}.{likely} {value}?"
    )
