"""Command line for the synthetic task generators: write datasets and preview them (``python -m data_gen``, or
``klal generate``: the same command).

Generate a dataset (a ``datasets.DatasetDict`` with train/validation/test splits in the klal schema)::

    python -m data_gen TASK --num N --out DIR [--seed S] [--workers W] [--preset easy|medium|hard]
        [--image-size PX] [--line-width PX] [--FIELD VALUE ...] [--set FIELD=VALUE ...] [--splits 0.8,0.1,0.1]
        [--overwrite] [--quiet] [--config FILE.yaml]

``TASK`` is one of :data:`data_gen.tasks.TASKS` (``grid_patch``, ``line_intersection``, ``line_tracing``, ...). Every
field of the task's config dataclass is an option of its own, typed and documented by the dataclass
(``python -m data_gen TASK --help`` lists them with their types, defaults and the task's presets); ``--image-size``
and ``--line-width`` are two of them. Values are applied in the order: task defaults, ``--preset``, the options on
the command line, ``--set``. ``--set FIELD=VALUE ...`` is the same as ``--FIELD VALUE`` for each item.
Values are read as YAML by jsonargparse (:mod:`klal.cli`): lists and tuples are ``[4, 8]``, and for convenience
also ``4,8``, ``(4, 8)`` or ``4 8``; booleans are ``true``/``false`` (a bare ``--state_grid_size`` means true);
``null`` is None. Flags may be written with dashes or underscores.

Draw a few samples of a written dataset with their evidence and target maps::

    python -m data_gen preview DIR --out preview.png [--split train] [--num 8] [--min-pixels PX] [--max-pixels PX]
        [--spec.box_mode gaussian ...] [--spec KEY=VALUE ...]

``--spec`` sets fields of :class:`klal.data.targets.TargetSpec` (how evidence becomes the target map).

Small CPU example (a few seconds)::

    python -m data_gen grid_patch --num 64 --seed 0 --out /tmp/grid_small --image-size 224 --preset easy
    python -m data_gen preview /tmp/grid_small --out /tmp/grid_small.png

Bad arguments print one line, ``data_gen: error: ...``, on stderr and exit with status 2; an interrupted run exits
with 130 and leaves no output behind (:mod:`data_gen.writer`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jsonargparse.typing import NonNegativeInt, PositiveInt

from data_gen.base import GenerationError, Task
from data_gen.tasks import get_task_class, preset_values, task_names
from klal.cli import (
    bare_bool_flags,
    expand_key_values,
    fail,
    list_options,
    normalise_flags,
    parse_or_fail,
    run,
    sequence_options,
    user_errors,
)
from klal.data.targets import TargetSpec

PROG = "data_gen"


@dataclass
class GenerateOptions:
    """How many samples to write and where (the options every task shares)."""

    num: PositiveInt
    """Number of samples (at least 3: one per split)."""
    out: str
    """Output directory (must not exist unless --overwrite)."""
    seed: NonNegativeInt = 0
    """Dataset seed: sample i is drawn from (seed, i) whatever the number of workers."""
    workers: PositiveInt = 1
    """Worker processes (the output does not depend on them)."""
    preset: str | None = None
    """Difficulty preset of the task (listed below); the other options are applied over it."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train, validation and test fractions (positive, summing to 1)."""
    overwrite: bool = False
    """Replace an existing dataset at --out (only once the new one is complete)."""
    quiet: bool = False
    """No progress bar."""


OWN_OPTIONS = frozenset(f.name for f in dataclasses.fields(GenerateOptions)) | {"config", "set", "help"}
"""Option names a task's config fields must not reuse."""


# ---------------------------------------------------------------------------------------------------- argv helpers
# ------------------------------------------------------------------------------------------------------- generation
def task_parser(cls: type[Task], prog: str) -> Any:
    """The jsonargparse parser of one task: :class:`GenerateOptions` plus every field of the task's config."""
    import argparse

    from jsonargparse import ArgumentParser, DefaultHelpFormatter, set_parsing_settings

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    clash = sorted(OWN_OPTIONS & {f.name for f in dataclasses.fields(cls.config_cls)})
    if clash:
        raise GenerationError(f"task {cls.name!r}: config field(s) {clash} clash with data_gen's own options")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    presets = [
        f"  {p}: {', '.join(f'{k}={v!r}' for k, v in o.items()) or '(the defaults)'}" for p, o in cls.presets.items()
    ]
    epilog = "presets (--preset):\n" + "\n".join(presets) if presets else None
    parser = ArgumentParser(
        prog=prog,
        description=f"Generate a {cls.name} dataset. --set FIELD=VALUE ... is --FIELD VALUE for each item.",
        epilog=epilog,
        formatter_class=Formatter,
        exit_on_error=False,
    )
    parser.add_argument("--config", action="config", help="YAML file with any of the options below")
    parser.add_class_arguments(GenerateOptions, nested_key=None, as_group=True)
    parser.add_class_arguments(cls.config_cls, nested_key=None, as_group=True)
    bare_bool_flags(parser)
    return parser


