"""The public benchmarks' own answer scores: one sample's answer text against its gold, as each benchmark scores it.

Each function scores one sample; :mod:`klal.eval.benchmarks` averages them per method and task. Sources, and where
klal differs from lmms-eval (the harness most users compare against), are in docs/benchmarks.md.

* TextVQA (:func:`vqa_soft_accuracy`): the VQA accuracy. Prediction and each of the ten human answers are normalised
  (:func:`vqa_normalize`: lower case, commas and question marks dropped, ``'s`` split off, punctuation removed or
  spaced, periods not followed by a digit removed (at most 32, as the official code does), number words zero-ten and
  "none" as digits, articles dropped, apostrophe-less contractions restored); then for each of the ten answers the
  prediction scores ``min(#matches among the other nine / 3, 1)``, and the sample's score is the mean over the ten
  leave-one-out subsets (so 1 matching human gives 0.3, 2 give 0.6, 3 give 0.9, 4 or more give 1.0).
* V* Bench (:func:`mc_letter`, :func:`mc_choice`): the option letter parsed from the answer as lmms-eval's
  ``vstar_bench`` parses it (a leading letter, "answer is X", "(X)", "X." / "X)", a standalone letter, the only
  letter A-D in the text); :func:`mc_choice` reads a clean letter, then the option *text* (the answer names exactly
  one option), then lmms-eval's parse.
* POPE (:func:`pope_label`, :func:`pope_metrics`): yes/no as POPE's own evaluation reads an answer (text up to the
  first period, commas dropped, split on spaces: "no", "No" or "not" among the words is *no*, anything else *yes*);
  accuracy, precision, recall and F1 of *yes* as the positive class, and yes-ratio = share of *predicted* yes.
* RefCOCO (:func:`parse_answer_box`, :func:`answer_box_to_original`): the first ``[x0, y0, x1, y1]`` in the answer,
  mapped from the model family's box convention (:attr:`klal.models.family.VLMFamily.box_convention`) to original
  pixels; Acc@0.5 is ``IoU >= 0.5`` with the gold box (:func:`klal.eval.scores.box_iou`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# -- TextVQA / VQA -----------------------------------------------------------------------------------------------------

# The VQA evaluation's contraction table, keyed by the apostrophe-less spelling (a normalised answer uses the
# apostrophe form). Written as "key=value" pairs; a bare word maps to itself with the apostrophe restored where given.
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in (  # noqa: SIM905 - a table is easier to check as text
        "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
        "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
        "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
        "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
        "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
        "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
        "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
        "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
        "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
        "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
        "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
        "somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll "
        "thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's "
        "theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've "
        "twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll "
        "whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've "
        "whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll "
        "whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
        "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've "
        "y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll "
        "youre=you're youve=you've"
    ).split()
)
_VQA_NUMBERS = {
    w: str(i)
    for i, w in enumerate("zero one two three four five six seven eight nine ten".split())  # noqa: SIM905
} | {"none": "0"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = ';/[]"{}()=+\\_->@`,?!<'
# The VQA evaluation's period pattern is written "(?!<=\d)(\.)(?!\d)": the first group is a negative lookahead for the
# literal "<=" + digit (a typo for a lookbehind) that always holds before a period, so in effect a period not followed
# by a digit is removed. The official vqaEval.py and lmms-eval both call ``sub("", text, re.UNICODE)``: the flag lands
# in the ``count`` argument, so at most re.UNICODE = 32 periods go. Kept as both act.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_PERIOD_COUNT = int(re.UNICODE)  # 32
_VQA_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def _vqa_punctuation(text: str) -> str:
    out = text
    digit_comma = _VQA_DIGIT_COMMA.search(text) is not None
    for p in _VQA_PUNCT:
        # A mark next to a space (or any text with a comma between digits) is deleted; elsewhere it becomes a space.
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def vqa_normalize(text: str) -> str:
    """An answer as the VQA / EvalAI evaluation normalises it before matching (module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _vqa_punctuation(text)
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of ``pred`` against the human ``answers`` (ten in TextVQA): the mean over leave-one-out subsets of
    ``min(#matches / 3, 1)``, after :func:`vqa_normalize` of everything.

    Raises:
        ValueError: no human answer.
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one human answer")
    p = vqa_normalize(pred)
    gts = [vqa_normalize(a) for a in answers]
    accs = [min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / 3.0) for i in range(len(gts))]
    return sum(accs) / len(accs)


# -- V* Bench: multiple choice -----------------------------------------------------------------------------------------

LETTERS = "ABCDEFGH"


def _letter_patterns(n: int) -> list[re.Pattern[str]]:
    cls = f"[{LETTERS[:n]}]"
    return [
        re.compile(rf"^({cls})\s*[\.)\]]*"),
        re.compile(rf"(?:THE\s+)?(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+({cls})"),
        re.compile(rf"\(({cls})\)"),
        re.compile(rf"({cls})\s*(?:\.|\)|])"),
        re.compile(rf"(?:^|\s)({cls})(?:\s|$)"),
    ]


def mc_letter(pred: str, num_options: int = 4) -> str | None:
    """The option letter in an answer, parsed as lmms-eval's ``vstar_bench`` does (module docstring), or None.

    The text is upper-cased first, so a lower-case "a" in a sentence reads as A, an answer starting with A-D ("blue")
    as that letter, and a text with one letter A-D anywhere ("red": D) as that letter (lmms-eval's behaviour, kept;
    :func:`mc_choice` reads option texts first).
    """
    text = pred.strip().upper()
    for pat in _letter_patterns(num_options):
        m = pat.search(text)
        if m:
            return m.group(1)
    letters = re.findall(f"[{LETTERS[:num_options]}]", text)
    if len(letters) == 1:
        return letters[0]
    return None


def mc_choice(pred: str, options: Sequence[str]) -> str | None:
    """The chosen option's letter, reading the option *text* before lmms-eval's loose letter rules.

    In order: a letter standing alone at the start (``"B"``, ``"(B)"``, ``"B. blue"``) or after "answer is"; else the
    one option whose text (normalised as :func:`vqa_normalize`) the answer contains as a whole phrase; else
    :func:`mc_letter`. lmms-eval's parse alone reads ``"blue"`` as B (a leading letter) and ``"red"`` as D (the only
    letter A-D in the text); here both are read as the options they name.
    """
    n = len(options)
    text = pred.strip().upper()
    cls = f"[{LETTERS[:n]}]"
    m = re.match(rf"^\(?({cls})\)?(?:[.):\]]|\s|$)", text) or re.search(
        rf"(?:ANSWER|CHOICE|OPTION)(?:\s+IS)?[\s:]+\(?({cls})\b", text
    )
    if m:
        return m.group(1)
    said = f" {vqa_normalize(pred)} "
    hits = [LETTERS[k] for k, o in enumerate(options) if vqa_normalize(o) and f" {vqa_normalize(o)} " in said]
    if len(hits) == 1:
        return hits[0]
    return None if hits else mc_letter(pred, n)


# -- POPE --------------------------------------------------------------------------------------------------------------


def pope_label(pred: str) -> str:
    """``yes`` or ``no`` as POPE's evaluation reads an answer: the text before the first period, commas dropped, split
    on spaces; ``no``, ``No`` or ``not`` among the words is ``no``, anything else (an empty answer included) ``yes``."""
    text = pred.split(".")[0] if "." in pred else pred
    words = text.replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def pope_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """``accuracy``, ``precision``, ``recall``, ``f1`` (yes = positive) and ``yes_ratio`` (share of predicted yes) of
    ``yes``/``no`` labels; a ratio with an empty denominator is 0, as lmms-eval gives it (POPE's own evaluate.py
    divides by zero there and stops).

    Raises:
        ValueError: different lengths, no sample, or a label other than yes/no.
    """
    if len(preds) != len(golds) or not preds:
        raise ValueError(f"pope_metrics needs equal, non-empty lists, got {len(preds)} and {len(golds)}")
    bad = sorted({x for x in (*preds, *golds) if x not in ("yes", "no")})
    if bad:
        raise ValueError(f"pope_metrics: labels must be 'yes' or 'no', got {bad}")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, golds))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, golds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(preds),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(preds),
    }


