"""klal.helpcache: a stored --help is printed only for a pure help request, and only while nothing it depends on has
changed; a miss builds the text the normal way and stores it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from klal import helpcache
from klal.helpcache import cached_help, help_key, is_help_request


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--help"], True),
        (["-h"], True),
        (["fit", "--config", "x.yaml", "--help"], False),  # a config may change the defaults shown
        (["fit"], False),
        (["--help=1"], False),
    ],
)
def test_only_a_pure_help_request_is_served(argv, expected):
    assert is_help_request(argv) is expected


def test_stored_text_is_printed_until_the_key_changes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KLAL_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def command() -> None:
        calls.append(1)
        print(f"usage: prog (built {len(calls)})")
        raise SystemExit(0)

    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            cached_help("prog", ["fit", "--help"], command)
        assert e.value.code == 0
    assert calls == [1] and capsys.readouterr().out == "usage: prog (built 1)\n" * 2
    with pytest.raises(SystemExit):  # other arguments: another text
        cached_help("prog", ["validate", "--help"], command)
    assert calls == [1, 1]
    assert cached_help("prog", ["fit"], lambda: "ran") == "ran"  # not a help request: the command runs
    monkeypatch.setenv("KLAL_HELP_CACHE", "0")
    with pytest.raises(SystemExit):
        cached_help("prog", ["fit", "--help"], command)
    assert len(calls) == 3


def test_a_failed_help_is_not_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("KLAL_CACHE_DIR", str(tmp_path / "cache"))

    def broken() -> None:
        print("usage: half")
        raise SystemExit(2)

    with pytest.raises(SystemExit):
        cached_help("prog", ["--help"], broken)
    assert not list((tmp_path / "cache").rglob("*.txt"))


def test_the_key_follows_the_source_files(tmp_path, monkeypatch):
    package = tmp_path / "klal"
    shutil.copytree(Path(helpcache.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(helpcache, "__file__", str(package / "helpcache.py"))
    before = help_key("prog", ["--help"])
    assert help_key("prog", ["--help"]) == before
    (package / "module.py").write_text((package / "module.py").read_text() + "\n# changed\n")
    assert help_key("prog", ["--help"]) != before


def test_shipped_help_texts_are_current():
    """Every klal command's help ships with the package (klal/help_texts.json) for this source and these package
    versions; after a source change this fails until ``python -m klal.helpcache`` regenerates the file."""
    texts = helpcache.shipped_texts()
    stale = [" ".join(c) for c in helpcache.SHIPPED_COMMANDS if help_key(c[0], list(c[1:])) not in texts]
    assert not stale, f"klal/help_texts.json is stale for {stale}: run `python -m klal.helpcache` and commit it"


def test_first_help_after_install_imports_nothing_heavy(tmp_path):
    """With an empty store (a fresh install), ``klal NAME --help`` prints the shipped text without importing torch,
    transformers, Lightning or jsonargparse (what made the first call take 9-10 CPU-seconds)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("KLAL_DEBUG", "KLAL_HELP_CACHE")}
    env["KLAL_CACHE_DIR"] = str(tmp_path / "empty")
    for name, *argv in (("train", "fit", "--help"), ("discover-heads", "--help")):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "klal", name, *argv], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == helpcache.shipped_texts()[help_key(f"klal {name}", argv)]
        imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
        assert imported and not imported & {"torch", "transformers", "lightning", "jsonargparse"}
    assert not (tmp_path / "empty").exists()  # nothing had to be built and stored
