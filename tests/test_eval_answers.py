"""klal.eval.answers: answer normalisation by the gold answer's kind, and its use by AnswerAccuracy."""

from __future__ import annotations

import pytest

from klal.eval.answers import answer_correct, answer_kind, normalize_answer
from klal.eval.metrics import AnswerAccuracy


@pytest.mark.parametrize(
    ("pred", "gold", "norm", "ok"),
    [
        (" 3.", "3", "3", True),
        ("3", "3", "3", True),
        ("There are three crossings", "3", "3", True),
        ("The lines cross twice.", "2", "2", True),
        ("None of them cross", "0", "0", True),
        ("3.0", "3", "3", True),
        ("3.5", "3", "3.5", False),
        ("There are 4 crossings, not 3", "3", "4", False),
        ("thirty", "3", "", False),  # not a number word we read; "three" is not inside it as a word
        ("someone", "1", "", False),
        ("I cannot tell", "3", "", False),
        ("yes!", "Yes", "yes", True),
        ("YES", "yes", "yes", True),
        ("No, they are not connected.", "No", "no", True),
        ("Not connected", "No", "", False),
        ("Yes", "No", "yes", False),
        ("(2,3)", "(2, 3)", "(2, 3)", True),
        ("Row 2, column 3", "(2, 3)", "(2, 3)", True),
        ("column 3, row 2", "(2, 3)", "(2, 3)", True),
        ("row two, col three", "(2, 3)", "(2, 3)", True),
        ("It is in the 2nd row and 3rd column.", "(2, 3)", "(2, 3)", True),
        ("2-3", "(2, 3)", "(2, 3)", True),
        ("(3, 2)", "(2, 3)", "(3, 2)", False),
        ("Row 2", "(2, 3)", "", False),
        (" Red  Circle. ", "red circle", "red circle", True),
        ("A red circle", "red circle", "a red circle", False),  # exact match: articles are not dropped
        ("blue circle", "red circle", "blue circle", False),
    ],
)
def test_answer_normalisation(pred, gold, norm, ok):
    assert normalize_answer(pred, gold) == norm
    assert answer_correct(pred, gold) is ok


def test_answer_kinds_and_empty_gold():
    assert [answer_kind(g) for g in ("3", "Yes", "no.", "(2, 5)", "cat")] == [
        "integer",
        "yes_no",
        "yes_no",
        "row_column",
        "text",
    ]
    with pytest.raises(ValueError, match="empty"):
        answer_correct("x", "?!")
    acc = AnswerAccuracy()
    acc.update("three", "3")
    acc.update("4", "3")
    acc.update(None, "3")
    assert acc.summary() == {"value": 0.5, "count": 2, "skipped": 1}
    with pytest.raises(ValueError, match="sample 's9'"):
        acc.update("x", "", sample_id="s9")