# -- RefCOCO: a box in the answer --------------------------------------------------------------------------------------

_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX_RE = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")
_BOX_LOOSE_RE = re.compile(rf"\(?\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\)?")


def parse_answer_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[x0, y0, x1, y1]`` in the answer (the bracketed four numbers lmms-eval's RefCOCO task reads; Qwen's
    ``{"bbox_2d": [...]}`` contains one), else the first four comma-separated numbers; None when there is none."""
    m = _BOX_RE.search(text) or _BOX_LOOSE_RE.search(text)
    return tuple(float(m.group(i)) for i in range(1, 5)) if m else None  # type: ignore[return-value]


def answer_box_to_original(
    box: Sequence[float], convention: str | None, orig_hw: tuple[int, int], resized_hw: tuple[int, int] | None = None
) -> tuple[float, float, float, float]:
    """A box written in a family's convention, in original-image pixels (corners sorted, so a swapped box still has an
    area; a reversed box is the model's mistake, not the scorer's).

    Args:
        box: ``(x0, y0, x1, y1)`` as the model wrote it.
        convention: ``resized_pixels``, ``normalized_1000``, ``normalized_1`` or ``original_pixels``
            (:attr:`klal.models.family.VLMFamily.box_convention`).
        orig_hw: original ``(height, width)``.
        resized_hw: the processor-resized ``(height, width)`` (``resized_pixels`` only).

    Raises:
        ValueError: an unknown convention, or ``resized_pixels`` without ``resized_hw``.
    """
    h, w = orig_hw
    if convention == "resized_pixels":
        if resized_hw is None:
            raise ValueError("box convention 'resized_pixels' needs the resized image size")
        sx, sy = w / resized_hw[1], h / resized_hw[0]
    elif convention == "normalized_1000":
        sx, sy = w / 1000.0, h / 1000.0
    elif convention == "normalized_1":
        sx, sy = float(w), float(h)
    elif convention == "original_pixels":
        sx = sy = 1.0
    else:
        raise ValueError(
            f"unknown box convention {convention!r}: expected resized_pixels, normalized_1000, normalized_1 or "
            "original_pixels (set the family's box_convention)"
        )
    x0, y0, x1, y1 = (float(v) for v in box)
    return min(x0, x1) * sx, min(y0, y1) * sy, max(x0, x1) * sx, max(y0, y1) * sy


def box_center_inside(pred: Sequence[float], gold: Sequence[float]) -> bool:
    """Whether the predicted box's centre lies in the gold box (lmms-eval's ``Center_ACC``)."""
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return gold[0] <= cx <= gold[2] and gold[1] <= cy <= gold[3]


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer after :func:`vqa_normalize` (ties: the first given), in its first raw spelling."""
    if not answers:
        raise ValueError("majority_answer needs at least one answer")
    norm = [vqa_normalize(a) for a in answers]
    best = max(range(len(norm)), key=lambda i: (norm.count(norm[i]), -norm.index(norm[i])))
    return str(answers[norm.index(norm[best])])


__all__: list[Any] = [
    "LETTERS",
    "answer_box_to_original",
    "box_center_inside",
    "majority_answer",
    "mc_choice",
    "mc_letter",
    "parse_answer_box",
    "pope_label",
    "pope_metrics",
    "vqa_normalize",
    "vqa_soft_accuracy",
]
