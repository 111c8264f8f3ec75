"""What klal finds through entry points rather than imports: the parts shipped beside the library (``data_gen``).

The library never imports a script package by name; ``data_gen`` registers what klal uses in ``pyproject.toml``:
group ``klal.generators`` (``synthetic``: the writer behind ``data.generate``) and group ``klal.commands``
(``generate``: the ``klal generate`` command). Both are found the same way, by :func:`load_entry_point`.
"""

from __future__ import annotations

from typing import Any


def load_entry_point(group: str, name: str, needed_for: str) -> Any:
    """The object registered as entry point ``name`` of ``group``, loaded.

    Args:
        group: the entry-point group (``klal.generators``, ``klal.commands``).
        name: the entry point's name.
        needed_for: what needs it, for the message (``"data.generate"``, ``"klal generate"``).

    Raises:
        LookupError: no such entry point (klal installed without its metadata: reinstall with ``pip install -e .``).
    """
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        raise LookupError(
            f"{needed_for} needs entry point {group}:{name}, which is not installed; reinstall klal (pip install -e .)"
        )
    return found[0].load()
