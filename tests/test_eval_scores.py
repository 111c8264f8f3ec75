"""klal.eval.scores: per-sample pointing game, evidence mass, target KL and box IoU against hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klal.data.targets import build_target_map
from klal.eval.scores import best_box_iou, box_iou, evidence_mass, pointing_score, target_kl
from tests.eval_samples import BOX_CELLS, GRID4, HW, MAP_A, ev, kl_by_hand


def test_pointing_and_mass_hand_worked():
    assert pointing_score(MAP_A, BOX_CELLS) == 1.0
    assert evidence_mass(MAP_A, BOX_CELLS) == pytest.approx(0.6)
    # Peak elsewhere: (3, 3) raised above 5.
    b = MAP_A.copy()
    b[3, 3] = 6
    assert pointing_score(b, BOX_CELLS) == 0.0
    assert evidence_mass(b, BOX_CELLS) == pytest.approx(6 / 15)
    # Any positive scale and torch input (bfloat16 included) give the same numbers.
    assert evidence_mass(torch.tensor(MAP_A * 7.0, dtype=torch.bfloat16), BOX_CELLS) == pytest.approx(0.6)


def test_pointing_ties_score_the_inside_fraction():
    tie = MAP_A.copy()
    tie[3, 0] = 5  # second peak outside
    assert pointing_score(tie, BOX_CELLS) == 0.5
    flat = np.zeros((4, 4))  # all-zero: uniform, every cell a peak -> chance level 2/16
    assert pointing_score(flat, BOX_CELLS) == pytest.approx(2 / 16)
    assert evidence_mass(flat, BOX_CELLS) == pytest.approx(2 / 16)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (np.full((4, 4), -1.0), "negative"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.ones(4), "2-D"),
    ],
)
def test_bad_maps_raise_with_sample_id(bad, needle):
    with pytest.raises(ValueError, match=f"sample 'x7'.*{needle}"):
        pointing_score(bad, BOX_CELLS, sample_id="x7")


def test_cells_shape_mismatch_raises():
    with pytest.raises(ValueError, match="do not match"):
        evidence_mass(MAP_A, np.ones((3, 4), dtype=bool))


def test_target_kl_against_explicit_formula():
    eps = 1e-4
    # Box [14, 28, 84, 56]: token x 0.5..3 on row 1 -> covered areas 0.5, 1, 1 -> P = 0.2, 0.4, 0.4.
    p_hand = np.zeros((4, 4))
    p_hand[1, 0], p_hand[1, 1], p_hand[1, 2] = 0.2, 0.4, 0.4
    p_klal = build_target_map(ev(boxes=[[14, 28, 84, 56]]), HW, GRID4)
    np.testing.assert_allclose(p_klal, p_hand, atol=1e-12)
    assert target_kl(MAP_A, p_klal, eps) == pytest.approx(kl_by_hand(p_hand, MAP_A, eps), rel=1e-12)
    # A map equal to the target has KL 0; a zero map is uniform.
    assert target_kl(p_hand * 3, p_hand, eps) == pytest.approx(0.0, abs=1e-15)
    zero = np.zeros((4, 4))
    assert target_kl(zero, p_hand, eps) == pytest.approx(kl_by_hand(p_hand, zero, eps), rel=1e-12)
    # Another epsilon changes the number the same way in both computations.
    assert target_kl(MAP_A, p_hand, 0.1) == pytest.approx(kl_by_hand(p_hand, MAP_A, 0.1), rel=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        target_kl(MAP_A, p_hand, 0.0)


# -- boxes -------------------------------------------------------------------------------------------------------------


def test_box_iou_known_values():
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == 0.5
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert box_iou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0  # no union area
    with pytest.raises(ValueError, match="x0 <= x1"):
        box_iou([10, 0, 0, 10], [0, 0, 1, 1])


def test_best_box_iou_uses_top_prediction_and_best_gt():
    gts = [[100, 100, 110, 110], [0, 0, 10, 10]]
    # Only the first prediction counts, even though the second one would be perfect.
    assert best_box_iou([[5, 5, 15, 15], [0, 0, 10, 10]], gts) == pytest.approx(1 / 7)
    assert best_box_iou([], gts) == 0.0


def pointing_and_mass(att, cells):
    return pointing_score(att, cells), evidence_mass(att, cells)


def test_pointing_and_mass_on_a_2x2_map():
    att = np.array([[0.1, 0.5], [0.3, 0.1]])
    cells = np.array([[False, True], [False, False]])
    assert pointing_and_mass(att, cells) == pytest.approx((1.0, 0.5))
    # Scale-free; the peak (0.5) is outside these cells, 0.1 + 0.3 of the mass inside.
    assert pointing_and_mass(att * 4, np.array([[True, False], [True, False]])) == pytest.approx((0.0, 0.4))
    # Two tied peaks, one inside: the expected hit under random tie-breaking.
    assert pointing_and_mass(np.array([[1.0, 1.0], [0.0, 0.0]]), cells)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="do not match"):
        pointing_and_mass(att, np.ones((3, 3), bool))
