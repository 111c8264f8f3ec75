"""The benchmarks' own scores against hand-worked values and their documented edge cases."""

from __future__ import annotations

import pytest

from klal.eval.benchmark_scores import (
    answer_box_to_original,
    box_center_inside,
    majority_answer,
    mc_choice,
    mc_letter,
    parse_answer_box,
    pope_label,
    pope_metrics,
    vqa_normalize,
    vqa_soft_accuracy,
)
from klal.eval.benchmarks import BASELINE_ROWS, score_answer, score_benchmarks

# -- TextVQA: VQA accuracy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("matching", "expected"),
    # Worked by hand: with k of 10 humans matching, the k leave-one-out subsets without a match-giver see k - 1
    # matches... e.g. k = 2: (2 * min(1/3, 1) + 8 * min(2/3, 1)) / 10 = 0.6.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_soft_accuracy_by_number_of_matching_humans(matching: int, expected: float) -> None:
    answers = ["two"] * matching + ["other"] * (10 - matching)
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("The Two dogs!", "2 dogs"),  # article dropped, number word, "!" next to nothing -> space -> stripped
        ("dont", "don't"),  # contraction restored
        ("1,000", "1000"),  # commas dropped first
        ("yes.", "yes"),  # a period not followed by a digit is removed
        ("3.5", "3.5"),  # a decimal point is kept
        ("coca-cola", "coca cola"),  # a hyphen inside a word becomes a space
        ("coca - cola", "coca cola"),  # next to a space it is deleted
        ("the man's hat", "man 's hat"),  # "'s" split off
        ("Ten", "10"),
        ("eleven", "eleven"),  # only zero-ten (and none) become digits
        ("an apple\n", "apple"),
        ("none", "0"),
    ],
)
def test_vqa_normalize_edge_cases(raw: str, normal: str) -> None:
    assert vqa_normalize(raw) == normal


def test_vqa_normalize_removes_at_most_32_periods() -> None:
    # vqaEval.py and lmms-eval pass re.UNICODE (32) where re.sub takes ``count``: the 33rd period onwards stays.
    assert vqa_normalize("x." * 40) == "x" * 32 + "x." * 8
    assert vqa_normalize("x." * 32) == "x" * 32


def test_vqa_soft_accuracy_normalises_both_sides() -> None:
    answers = ["Coca-Cola", "coca cola", "COCA COLA.", "pepsi"] + ["coke"] * 6
    assert vqa_soft_accuracy("The coca cola", answers) == pytest.approx(0.9)  # three humans match
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_soft_accuracy("x", [])


def test_majority_answer_ties_go_to_the_first() -> None:
    assert majority_answer(["coke", "Coca Cola", "coca cola", "coke"]) == "coke"
    assert majority_answer(["a cat", "cat", "dog"]) == "a cat"  # "a cat" and "cat" are one answer after normalising


# -- V* multiple choice ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("said", "letter"),
    [
        ("B", "B"),
        ("b.", "B"),
        ("(C) green", "C"),
        ("The answer is D.", "D"),
        ("Option: A", "A"),
        ("blue", "B"),  # lmms-eval reads a leading A-D as the letter (kept)
        ("red", "D"),  # ... and the only letter A-D anywhere in the text (kept)
        ("white", None),
        ("I think a red one", "A"),  # lmms-eval upper-cases first: the article "a" reads as option A (kept)
        ("", None),
    ],
)
def test_mc_letter_as_lmms_eval_parses(said: str, letter: str | None) -> None:
    assert mc_letter(said, 4) == letter


def test_mc_choice_falls_back_to_option_text() -> None:
    options = ["red", "blue", "light blue", "white"]
    assert mc_choice("blue", options) == "B"  # "blue" is an option; "light blue" is not in the answer
    assert mc_choice("red", options) == "A"  # lmms-eval's parse says D here
    assert mc_choice("It is light blue", options) is None  # names "blue" and "light blue": no single choice
    assert mc_choice("it is white", options) == "D"
    assert mc_choice("B. blue", options) == mc_choice("(B)", options) == mc_choice("The answer is B", options) == "B"
    assert mc_choice("red or white", options) is None  # two options named: no choice
    assert mc_letter("E", 2) is None and mc_letter("B", 2) == "B"


def test_vstar_scores_letter_and_text() -> None:
    row = {"meta": {"options": ["red", "blue"], "label": "B"}, "answer": "B"}
    assert score_answer("vstar", "B", row, None, None)["metrics"] == {"acc": 1.0, "acc_text": 1.0}
    assert score_answer("vstar", "blue", row, None, None)["metrics"] == {"acc": 1.0, "acc_text": 1.0}  # leading B
    row_a = {"meta": {"options": ["red", "blue"], "label": "A"}, "answer": "A"}
    assert score_answer("vstar", "It is red", row_a, None, None)["metrics"] == {"acc": 0.0, "acc_text": 1.0}
    assert score_answer("vstar", "(A)", row, None, None)["metrics"] == {"acc": 0.0, "acc_text": 0.0}


# -- POPE --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("said", "label"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is no dog in the image", "no"),
        ("not sure", "no"),
        ("Nope", "yes"),  # POPE's reader looks for the words no / No / not only
        ("NO", "yes"),  # ... case-sensitively
        ("yes. no", "yes"),  # only the text before the first period counts
        ("", "yes"),
    ],
)
def test_pope_label_as_pope_reads(said: str, label: str) -> None:
    assert pope_label(said) == label


