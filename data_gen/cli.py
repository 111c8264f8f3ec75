"""Command line for the synthetic task generators: write datasets and preview them.

Generate a dataset (a ``datasets.DatasetDict`` with train/validation/test splits in the klal schema)::

    python -m data_gen TASK --num N --seed S --out DIR [--workers W] [--image-size PX] [--line-width PX]
        [--preset easy|medium|hard] [--set KEY=VALUE ...] [--splits 0.8,0.1,0.1] [--overwrite] [--quiet]

``TASK`` is ``grid_patch``, ``line_intersection`` or ``line_tracing``. Config values are applied in the order task
defaults, ``--preset``, ``--image-size``/``--line-width``, ``--set``; ``--set`` takes any field of the task's config
(``python -m data_gen TASK --help`` lists them with their types and defaults), typed by the field's type: tuples and
lists are comma-separated (``--set rows=4,8 shapes=circle,star``), booleans are true/false.

Draw a few samples of a written dataset with their evidence and target maps::

    python -m data_gen preview DIR --out preview.png [--split train] [--num 8] [--min-pixels PX] [--max-pixels PX]
        [--spec KEY=VALUE ...]

``--spec`` sets fields of ``klal.targets.TargetSpec`` (how evidence becomes the target map, e.g. ``box_mode=gaussian``).

Small CPU example (a few seconds)::

    python -m data_gen grid_patch --num 64 --seed 0 --out /tmp/grid_small --image-size 224 --preset easy
    python -m data_gen preview /tmp/grid_small --out /tmp/grid_small.png

Bad arguments print one line, ``data_gen: error: ...``, on stderr and exit with status 2; an interrupted run exits
with 130 and leaves no output behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING
from enum import Enum
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from data_gen.base import GenerationError
from data_gen.tasks import TASKS, config_fields, field_docs, get_task_class
from data_gen.writer import DatasetWriteError

PROG = "data_gen"
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class CLIError(Exception):
    """A bad command line; the message names the option at fault."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises instead of printing usage and exiting, so main() prints exactly one line."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


# ----------------------------------------------------------------------------------------------------------- typing
def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def parse_value(text: str, tp: Any) -> Any:
    """Convert command-line ``text`` to a value of type ``tp`` (a config field's annotation).

    Supports bool, int, float, str, Enum, ``Literal[...]``, ``X | None`` (``none``/``null`` gives None), tuples
    (fixed-length or ``tuple[T, ...]``) and lists as comma-separated items or JSON lists, and falls back to JSON for
    anything else.

    Raises:
        ValueError: ``text`` is not a valid ``tp``.
    """
    origin, args = get_origin(tp), get_args(tp)
    s = text.strip()
    if tp is Any:
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return text
    if origin in (Union, types.UnionType):
        if type(None) in args and s.lower() in ("none", "null"):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, a)
            except ValueError:
                continue
        raise ValueError(f"expected {_type_name(tp)}, got {text!r}")
    if origin is Literal:
        for a in args:
            if str(a) == s:
                return a
        raise ValueError(f"expected one of {[str(a) for a in args]}, got {text!r}")
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if tp is int:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(s)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if tp is str:
        return text
    if isinstance(tp, type) and issubclass(tp, Enum):
        for m in tp:
            if s in (m.name, str(m.value)):
                return m
        raise ValueError(f"expected one of {[m.name for m in tp]}, got {text!r}")
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if s.startswith("["):
            try:
                items = [v if isinstance(v, str) else json.dumps(v) for v in json.loads(s)]
            except (json.JSONDecodeError, TypeError):
                raise ValueError(f"expected {_type_name(tp)} as a JSON list, got {text!r}") from None
        else:
            inner = s[1:-1] if s.startswith("(") and s.endswith(")") else s
            items = [v.strip() for v in inner.split(",")] if inner.strip() else []
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values ({_type_name(tp)}), got {text!r}")
            return tuple(parse_value(v, a) for v, a in zip(items, args))
        elem = args[0] if args else str
        values = [parse_value(v, elem) for v in items]
        return list(values) if origin is list or tp is list else tuple(values)
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        raise ValueError(f"cannot parse {text!r} as {_type_name(tp)}") from None


