"""Every default of every grounding method, pinned by the table in docs/grounding.md ("Every default").

The table is the one place that says, option by option, what klal's default is and what the authors' released code
uses; this test reads it, so the code, the table and the authors' values cannot drift apart. The EvalConfig-level
``decoding`` setting that overrides the methods' own decoding default is tested here too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from klal.decode import Decoding
from klal.eval.config import EvalConfig, MethodSpec
from klal.grounding import available_methods, method_class

DOC = Path(__file__).resolve().parents[1] / "docs" / "grounding.md"
HEADING = "#### Every default"
LITERAL = re.compile(r"^`([^`]*)`$")
SOURCE = re.compile(r"[\w/]+\.(py|yaml):\d+")


def _table() -> list[dict[str, str]]:
    """The rows of the first table after :data:`HEADING`, as ``{column header: cell}``."""
    lines = DOC.read_text().splitlines()
    start = lines.index(HEADING)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    header, rule, *body = rows
    assert set("".join(rule)) <= {"-", "|"}, rule
    assert all(len(r) == len(header) for r in body), [r for r in body if len(r) != len(header)]
    return [dict(zip(header, r)) for r in body]


def _literal(cell: str) -> tuple[bool, Any]:
    """``(True, value)`` for a cell holding one backticked YAML value, else ``(False, None)``."""
    m = LITERAL.match(cell)
    return (True, yaml.safe_load(m.group(1))) if m else (False, None)


def _plain(value: Any) -> Any:
    """Tuples as lists, so a YAML list compares equal to a tuple default."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _defaults() -> dict[tuple[str, str], Any]:
    return {
        (name, f.name): f.default
        for name in available_methods()
        for f in dataclasses.fields(method_class(name).Options)
    }


def test_the_table_lists_every_option_of_every_method_once():
    listed = [(_literal(r["method"])[1], _literal(r["option"])[1]) for r in _table()]
    assert len(listed) == len(set(listed)), "an option is listed twice"
    assert set(listed) == set(_defaults())


def test_klals_column_is_each_options_default():
    defaults = _defaults()
    for row in _table():
        key = (_literal(row["method"])[1], _literal(row["option"])[1])
        cell = row["klal's default"]
        is_value, value = _literal(cell)
        assert is_value, f"{key}: klal's default must be one backticked value, got {cell!r}"
        default = defaults[key]
        assert _plain(value) == _plain(default) and type(value) is type(_plain(default)), (key, value, default)


def test_where_the_authors_have_a_value_klals_default_is_that_value_and_the_source_line_is_named():
    compared = 0
    for row in _table():
        key = (_literal(row["method"])[1], _literal(row["option"])[1])
        is_value, authors = _literal(row["authors' value"])
        if not is_value:
            continue
        compared += 1
        assert _plain(authors) == _plain(_literal(row["klal's default"])[1]), key
        source = row["authors' source"]
        assert SOURCE.search(source), f"{key}: no file:line in {source!r}"
    # 27 rows hold an authors' value (EGG 9, ViCrop rel-att 8 and grad-att 6, localization heads 4); turning one into
    # words would exempt it from the comparison, so the count is pinned.
    assert compared == 27


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("entropy_gradient", "smooth_mode", "reflect"),
        ("entropy_gradient", "max_rounds", 15),
        ("entropy_gradient", "answer_crops", "replanned"),
        ("entropy_gradient", "max_new_tokens", 100),
        ("entropy_gradient", "decoding", "generation_config"),
        ("vicrop_rel_att", "zoom", False),
        ("vicrop_rel_att", "eps", 0.0),
        ("vicrop_rel_att", "max_new_tokens", 20),
        ("vicrop_rel_att", "decoding", "generation_config"),
        ("vicrop_grad_att", "decoding", "generation_config"),
    ],
)
def test_the_authors_values_the_issues_named(method, option, value):
    # The release's values, read at the source lines in the table (EGG inference_llava.py:213, :474, :464-477,
    # utils.py:241; ViCrop run.py:157-170, qwen2_5_methods.py:43).
    (row,) = [r for r in _table() if (r["method"], r["option"]) == (f"`{method}`", f"`{option}`")]
    assert _literal(row["authors' value"]) == (True, value)
    assert _defaults()[(method, option)] == value


def test_an_evaluations_decoding_goes_to_every_row_that_takes_it_unless_the_row_sets_its_own():
    rows = [
        MethodSpec("entropy_gradient"),
        MethodSpec("vicrop_rel_att", options={"decoding": "generation_config", "max_new_tokens": 4}),
        MethodSpec("attention_probe", options={"query": "generated_last"}),
        MethodSpec("localization_heads", options={"top_k": 3}),
        MethodSpec("laser"),
    ]
    cfg = EvalConfig(methods=rows, decoding="greedy")
    assert [m.options for m in cfg.method_rows()] == [
        {"decoding": "greedy"},
        {"decoding": "generation_config", "max_new_tokens": 4},  # the row's own choice wins
        {"decoding": "greedy", "query": "generated_last"},
        {"top_k": 3},  # no answer, no decoding option
        {},  # LASER decodes with its own contrastive argmax loop
    ]
    assert [m.options for m in rows][0] == {}  # the config's rows are not changed in place
    assert EvalConfig(methods=rows).method_rows() == rows  # None: each method's own default
    # The setting's values are the methods' (spelt again in klal.eval.config, which does not import torch).
    setting = typing.get_type_hints(EvalConfig)["decoding"]
    assert typing.get_args(setting) == (Decoding, type(None))
