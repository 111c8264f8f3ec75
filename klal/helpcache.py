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

Shipped texts. The help of every ``klal`` command (:data:`SHIPPED_COMMANDS`) also ships with the package, in
``klal/help_texts.json``, so the first ``--help`` after installing is as fast as a stored one. The key is the same
key, so a shipped text is used only with the source and the package versions it was generated from; it therefore
holds nothing that varies between machines: source files are named relative to the package, the Python version is
``major.minor``, and help is always laid out at :data:`HELP_COLUMNS` columns, whatever the terminal's width. Regenerate
the file after changing any source file (``python -m klal.helpcache``); ``tests/test_helpcache.py`` fails while it is
stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
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
HELP_COLUMNS = 100
"""Width every help text is laid out at (``COLUMNS`` while help is built), so a text does not depend on the
terminal."""
_ENV_KEYS = ("JSONARGPARSE_DEFAULT_ENV",)
_COLOUR_KEYS = ("NO_COLOR", "FORCE_COLOR", "TERM")
"""Colour settings: part of the key from Python 3.14 on, whose argparse colours help."""

SHIPPED = Path(__file__).with_name("help_texts.json")
"""The shipped texts: ``{key: text}``."""
SHIPPED_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("klal train", "fit", "--help"),
    ("klal train", "validate", "--help"),
    ("klal train", "test", "--help"),
    ("klal train", "--help"),
    ("klal evaluate", "--help"),
    ("klal generate", "--help"),
    ("klal convert-refcoco", "--help"),
    ("klal convert-pixmo", "--help"),
    ("klal discover-heads", "--help"),
    ("klal export", "--help"),
)
"""``(prog, *argv)`` of the help texts that ship (:data:`SHIPPED`)."""


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
    add(f"python {sys.version_info[0]}.{sys.version_info[1]}")
    for version in _versions():
        add(version)
    env_keys = _ENV_KEYS + (_COLOUR_KEYS if sys.version_info >= (3, 14) else ())
    for name in env_keys:
        add(f"{name}={os.environ.get(name)}")
    add(f"columns={HELP_COLUMNS}")
    root = Path(__file__).resolve().parent.parent
    for path in source_files(script):
        add(str(path.relative_to(root)) if path.is_relative_to(root) else path.name)
        h.update(path.read_bytes())
    return h.hexdigest()


def shipped_texts() -> dict[str, str]:
    """The shipped help texts (:data:`SHIPPED`), ``{}`` when the file is absent or unreadable."""
    try:
        return json.loads(SHIPPED.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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
    if not is_help_request(argv):
        return run()
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # the same layout in every terminal (and in the shipped texts)
    if os.environ.get("KLAL_HELP_CACHE", "1") == "0":
        return run()
    try:
        key = help_key(prog, argv, script)
        path = cache_dir() / f"{key}.txt"
        stored = shipped_texts().get(key) or (path.read_text(encoding="utf-8") if path.is_file() else None)
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


def generate_shipped() -> dict[str, str]:
    """Build every text of :data:`SHIPPED_COMMANDS` through the installed ``klal`` command (a fresh process each, the
    store off) and write :data:`SHIPPED`; returns ``{key: text}``."""
    import subprocess

    texts: dict[str, str] = {}
    env = dict(os.environ, KLAL_HELP_CACHE="0")
    for prog, *argv in SHIPPED_COMMANDS:
        name = prog.split(" ", 1)[1]
        cmd = [sys.executable, "-m", "klal", name, *argv]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not proc.stdout:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        texts[help_key(prog, argv)] = proc.stdout
    _store(SHIPPED, json.dumps(texts, indent=1, sort_keys=True) + "\n")
    return texts


__all__ = [
    "HELP_COLUMNS",
    "HELP_FLAGS",
    "PACKAGES",
    "SHIPPED",
    "SHIPPED_COMMANDS",
    "cache_dir",
    "cached_help",
    "generate_shipped",
    "help_key",
    "is_help_request",
    "shipped_texts",
    "source_files",
]


if __name__ == "__main__":
    for k in generate_shipped():
        print(k)
