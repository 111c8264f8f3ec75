"""Task registry: task name -> generator class, imported lazily.

Each task module is imported only when its task is asked for, so a task whose module is missing or broken fails
alone (with :class:`TaskUnavailableError`) and the others keep working.

Example:
    >>> from data_gen.tasks import build_task
    >>> task = build_task("grid_patch", preset="easy", overrides={"image_size": 224})
    >>> sample = task.sample(seed=0, index=0)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from data_gen.base import GenerationError, Task

TASKS: dict[str, tuple[str, str]] = {
    "line_intersection": ("data_gen.tasks.line_intersection", "LineIntersectionTask"),
    "line_tracing": ("data_gen.tasks.line_tracing", "LineTracingTask"),
    "grid_patch": ("data_gen.tasks.grid_patch", "GridPatchTask"),
    "shape_lookup": ("data_gen.tasks.lookup", "ShapeLookupTask"),
    "colour_lookup": ("data_gen.tasks.lookup", "ColourLookupTask"),
    "neighbour_lookup": ("data_gen.tasks.lookup", "NeighbourLookupTask"),
    "ring_colour": ("data_gen.tasks.marked", "RingColourTask"),
    "outline_colour": ("data_gen.tasks.marked", "OutlineColourTask"),
    "beside_colour": ("data_gen.tasks.marked", "BesideColourTask"),
}
"""Task name -> (module, class name)."""


class UnknownTaskError(GenerationError):
    """The task name is not in :data:`TASKS`."""


class TaskUnavailableError(GenerationError):
    """The task is registered but its module cannot be imported."""


def task_names() -> list[str]:
    """Names of every registered task, sorted."""
    return sorted(TASKS)


def get_task_class(name: str) -> type[Task]:
    """Import and return the generator class of task ``name``.

    Raises:
        UnknownTaskError: ``name`` is not registered.
        TaskUnavailableError: its module or class cannot be imported.
    """
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; available tasks: {', '.join(task_names())}")
    module_name, class_name = TASKS[name]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise TaskUnavailableError(f"task {name!r} is unavailable: {type(e).__name__}: {e}") from e
    return cls


def preset_values(cls: type[Task], preset: str) -> dict[str, Any]:
    """The config values of ``preset`` of task class ``cls``.

    Raises:
        GenerationError: the task has no such preset (the message lists its presets).
    """
    if preset not in cls.presets:
        choices = ", ".join(cls.presets) or "none"
        raise GenerationError(f"task {cls.name!r} has no preset {preset!r}; presets: {choices}")
    return dict(cls.presets[preset])


def build_task(name: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Task:
    """Construct task ``name`` from its config defaults, then ``preset``, then ``overrides`` (later wins).

    Args:
        name: a registered task name.
        preset: one of the task's ``presets`` (``easy``/``medium``/``hard``), or None.
        overrides: config field -> already-typed value.

    Raises:
        GenerationError: unknown task, preset or field, or a config the task's ``validate()`` rejects; the message
            names the option at fault.
    """
    cls = get_task_class(name)
    values = preset_values(cls, preset) if preset is not None else {}
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = [k for k in (overrides or {}) if k not in fields]
    if unknown:
        raise GenerationError(
            f"unknown config field(s) {unknown} for task {name!r}; fields: {', '.join(sorted(fields))}"
        )
    values.update(overrides or {})
    try:
        return cls(cls.config_cls(**values))
    except GenerationError:
        raise
    except (TypeError, ValueError) as e:
        # Config construction and validate() only look at the settings, so any error here is a bad setting.
        raise GenerationError(f"task {name!r}: invalid config: {e}") from e
