"""Stored ``--help`` text, so that ``train.py fit --help`` and ``klal NAME --help`` answer in well under a second.

Building a command's parser means importing what its signature names: LightningCLI's parser for ``train.py`` needs
Lightning, transformers and torch (about 11 s on two CPU cores), and ``klal discover-heads`` imports torch with its
module. The help text itself depends only on the source code, the installed packages and the terminal, so the first
``--help`` of a command builds it the normal way (printing it as always) and stores it; every later one prints the
stored text without importing any of them.

A stored text is used only when all of these are unchanged (they form its key): the program name and the arguments
(``fit --help`` and ``validate --help`` are different texts), the text of every Python file of klal and data_gen and
of the entry script, the versions of the packages that shape the parser (:data:`PACKAGES`), the Python version, and
the terminal's width and colour settings. Only a pure help request is served from the store: the arguments are
subcommand words and ``-h`` / ``--help``, nothing else (a ``--config`` file could change the defaults shown).

The store is ``$KLAL_CACHE_DIR/help`` (default ``$XDG_CACHE_HOME/klal/help``, else ``~/.cache/klal/help``); one file
per key, written atomically. It is an optimisation only: an unwritable or missing store just means the slow path, and
``KLAL_HELP_CACHE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

PACKAGES = (
    "lightning",
    "jsonargparse",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "docstring-parser",
    "typeshed-client",
    "pillow",
    "numpy",
)
"""Installed distributions whose versions are part of the key (their classes and docstrings make up the help)."""

HELP_FLAGS = ("-h", "--help")
_ENV_KEYS = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM", "JSONARGPARSE_DEFAULT_ENV")


def is_help_request(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for help and nothing else: ``-h``/``--help`` among subcommand words, no other option."""
    args = list(argv)
    return any(a in HELP_FLAGS for a in args) and all(a in HELP_FLAGS or not a.startswith("-") for a in args)


def cache_dir() -> Path:
    """Where help texts are stored (see the module docstring)."""
    root = os.environ.get("KLAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "klal"
    )
    return Path(root) / "help"


def source_files(script: str | None = None) -> list[Path]:
    """The Python files whose text is part of the key: klal's, data_gen's (when installed next to it) and ``script``."""
    package = Path(__file__).resolve().parent
    roots = [package, package.parent / "data_gen"]
    files = sorted(p for root in roots if root.is_dir() for p in root.rglob("*.py"))
    if script and script.endswith(".py") and os.path.isfile(script):
        files.append(Path(script).resolve())
    return files


def _versions() -> list[str]:
    from importlib import metadata

    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} absent")
    return out


def help_key(prog: str, argv: Sequence[str], script: str | None = None) -> str:
    """The hex digest that names the stored help of ``prog ARGV`` (see the module docstring for what goes in)."""
    h = hashlib.blake2b(digest_size=20)

    def add(text: str) -> None:
        h.update(text.encode("utf-8", "surrogateescape") + b"\0")

    add(prog)
    for arg in argv:
        add(arg)
    add(sys.version)
    for version in _versions():
        add(version)
    for name in _ENV_KEYS:
        add(f"{name}={os.environ.get(name)}")
    add(f"columns={shutil.get_terminal_size().columns} tty={sys.stdout.isatty()}")
    for path in source_files(script):
        add(str(path))
        h.update(path.read_bytes())
    return h.hexdigest()


class _Tee(io.TextIOBase):
    """A text stream that writes through to ``out`` and keeps a copy."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.out = out
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def fileno(self) -> int:
        return self.out.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.out, "encoding", "utf-8")


def _store(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; a store that cannot be written is skipped (it is only a cache)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def cached_help(prog: str, argv: Sequence[str], run: Callable[[], Any], script: str | None = None) -> Any:
    """Run ``run()`` (the command), except that a pure help request is answered from the store when it can be.

    Args:
        prog: the program name the help shows (``train.py``, ``klal discover-heads``).
        argv: the command line after the program name.
        run: builds the parser and runs the command (imports included); a help request makes it print the help on
            stdout and raise ``SystemExit(0)``.
        script: the entry script (``train.py``), whose text is part of the key.

    Returns:
        What ``run()`` returns. A help request served from the store prints it and raises ``SystemExit(0)``.
    """
    if os.environ.get("KLAL_HELP_CACHE", "1") == "0" or not is_help_request(argv):
        return run()
    try:
        path = cache_dir() / f"{help_key(prog, argv, script)}.txt"
        stored = path.read_text(encoding="utf-8") if path.is_file() else None
    except OSError:
        return run()
    if stored:
        sys.stdout.write(stored)
        sys.stdout.flush()
        raise SystemExit(0)
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            return run()
    except SystemExit as e:
        text = "".join(tee.parts)
        if e.code in (0, None) and text:
            _store(path, text)
        raise


__all__ = ["HELP_FLAGS", "PACKAGES", "cache_dir", "cached_help", "help_key", "is_help_request", "source_files"]