def parse_overrides(cls: type, items: Sequence[str], owner: str, flag: str = "--set") -> dict[str, Any]:
    """Turn ``KEY=VALUE`` items into typed values for the fields of dataclass ``cls``.

    Args:
        cls: the dataclass (a task config, a TargetSpec).
        items: ``KEY=VALUE`` strings.
        owner: what the fields belong to, for messages (``"task 'grid_patch'"``).
        flag: the option the items came from, for messages.

    Raises:
        CLIError: an item without ``=``, a key given twice, an unknown key, or a value of the wrong type.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key not in fields:
            raise CLIError(f"{flag} {key}: unknown field of {owner}; fields: {', '.join(sorted(fields))}")
        if key in out:
            raise CLIError(f"{flag} {key} given twice")
        try:
            out[key] = parse_value(text, hints.get(key, Any))
        except ValueError as e:
            raise CLIError(f"{flag} {key}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {v}")
    return v


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}") from None


def _task_epilog(name: str) -> str:
    """Config fields (type, default, docstring) and presets of task ``name``, for its ``--help``."""
    try:
        cls = get_task_class(name)
        hints = typing.get_type_hints(cls.config_cls)
        docs = field_docs(cls.config_cls)
    except Exception as e:  # help text only: a broken task must not break the CLI for the other tasks
        return f"(config fields unavailable: {e})"
    lines = ["config fields (--set KEY=VALUE):"]
    for f in config_fields(cls.config_cls).values():
        default = f.default if f.default is not MISSING else "(required)"
        if f.default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        lines.append(f"  {f.name} ({_type_name(hints.get(f.name, Any))}, default {default!r}): {docs.get(f.name, '')}")
    if cls.presets:
        lines.append("presets (--preset):")
        for p, o in cls.presets.items():
            lines.append(f"  {p}: {', '.join(f'{k}={v!r}' for k, v in o.items()) or '(the defaults)'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``data_gen`` argument parser (one subcommand per task, plus ``preview``)."""
    parser = _Parser(
        prog=PROG,
        description="Generate synthetic grounding datasets in the klal schema, or preview one.",
        epilog="Run 'python -m data_gen TASK --help' for a task's config fields and presets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="TASK", required=True, parser_class=_Parser)
    for name in sorted(TASKS):
        p = sub.add_parser(
            name,
            help=f"generate a {name} dataset",
            description=f"Generate a {name} dataset.",
            epilog=_task_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--num", type=_positive_int, required=True, metavar="N", help="number of samples (at least 3)")
        p.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="dataset seed (default 0)")
        p.add_argument(
            "--out", required=True, metavar="DIR", help="output directory (must not exist unless --overwrite)"
        )
        p.add_argument("--workers", type=_positive_int, default=1, metavar="W", help="worker processes (default 1)")
        p.add_argument(
            "--image-size", type=_positive_int, metavar="PX", help="image side in pixels (config field image_size)"
        )
        p.add_argument(
            "--line-width", type=_positive_int, metavar="PX", help="stroke width in pixels (config field line_width)"
        )
        p.add_argument("--preset", metavar="NAME", help="difficulty preset: easy, medium or hard")
        p.add_argument(
            "--set",
            dest="overrides",
            nargs="+",
            action="extend",
            default=[],
            metavar="KEY=VALUE",
            help="override config fields (applied last)",
        )
        p.add_argument(
            "--splits",
            type=_fractions,
            default=(0.8, 0.1, 0.1),
            metavar="F,F,F",
            help="train,validation,test fractions (default 0.8,0.1,0.1)",
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "preview",
        help="draw samples of a dataset to a PNG",
        description="Draw samples of a dataset with question, answer, evidence and target map.",
    )
    p.add_argument("dataset", metavar="DIR", help="dataset directory (save_to_disk layout)")
    p.add_argument("--out", required=True, metavar="PNG", help="PNG file to write")
    p.add_argument("--split", default="train", help="split to draw from (default train)")
    p.add_argument("--num", type=_positive_int, default=8, help="samples to draw (default 8)")
    p.add_argument("--start", type=_non_negative_int, default=0, help="first row drawn (default 0)")
    p.add_argument("--cols", type=_positive_int, default=4, help="panels per row (default 4)")
    p.add_argument("--min-pixels", type=_positive_int, default=56 * 56, help="processor min_pixels (default 3136)")
    p.add_argument("--max-pixels", type=_positive_int, default=448 * 448, help="processor max_pixels (default 200704)")
    p.add_argument(
        "--spec",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="target-map settings (klal.targets.TargetSpec fields, e.g. box_mode=gaussian)",
    )
    return parser


# ---------------------------------------------------------------------------------------------------------- running
def _generate(args: argparse.Namespace) -> None:
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset

    cls = get_task_class(args.command)
    overrides: dict[str, Any] = {}
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.line_width is not None:
        overrides["line_width"] = args.line_width
    overrides.update(parse_overrides(cls.config_cls, args.overrides, f"task {args.command!r}"))
    task = build_task(args.command, preset=args.preset, overrides=overrides)
    t0 = time.perf_counter()
    dd = generate_dataset(
        task,
        args.num,
        args.seed,
        args.out,
        workers=args.workers,
        splits=args.splits,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    sizes = ", ".join(f"{k} {len(v)}" for k, v in dd.items())
    print(f"wrote {args.num} {args.command} samples ({sizes}) to {args.out} in {time.perf_counter() - t0:.1f} s")


def _preview(args: argparse.Namespace) -> None:
    from data_gen.preview import render_preview
    from klal.targets import TargetSpec

    try:
        spec = TargetSpec(**parse_overrides(TargetSpec, args.spec, "klal.targets.TargetSpec", flag="--spec"))
    except ValueError as e:  # TargetSpec checks its own values
        raise CLIError(f"--spec: {e}") from None
    path = render_preview(
        args.dataset,
        args.out,
        split=args.split,
        num=args.num,
        start=args.start,
        cols=args.cols,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        spec=spec,
    )
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad arguments, 130 interrupted)."""
    from data_gen.preview import PreviewError

    try:
        args = build_parser().parse_args(argv)
        if args.command == "preview":
            _preview(args)
        else:
            _generate(args)
    except (CLIError, GenerationError, DatasetWriteError, PreviewError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
