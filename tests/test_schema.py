"""klal.data.schema: the one box parser (parse_box) and point parser, on hand-picked good and bad values."""

from __future__ import annotations

import numpy as np
import pytest

from klal.data.schema import parse_box, parse_point
from klal.data.targets import TargetMapError


def test_required_columns_are_the_features():
    import klal.data.schema as schema

    assert tuple(schema.FEATURES) == schema.REQUIRED_COLUMNS
    assert schema.FEATURES["evidence"] == schema.EVIDENCE_FEATURE
    with pytest.raises(AttributeError, match="FEATURE"):
        schema.FEATURE  # noqa: B018 - the lazy attributes do not hide a misspelt name


def test_parse_box_returns_python_floats():
    got = parse_box([1, 2, 3.5, 4], "box")
    assert got == (1.0, 2.0, 3.5, 4.0) and all(type(v) is float for v in got)
    assert parse_box(np.array([0, 0, 0, 0], dtype=np.float32), "box") == (0.0, 0.0, 0.0, 0.0)  # zero size is allowed
    assert parse_box((5, 5, 5, 9), "box") == (5.0, 5.0, 5.0, 9.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2, 3], r"^sample 'a' boxes\[0\]: needs 4 coordinates \[x0, y0, x1, y1\], got shape \(3,\)"),
        ([[1, 2, 3, 4]], r"needs 4 coordinates"),
        (["a", 0, 1, 1], r"^sample 'a' boxes\[0\]: not a list of numbers"),
        (None, r"needs 4 coordinates"),
        ([0, 0, float("nan"), 1], r"contains NaN or inf"),
        ([0, 0, 1, float("inf")], r"contains NaN or inf"),
        ([10, 0, 5, 5], r"x1 < x0 in \[10.0, 0.0, 5.0, 5.0\].*x0 <= x1"),
        ([0, 10, 5, 5], r"y1 < y0"),
    ],
)
def test_parse_box_errors_name_the_box(value, message):
    with pytest.raises(ValueError, match=message):
        parse_box(value, "sample 'a' boxes[0]")


def test_parse_box_raises_the_callers_error_class():
    with pytest.raises(TargetMapError, match="x1 < x0"):
        parse_box([3, 0, 1, 1], "boxes[0]", TargetMapError)


def test_parse_point():
    assert parse_point([1, 2], "p") == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"^p: needs 2 coordinates \[x, y\]"):
        parse_point([1, 2, 3], "p")
    with pytest.raises(ValueError, match="NaN or inf"):
        parse_point([float("nan"), 2], "p")
