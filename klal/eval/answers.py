"""Answer normalisation: is a predicted answer text the gold answer?

:func:`answer_kind` decides from the gold answer how answers are compared (integer, yes/no, ``(row, column)`` or free
text), :func:`normalize_answer` brings a text into that kind's canonical form and :func:`answer_correct` compares the
two. Used for every answer klal scores: the methods that answer, and greedy generation in the study and the demo.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

AnswerKind = Literal["integer", "yes_no", "row_column", "text"]

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "  # noqa: SIM905
        "seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"none": 0, "once": 1, "twice": 2, "thrice": 3})
_WORD_ALT = "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True))
# A number: digits with an optional decimal part ("3." is the integer 3 followed by a full stop), or a number word.
# A sign counts only after a non-word character, so "2-3" reads as 2 and 3, not 2 and -3.
_NUMBER_RE = re.compile(rf"(?P<num>(?:(?<![\w.])[-+])?\d+(?:\.\d+)?)|\b(?P<word>{_WORD_ALT})\b")
_NUM_TOKEN = rf"(?:\d+|{_WORD_ALT})\b"
_ROW_RE = re.compile(rf"\brows?\b\s*(?:#|no\.?|number)?\s*(?P<n>{_NUM_TOKEN})")
_COL_RE = re.compile(rf"\b(?:columns?|cols?)\b\s*(?:#|no\.?|number)?\s*(?P<n>{_NUM_TOKEN})")
_YES_NO_RE = re.compile(r"\b(yes|no)\b")
_GOLD_INT_RE = re.compile(r"^[-+]?\d+\.?$")
_GOLD_ROW_COL_RE = re.compile(r"^\(\s*[-+]?\d+\s*,\s*[-+]?\d+\s*\)$")


def _strip_punct(text: str) -> str:
    """Casefold, drop Unicode punctuation, collapse whitespace."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.casefold())
    return " ".join(kept.split())


def answer_kind(gold: str) -> AnswerKind:
    """How answers to this gold answer are compared.

    * ``integer``: gold is an integer (``"3"``);
    * ``yes_no``: gold is yes or no (any case, punctuation ignored);
    * ``row_column``: gold is ``"(row, column)"`` (two integers in parentheses);
    * ``text``: anything else.
    """
    g = gold.strip()
    if _GOLD_INT_RE.match(g):
        return "integer"
    if _strip_punct(g) in ("yes", "no"):
        return "yes_no"
    if _GOLD_ROW_COL_RE.match(g):
        return "row_column"
    return "text"


def _number_value(m: re.Match[str]) -> str:
    if m.group("word") is not None:
        return str(_NUMBER_WORDS[m.group("word")])
    num = m.group("num")
    if "." in num:
        whole, frac = num.split(".")
        # "3.0" is the integer 3; "3.5" stays a decimal and matches no integer answer.
        return str(int(whole)) if set(frac) == {"0"} else num.lstrip("+")
    return str(int(num))


def _token_value(token: str) -> str:
    return str(_NUMBER_WORDS[token]) if token in _NUMBER_WORDS else str(int(token))


def normalize_answer(text: str, gold: str) -> str:
    """Canonical form of ``text`` for comparison with ``gold``, by :func:`answer_kind` of ``gold``.

    * integer: the first number in the text, digits or a word (``"zero"`` to ``"twenty"``, ``"none"``, ``"once"``,
      ``"twice"``, ``"thrice"``), as a plain integer string (``" 3."`` -> ``"3"``, ``"There are three crossings"`` ->
      ``"3"``); a non-integer decimal stays as written (``"3.5"``) and so matches no integer;
    * yes/no: the first standalone ``yes`` or ``no`` word (``"yes!"`` -> ``"yes"``; ``"not"`` is not ``no``);
    * row/column: ``"(r, c)"`` from explicitly labelled ``row N`` and ``column M`` when both are present in any order
      (``"Column 3, row 2"`` -> ``"(2, 3)"``), otherwise the first two numbers (``"(2,3)"`` -> ``"(2, 3)"``);
    * text: casefolded, punctuation removed, whitespace collapsed.

    Returns an empty string when the text holds nothing of the required kind (never a correct answer).
    """
    kind = answer_kind(gold)
    low = text.casefold()
    if kind == "integer":
        m = _NUMBER_RE.search(low)
        return _number_value(m) if m else ""
    if kind == "yes_no":
        m = _YES_NO_RE.search(low)
        return m.group(1) if m else ""
    if kind == "row_column":
        row, col = _ROW_RE.search(low), _COL_RE.search(low)
        if row and col:
            return f"({_token_value(row.group('n'))}, {_token_value(col.group('n'))})"
        nums = [_number_value(m) for m in _NUMBER_RE.finditer(low)][:2]
        return f"({nums[0]}, {nums[1]})" if len(nums) == 2 else ""
    return _strip_punct(text)


def answer_correct(pred: str, gold: str) -> bool:
    """Whether a predicted answer matches the gold one after :func:`normalize_answer` of both.

    Raises:
        ValueError: the gold answer is empty (after normalisation), so nothing could match it.
    """
    want = normalize_answer(gold, gold)
    if not want:
        raise ValueError(f"gold answer {gold!r} is empty after normalisation")
    return normalize_answer(pred, gold) == want


__all__ = ["AnswerKind", "answer_correct", "answer_kind", "normalize_answer"]
