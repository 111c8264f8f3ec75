"""Grounding-method options: each method declares a frozen dataclass of its options, checked here, in one place.

A method's ``Options`` lists every option with its type, default and an attribute docstring; bounds go in
:func:`option`::

    @dataclass(frozen=True)
    class Options:
        sigma: float = option(1.5, ge=0)
        \"\"\"Region smoothing in cells.\"\"\"
        connectivity: Literal[4, 8] = 4
        \"\"\"Neighbourhood of the region components.\"\"\"

:func:`parse_options` builds it from keyword options (a YAML ``options:`` mapping, or ``build_method(name, **kw)``):
an unknown option, or a value of the wrong type or out of bounds, is a :class:`~klal.grounding.base.GroundingError`
naming the method and the option, listing the valid options or values. Supported annotations: ``bool``, ``int``,
``float`` (finite; an int is accepted and converted), ``str``, ``Literal[...]``, ``tuple[float, ...]`` /
``tuple[int, ...]`` (a non-empty sequence, bounds apply to each element), ``list[int]``, and unions of these with
``None``. Rules between options go in the dataclass's ``__post_init__``, raising ``ValueError`` with the message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

import numpy as np


class OptionError(ValueError):
    """A bad option value; :func:`parse_options` turns it into a GroundingError naming the method."""


def option(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """A dataclass field with ``default`` and numeric bounds (``ge`` >=, ``gt`` >, ``le`` <=, ``lt`` <)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": bounds})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


def parse_options(method: str, cls: type, given: Mapping[str, Any]) -> Any:
    """``cls(**given)`` with every value checked against its annotation and bounds.

    Args:
        method: the method's registered name (for messages).
        cls: the method's frozen options dataclass.
        given: the options given; the others keep their defaults.

    Raises:
        GroundingError: an unknown option (listing the valid ones), a bad value (naming the option and what it must
            be), or a rule between options that fails.
    """
    from klal.session import GroundingError

    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(fields) or "(none)"
    unknown = [k for k in given if k not in fields]
    if unknown:
        raise GroundingError(f"{method}: unknown option {unknown[0]!r}; valid options: {valid}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in given.items():
        bounds = fields[name].metadata.get("bounds", {})
        try:
            values[name] = _check(hints[name], bounds, value)
        except OptionError:
            need = _describe(hints[name], bounds)
            raise GroundingError(f"{method}: option {name} must be {need}, got {value!r}") from None
    try:
        return cls(**values)
    except ValueError as e:
        raise GroundingError(f"{method}: {e}") from e


# -------------------------------------------------------------------------------------------------- type checks


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _check(tp: Any, bounds: dict[str, float], value: Any) -> Any:
    """``value`` converted to the annotation ``tp`` (a union: its first member that accepts it), or OptionError."""
    for member in _members(tp):
        try:
            return _check_one(member, bounds, value)
        except OptionError:
            continue
    raise OptionError


def _check_one(tp: Any, bounds: dict[str, float], value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif tp is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return _in_bounds(int(value), bounds)
    elif tp is float:
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if number and math.isfinite(value):
            return _in_bounds(float(value), bounds)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        for choice in typing.get_args(tp):
            # 4 == 4.0 and True == 1: a choice matches only a value of its own type.
            if type(value) is type(choice) and value == choice:
                return value
    elif origin in (tuple, list):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if isinstance(value, (list, tuple)) and value and not isinstance(value, str):
            items = [_check(item, bounds, v) for v in value]
            return tuple(items) if origin is tuple else items
    raise OptionError


def _in_bounds(x: float, bounds: dict[str, float]) -> float:
    ok = {"ge": x >= bounds.get("ge", -math.inf), "gt": x > bounds.get("gt", -math.inf)}
    ok |= {"le": x <= bounds.get("le", math.inf), "lt": x < bounds.get("lt", math.inf)}
    if not all(ok.values()):
        raise OptionError
    return x


def _describe(tp: Any, bounds: dict[str, float]) -> str:
    """What a value of annotation ``tp`` within ``bounds`` must be, in words (``a number in (0, 1]``)."""
    parts = [_describe_one(m, bounds) for m in _members(tp) if m is not type(None)]
    if type(None) in _members(tp):
        parts.append("None")
    return " or ".join(parts)


def _describe_one(tp: Any, bounds: dict[str, float]) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp in (int, float):
        return ("an integer" if tp is int else "a number") + _describe_bounds(bounds)
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        item = _describe(args[0], bounds) if args else "values"
        item = item.replace("an integer", "integers").replace("a number", "numbers")
        return f"a non-empty list of {item}"
    return getattr(tp, "__name__", str(tp))


def _describe_bounds(bounds: dict[str, float]) -> str:
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return ""


__all__ = ["NoOptions", "OptionError", "option", "parse_options"]