def parse_generate(name: str, argv: Sequence[str], prog: str = PROG) -> tuple[GenerateOptions, dict[str, Any]]:
    """The writer options and the full config values (field -> typed value) that ``argv`` gives for task ``name``.

    A bad option exits with one line (:func:`klal.cli.fail`); an unknown task or preset raises GenerationError.
    """
    cls = get_task_class(name)
    fields = [f.name for f in dataclasses.fields(cls.config_cls)]
    hints = {**typing.get_type_hints(GenerateOptions), **typing.get_type_hints(cls.config_cls)}
    args = expand_key_values(normalise_flags(argv), "--set", "", fields, f"task {name!r}")
    args = list_options(args, sequence_options(hints))
    parser = task_parser(cls, f"{prog} {name}")
    ns = parse_or_fail(parser, args, prog)
    if ns.preset is not None:
        # The preset's values become the defaults, so every option on the command line is applied over them.
        parser.set_defaults(preset_values(cls, ns.preset))
        ns = parse_or_fail(parser, args, prog)
    opts = GenerateOptions(**{f.name: ns[f.name] for f in dataclasses.fields(GenerateOptions)})
    return opts, {k: ns[k] for k in fields}


def generate(name: str, argv: Sequence[str], prog: str = PROG) -> None:
    """Parse ``argv`` as the options of task ``name`` and write its dataset (see the module docstring).

    Raises:
        GenerationError: unknown task or preset, or a config the task rejects.
        DatasetWriteError: bad writer options or output path.
    """
    opts, config = parse_generate(name, argv, prog)
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset, parent_folders  # imports datasets: not needed for --help

    task = build_task(name, overrides=config)
    t0 = time.perf_counter()
    # `--out data/grid_patch` in a fresh checkout: data/ is made (and removed again on failure)
    with parent_folders(opts.out):
        dd = generate_dataset(
            task,
            opts.num,
            opts.seed,
            opts.out,
            workers=opts.workers,
            splits=opts.splits,
            overwrite=opts.overwrite,
            progress=not opts.quiet,
        )
    sizes = ", ".join(f"{k} {len(v)}" for k, v in dd.items())
    print(f"wrote {opts.num} {name} samples ({sizes}) to {opts.out} in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------------------- preview
def preview(dataset: str, *, out: str, **kwargs: Any) -> None:
    """Draw samples of a dataset with question, answer, evidence and target map into a PNG.

    Args:
        dataset: dataset directory (save_to_disk layout).
        out: PNG file to write.
        **kwargs: the drawing options of :func:`data_gen.preview.render_preview` (``--spec.box_mode gaussian`` or
            ``--spec box_mode=gaussian`` sets a target-map setting).
    """
    from data_gen.preview import render_preview

    print(f"wrote {render_preview(dataset, out, **kwargs)}")


# ------------------------------------------------------------------------------------------------------------- main
def usage(prog: str = PROG) -> str:
    """What ``data_gen --help`` prints."""
    return "\n".join(
        [
            f"usage: {prog} TASK --num N --out DIR [options]   ({prog} TASK --help lists a task's options)",
            f"       {prog} preview DIR --out PNG [options]",
            "",
            "Generate synthetic grounding datasets in the klal schema, or preview one.",
            f"tasks: {', '.join(task_names())}",
        ]
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status (0 ok or --help, 2 bad arguments, 130 interrupted)."""
    prog = prog or PROG
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with user_errors(prog):
            if not args:
                fail(prog, f"choose a TASK ({', '.join(task_names())}) or preview; see {prog} --help")
            command, rest = args[0], args[1:]
            if command in ("-h", "--help", "help"):
                print(usage(prog))
            elif command == "preview":
                fields = [f.name for f in dataclasses.fields(TargetSpec)]
                rest = expand_key_values(
                    normalise_flags(rest), "--spec", "spec.", fields, "klal.data.targets.TargetSpec"
                )
                run(preview, rest, f"{prog} preview")
            else:
                generate(command, rest, prog)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
