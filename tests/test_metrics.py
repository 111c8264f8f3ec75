"""klal.metrics: evidence cells, per-sample scores against hand-worked numbers, answer normalisation, counting rules
and an exact 2-process DDP sync."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from klal.data.schema import Evidence
from klal.metrics import (
    METRIC_NAMES,
    METRIC_RANGES,
    AnswerAccuracy,
    BoxAccuracy,
    BoxIoU,
    EvidenceMass,
    GroundingMetrics,
    PointingGame,
    TargetKL,
    answer_correct,
    answer_kind,
    best_box_iou,
    box_iou,
    evidence_cells,
    evidence_mass,
    normalize_answer,
    pointing_score,
    target_kl,
)
from klal.targets import TargetMapError, build_target_map

# A 112 x 112 image is its own processed size only with small min_pixels; here the geometry is given explicitly:
# processed (112, 112) is a 4 x 4 token grid, one token = 28 px of the original when the original is 112 x 112 too.
HW = (112, 112)
GRID4 = (112, 112)


def cells_of(*ij: tuple[int, int], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for i, j in ij:
        out[i, j] = True
    return out


def record(
    rid: str,
    evidence: dict,
    answer: str = "3",
    hw: tuple[int, int] = HW,
    task: str = "t",
) -> dict:
    return {"id": rid, "task": task, "answer": answer, "height": hw[0], "width": hw[1], "evidence": evidence}


def ev(boxes=(), points=(), polylines=()) -> dict:
    return {"boxes": [list(b) for b in boxes], "points": [list(p) for p in points], "polylines": list(polylines)}


def kl_by_hand(p: np.ndarray, q: np.ndarray, eps: float) -> float:
    """KL(P_eps || Q_eps), written out cell by cell."""
    p = p / p.sum()
    q = q / q.sum() if q.sum() > 0 else np.full(q.shape, 1.0 / q.size)
    v = p.size
    total = 0.0
    for a, b in zip(p.ravel(), q.ravel()):
        pa = (1 - eps) * a + eps / v
        qb = (1 - eps) * b + eps / v
        total += pa * math.log(pa / qb)
    return total


# -- evidence cells ----------------------------------------------------------------------------------------------------


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


def test_bad_processed_size_raises():
    with pytest.raises(TargetMapError, match="multiples of 28"):
        evidence_cells(ev(boxes=[[0, 0, 28, 28]]), HW, (100, 112))


# -- per-sample map scores on a hand-made 4 x 4 map --------------------------------------------------------------------

MAP_A = np.array(
    [
        [0, 0, 0, 0],
        [0, 5, 1, 0],
        [0, 0, 2, 0],
        [1, 0, 0, 1],
    ],
    dtype=float,
)  # sum 10
BOX_CELLS = cells_of((1, 1), (1, 2))  # evidence box [28, 28, 84, 56]


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


def test_box_metrics_counting_rules():
    iou, acc = BoxIoU(), BoxAccuracy()
    gt = [[0, 0, 10, 10]]
    for m in (iou, acc):
        m.update([[0, 0, 10, 5]], gt)  # IoU 0.5 -> correct at the 0.5 threshold
        m.update([[5, 5, 15, 15]], gt)  # IoU 1/7
        m.update([], gt)  # no prediction: IoU 0, counted
        m.update(None, gt)  # method predicts no boxes: skipped
        m.update([[0, 0, 1, 1]], [])  # no gt: skipped
    assert iou.compute().item() == pytest.approx((0.5 + 1 / 7 + 0) / 3)
    assert acc.compute().item() == pytest.approx(1 / 3)
    assert iou.summary() == {"value": pytest.approx((0.5 + 1 / 7) / 3), "count": 3, "skipped": 2, "no_prediction": 1}
    loose = BoxAccuracy(iou_threshold=0.1)
    loose.update([[5, 5, 15, 15]], gt)
    assert loose.compute().item() == 1.0


def test_empty_metric_is_zero_with_count_zero():
    for m in (PointingGame(), EvidenceMass(), TargetKL(), BoxIoU(), AnswerAccuracy()):
        with pytest.warns(UserWarning, match="before the ``update``"):
            value = m.compute()
        assert value.item() == 0.0 and not torch.isnan(value)
        assert m.summary()["count"] == 0


def test_metric_classes_average_and_skip():
    pg = PointingGame()
    pg.update(MAP_A, BOX_CELLS)
    pg.update(np.rot90(MAP_A, 2).copy(), BOX_CELLS)  # peak moves to (2, 2): outside
    pg.update(MAP_A, None)  # no evidence cells
    pg.update(None, BOX_CELLS)  # no map
    assert pg.summary() == {"value": 0.5, "count": 2, "skipped": 2}
    assert pg.compute().item() == 0.5


# -- answers -----------------------------------------------------------------------------------------------------------


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


# -- GroundingMetrics --------------------------------------------------------------------------------------------------


def test_grounding_metrics_end_to_end_hand_worked():
    gm = GroundingMetrics(epsilon=1e-4)
    rec = record("a", ev(boxes=[[28, 28, 84, 56]]), answer="3")
    other = np.zeros((4, 4))
    other[0, 0] = 1.0  # image 1's map: would miss the evidence, but only map 0 is used
    gm.update("m", "t", [MAP_A, other], [[28, 28, 84, 56]], "three", rec)
    rec2 = record("b", ev(points=[[100, 100]]), answer="Yes")  # no gt box; target = point Gaussian
    gm.update("m", "t", [MAP_A], [[0, 0, 10, 10]], "no", rec2, processed_hw=GRID4)
    out = gm.compute()
    r = out["m"]["t"]
    assert list(r) == list(METRIC_NAMES)
    assert r["pointing_game"] == {"value": 0.5, "count": 2, "skipped": 0}  # hit, then peak (1,1) vs cell (3,3)
    assert r["evidence_mass"]["value"] == pytest.approx((0.6 + 0.1) / 2)
    p_box = np.zeros((4, 4))
    p_box[1, 1] = p_box[1, 2] = 0.5
    p_point = build_target_map(ev(points=[[100, 100]]), HW, GRID4)
    want_kl = (kl_by_hand(p_box, MAP_A, 1e-4) + kl_by_hand(p_point, MAP_A, 1e-4)) / 2
    assert r["target_kl"]["value"] == pytest.approx(want_kl, rel=1e-12)
    assert r["box_iou"] == {"value": 1.0, "count": 1, "skipped": 1, "no_prediction": 0}
    assert r["box_accuracy"]["value"] == 1.0
    assert r["answer_accuracy"] == {"value": 0.5, "count": 2, "skipped": 0}
    for name, stats in r.items():
        lo, hi = METRIC_RANGES[name]
        assert lo <= stats["value"] <= hi


def test_grounding_metrics_skips_are_visible():
    gm = GroundingMetrics()
    gm.update("probe", "t", None, None, None, record("a", ev(boxes=[[0, 0, 28, 28]])))
    gm.update("probe", "t", [np.ones((4, 4))], [], None, record("b", ev()))  # no evidence at all
    r = gm.compute()["probe"]["t"]
    assert r["pointing_game"] == {"value": 0.0, "count": 0, "skipped": 2}
    assert r["target_kl"]["skipped"] == 2
    assert r["box_iou"] == {"value": 0.0, "count": 0, "skipped": 2, "no_prediction": 0}
    assert r["answer_accuracy"]["skipped"] == 2


def test_update_result_and_methods_without_boxes():
    gm = GroundingMetrics()
    rec = record("a", ev(boxes=[[28, 28, 84, 56]]), answer="Yes", task="grid")
    res = SimpleNamespace(maps=[MAP_A], boxes=[], answer="yes!")
    gm.update_result("heads", res, rec)
    gm.update_result("probe", res, rec, predicts_boxes=False)
    out = gm.compute()
    assert out["heads"]["grid"]["box_iou"] == {"value": 0.0, "count": 1, "skipped": 0, "no_prediction": 1}
    assert out["probe"]["grid"]["box_iou"] == {"value": 0.0, "count": 0, "skipped": 1, "no_prediction": 0}
    assert out["probe"]["grid"]["answer_accuracy"]["value"] == 1.0
    assert out["probe"]["grid"]["evidence_mass"]["value"] == pytest.approx(0.6)
    assert gm.keys == [("heads", "grid"), ("probe", "grid")]
    gm.reset()
    assert gm.compute() == {}


def test_grounding_metrics_errors_name_the_sample():
    gm = GroundingMetrics()
    with pytest.raises(ValueError, match=r"sample 'q1'.*grid \(4, 4\).*\(5, 4\)"):
        gm.update("m", "t", [MAP_A], None, None, record("q1", ev(boxes=[[0, 0, 28, 28]])), processed_hw=(140, 112))
    with pytest.raises(TargetMapError, match=r"sample 'q2'.*boxes\[0\]"):
        gm.update("m", "t", [MAP_A], None, None, record("q2", ev(boxes=[[0, 0, -5, 28]])))
    with pytest.raises(ValueError, match=r"'q3' lacks key\(s\) \['evidence'\]"):
        gm.update("m", "t", [MAP_A], None, None, {"id": "q3", "answer": "1", "width": 1, "height": 1})
    with pytest.raises(ValueError, match="sample 'q4'.*negative"):
        gm.update("m", "t", [-MAP_A], None, None, record("q4", ev(boxes=[[0, 0, 28, 28]])))


# -- DDP ---------------------------------------------------------------------------------------------------------------


def _ddp_samples() -> list[tuple]:
    """Deterministic (method, task, maps, boxes, answer, record) samples; both workers and the parent rebuild them."""
    out = []
    for i in range(10):
        rng = np.random.default_rng(i)
        grid = rng.random((4, 4)) ** 4
        x0, y0 = rng.integers(0, 70, 2)
        gt = [float(x0), float(y0), float(x0 + 40), float(y0 + 30)]
        evidence = ev(boxes=[gt]) if i % 3 else ev(points=[[float(x0), float(y0)]])
        boxes = None if i % 4 == 0 else ([] if i % 5 == 0 else [[gt[0] + 5, gt[1], gt[2] + 5, gt[3] + 10]])
        answer = ["3", "three", "4", None][i % 4]
        method = "only_rank0" if i == 0 else ["a", "b"][i % 2]
        task = ["t1", "t2"][(i // 2) % 2]
        out.append((method, task, [grid], boxes, answer, record(f"s{i}", evidence, answer="3", task=task)))
    return out


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # One thread: a forked child must not enter an OpenMP region the parent's pool may have left behind.
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gm = GroundingMetrics()
        # Rank 0 gets samples 0, 2, 4, ...: only it sees the ("only_rank0", ...) key, so rank 1 must join that sync.
        for method, task, maps, boxes, answer, rec in _ddp_samples()[rank::world]:
            gm.update(method, task, maps, boxes, answer, rec)
        first = gm.compute()
        second = gm.compute()  # local states are restored after the sync, so computing again gives the same
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"first": first, "second": second}))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_sync_equals_single_process(tmp_path):
    single = GroundingMetrics()
    for method, task, maps, boxes, answer, rec in _ddp_samples():
        single.update(method, task, maps, boxes, answer, rec)
    want = single.compute()
    assert set(want) == {"only_rank0", "a", "b"}  # rank 1 sees only "b"

    # fork (where available) inherits the imports, which dominate the runtime of freshly spawned workers.
    method = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"
    args = (2, str(tmp_path / "init"), str(tmp_path))
    ctx = torch.multiprocessing.start_processes(_ddp_worker, args=args, nprocs=2, join=False, start_method=method)
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 60 s")
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for which in ("first", "second"):
            res = got[which]
            assert res.keys() == want.keys()
            for method in want:
                assert res[method].keys() == want[method].keys()
                for task in want[method]:
                    for name, stats in want[method][task].items():
                        g = res[method][task][name]
                        assert g.keys() == stats.keys()
                        for k, v in stats.items():
                            if k == "value":
                                assert g[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (rank, method, task, name)
                            else:
                                assert g[k] == v, (rank, method, task, name, k)