def test_pope_metrics_hand_worked() -> None:
    # tp 2 (rows 0, 4), fp 1 (row 1), fn 1 (row 2), tn 1 (row 3).
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "yes", "no", "yes"])
    assert m == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})
    # All "no": precision has no predicted positive (0 as lmms-eval gives it; POPE's script raises), F1 0, yes-ratio 0.
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m == pytest.approx({"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0})
    with pytest.raises(ValueError, match="yes' or 'no"):
        pope_metrics(["maybe"], ["yes"])


# -- RefCOCO: answer boxes ---------------------------------------------------------------------------------------------


def test_parse_answer_box_formats() -> None:
    assert parse_answer_box('```json\n[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]\n```') == (10, 20, 110, 220)
    assert parse_answer_box("[0.1, 0.2, 0.5,1.0]") == (0.1, 0.2, 0.5, 1.0)
    assert parse_answer_box("(12, 30, 40, 50)") == (12, 30, 40, 50)
    assert parse_answer_box("the left cat") is None


def test_box_conventions_to_original_pixels() -> None:
    hw = (480, 640)
    # Resized image 320 x 240 (half): resized pixels double.
    assert answer_box_to_original([10, 20, 110, 220], "resized_pixels", hw, (240, 320)) == (20, 40, 220, 440)
    assert answer_box_to_original([100, 200, 500, 1000], "normalized_1000", hw) == pytest.approx((64, 96, 320, 480))
    assert answer_box_to_original([0.1, 0.2, 0.5, 1.0], "normalized_1", hw) == pytest.approx((64, 96, 320, 480))
    assert answer_box_to_original([50, 60, 10, 20], "original_pixels", hw) == (10, 20, 50, 60)  # corners sorted
    with pytest.raises(ValueError, match="needs the resized image size"):
        answer_box_to_original([0, 0, 1, 1], "resized_pixels", hw)
    with pytest.raises(ValueError, match="unknown box convention"):
        answer_box_to_original([0, 0, 1, 1], None, hw)
    assert box_center_inside((0, 0, 10, 10), (4, 4, 20, 20)) and not box_center_inside((0, 0, 4, 4), (4, 4, 20, 20))


def test_family_box_conventions_are_family_facts() -> None:
    from klal.models.family import family_for_type

    assert family_for_type("qwen2_5_vl").box_convention == "resized_pixels"
    assert family_for_type("qwen2_vl").box_convention == "normalized_1000"
    assert family_for_type("qwen3_vl").box_convention == "normalized_1000"


def test_refcoco_answer_in_qwen25_resized_pixels_scores_iou_one() -> None:
    from klal.models.family import family_for_type

    fam = family_for_type("qwen2_5_vl")
    h, w = 427, 640  # a COCO image size
    rh, rw = fam.resized_hw(h, w, 56 * 56, 1280 * 28 * 28)
    gold = [64.0, 42.7, 320.0, 213.5]
    said = f"[{gold[0] * rw / w:.0f}, {gold[1] * rh / h:.0f}, {gold[2] * rw / w:.0f}, {gold[3] * rh / h:.0f}]"
    row = {"height": h, "width": w, "evidence": {"boxes": [gold]}, "meta": {}, "answer": ""}
    scored = score_answer("refcoco", said, row, fam.box_convention, (rh, rw))
    assert scored["metrics"]["iou"] > 0.97 and scored["metrics"]["acc@0.5"] == 1.0
    # The same numbers read as original pixels (the wrong convention) miss when the resize is not 1:1.
    assert (rh, rw) != (h, w)
    wrong = score_answer("refcoco", said, row, "normalized_1000", None)
    assert wrong["metrics"]["iou"] < 0.5
    # No box in the answer: IoU 0, as lmms-eval's [0, 0, 0, 0].
    assert score_answer("refcoco", "the cat", row, fam.box_convention, (rh, rw))["metrics"]["iou"] == 0.0


# -- aggregation -------------------------------------------------------------------------------------------------------


class _Rows(list):
    """Rows the scorer reads columns of (like a ``datasets.Dataset``'s non-image columns)."""


def test_score_benchmarks_aggregates_per_category_with_reference_rows() -> None:
    import json

    rows = []
    golds = ["yes", "no", "yes", "no"]
    for k, (gold, cat) in enumerate(zip(golds, ["adversarial", "adversarial", "random", "random"])):
        meta = {"benchmark": "pope", "category": cat}
        rows.append(
            {
                "id": f"p{k}",
                "task": "pope",
                "answer": gold,
                "meta": json.dumps(meta),
                "evidence": {"boxes": [], "points": [], "polylines": []},
                "width": 10,
                "height": 10,
            }
        )
    said = ["Yes", "Yes", "No", "There is no cat"]  # -> yes yes no no
    samples = {"m": [{"id": f"p{k}", "dataset": "d", "answer": a} for k, a in enumerate(said)]}
    out = score_benchmarks(samples, {}, {"d": _Rows(rows)}, None)
    m = out["metrics"]["m"]
    # Overall: tp 1, fp 1, fn 1, tn 1.
    assert m["pope"]["accuracy"]["value"] == 0.5 and m["pope"]["yes_ratio"]["value"] == 0.5
    assert m["pope/adversarial"]["precision"]["value"] == 0.5 and m["pope/adversarial"]["recall"]["value"] == 1.0
    assert m["pope/random"]["recall"]["value"] == 0.0 and m["pope/random"]["accuracy"]["value"] == 0.5
    assert [s["bench"]["correct"] for s in samples["m"]] == [True, False, False, True]
    # Reference rows: the most frequent gold answer ("yes", first of a tie) everywhere; a fair coin.
    assert set(BASELINE_ROWS) <= set(out["metrics"])
    assert out["metrics"]["most frequent answer"]["pope"]["yes_ratio"]["value"] == 1.0
    assert out["metrics"]["chance"]["pope"]["accuracy"]["value"] == 0.5
    assert out["benchmarks"] == {"pope": "pope"}
