"""klal.data.targets.evidence_cells: the token cells that hold evidence, on hand-worked grids (the grounding metrics'
definition of "inside the evidence")."""

from __future__ import annotations

import numpy as np
import pytest

from klal.data.schema import Evidence
from klal.data.targets import TargetMapError, evidence_cells
from tests.eval_samples import GRID4, HW, cells_of, ev


def test_box_cells_edges_on_borders_do_not_spill():
    # x 28..84 -> token columns 1..3 (cols 1, 2); y 28..56 -> row 1 only.
    got = evidence_cells(ev(boxes=[[28, 28, 84, 56]]), HW, GRID4)
    assert np.array_equal(got, cells_of((1, 1), (1, 2)))
    # Slightly past a border marks the next cell.
    got = evidence_cells(ev(boxes=[[28, 28, 85, 56]]), HW, GRID4)
    assert np.array_equal(got, cells_of((1, 1), (1, 2), (1, 3)))


def test_cells_use_the_per_axis_resize_scale():
    # Original 112 tall x 224 wide shown on a 4 x 4 grid: x scale 4/224, y scale 4/112.
    got = evidence_cells(ev(boxes=[[56, 28, 112, 56]]), (112, 224), GRID4)
    assert np.array_equal(got, cells_of((1, 1)))
    got = evidence_cells(ev(points=[[200, 100]]), (112, 224), GRID4)  # token (3.57, 3.57)
    assert np.array_equal(got, cells_of((3, 3)))


def test_point_cells_including_the_far_border():
    got = evidence_cells(ev(points=[[30, 60], [112, 112]]), HW, GRID4)
    assert np.array_equal(got, cells_of((2, 1), (3, 3)))


def test_polyline_cells():
    horizontal = evidence_cells(ev(polylines=[[[10, 42], [100, 42]]]), HW, GRID4)
    assert np.array_equal(horizontal, cells_of((1, 0), (1, 1), (1, 2), (1, 3)))
    # Through the grid corners: only the diagonal cells, not the ones touched at a corner.
    diagonal = evidence_cells(ev(polylines=[[[0, 0], [112, 112]]]), HW, GRID4)
    assert np.array_equal(diagonal, np.eye(4, dtype=bool))
    # Exactly on the border between rows 1 and 2, over columns 0..1: both rows.
    on_border = evidence_cells(ev(polylines=[[[0, 56], [50, 56]]]), HW, GRID4)
    assert np.array_equal(on_border, cells_of((1, 0), (1, 1), (2, 0), (2, 1)))
    # Steep line from cell (0, 0) to (3, 1): x crosses 28 at y = 5 + 23 * 45/95 (row 0 -> col 1 in row 1).
    steep = evidence_cells(ev(polylines=[[[5, 5], [50, 100]]]), HW, GRID4)
    assert np.array_equal(steep, cells_of((0, 0), (1, 0), (1, 1), (2, 1), (3, 1)))


def test_kinds_combine_and_evidence_object_and_none_values():
    both = evidence_cells(Evidence(boxes=[[0, 0, 28, 28]], points=[[100, 100]]), HW, GRID4)
    assert np.array_equal(both, cells_of((0, 0), (3, 3)))
    hf = evidence_cells({"boxes": [[0, 0, 28, 28]], "points": None, "polylines": None}, HW, GRID4)
    assert np.array_equal(hf, cells_of((0, 0)))


@pytest.mark.parametrize(
    "evidence",
    [ev(), None, ev(boxes=[[200, 200, 300, 300]]), ev(boxes=[[10, 10, 10, 50]]), ev(points=[[-5, 3]])],
    ids=["empty", "none", "outside", "zero-area", "point-outside"],
)
def test_no_cells_gives_none(evidence):
    assert evidence_cells(evidence, HW, GRID4) is None


@pytest.mark.parametrize(
    ("evidence", "needle"),
    [
        (ev(boxes=[[10, 10, 5, 50]]), "boxes[0]"),
        (ev(points=[[1, 2, 3]]), "points[0]"),
        ({"boxez": []}, "boxez"),
        ({"boxes": "0,0,1,1"}, "'boxes' must be a list"),
    ],
)
def test_malformed_evidence_raises(evidence, needle):
    with pytest.raises(TargetMapError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        evidence_cells(evidence, HW, GRID4)


def test_bad_grid_raises():
    with pytest.raises(TargetMapError, match="two positive integers"):
        evidence_cells(ev(boxes=[[0, 0, 28, 28]]), HW, (0, 4))


def test_evidence_cells_on_the_study_grid():
    # 112 px image on a 4 x 4 grid: cells of 28 px; a box over columns 1-2 of row 0, a point in cell (1, 3).
    ev = {"boxes": [[30.0, 2.0, 60.0, 20.0]], "points": [[85.0, 29.0]], "polylines": []}
    want = np.zeros((4, 4), bool)
    want[0, 1:3] = True
    want[1, 3] = True
    assert (evidence_cells(ev, (112, 112), (4, 4)) == want).all()
