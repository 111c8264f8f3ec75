"""The registry of grounding methods: name -> :class:`~klal.grounding.base.GroundingMethod` subclass.

Subclasses register themselves with ``class M(GroundingMethod, name="...")``; :func:`register_method` does the same as
a decorator. Importing :mod:`klal.grounding` registers the built-in methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klal.session import GroundingError

# The registry sits below klal.grounding.base (whose classes register here as they are defined), so it names the
# base class in words only: every value is a GroundingMethod subclass.
_REGISTRY: dict[str, type] = {}
"""Every registered method by name; read it through :func:`method_class` / :func:`available_methods`."""


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator that makes a method available to :func:`build_method` under ``name``.

    Subclasses of :class:`GroundingMethod` can register with ``class M(GroundingMethod, name="...")`` instead.
    """

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"grounding method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_REGISTRY)


def build_method(name: str, **options: Any) -> Any:
    """Instantiate a registered method by name with its keyword options (a
    :class:`~klal.grounding.base.GroundingMethod`).

    Raises:
        GroundingError: unknown method name, unknown option or bad option value (naming it).
    """
    return method_class(name)(**options)


def method_class(name: str) -> type:
    """The registered class of method ``name`` (a :class:`~klal.grounding.base.GroundingMethod` subclass).

    Raises:
        GroundingError: unknown method name (listing the available ones).
    """
    if name not in _REGISTRY:
        raise GroundingError(f"unknown grounding method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]
