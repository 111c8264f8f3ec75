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
