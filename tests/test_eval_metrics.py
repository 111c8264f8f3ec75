"""klal.eval.metrics: the torchmetrics classes' counting rules, GroundingMetrics end to end on hand-worked samples, and
an exact 2-process DDP sync."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from klal.data.targets import TargetMapError, build_target_map
from klal.eval.metrics import (
    METRIC_NAMES,
    METRIC_RANGES,
    AnswerAccuracy,
    BoxAccuracy,
    BoxIoU,
    EvidenceMass,
    GroundingMetrics,
    PointingGame,
    TargetKL,
)
from tests.conftest import HANG_S
from tests.eval_samples import BOX_CELLS, GRID4, HW, MAP_A, ev, kl_by_hand, record


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


# -- GroundingMetrics --------------------------------------------------------------------------------------------------


def test_grounding_metrics_end_to_end_hand_worked():
    gm = GroundingMetrics(epsilon=1e-4)
    rec = record("a", ev(boxes=[[28, 28, 84, 56]]), answer="3")
    other = np.zeros((4, 4))
    other[0, 0] = 1.0  # image 1's map: would miss the evidence, but only map 0 is used
    gm.update("m", "t", [MAP_A, other], [[28, 28, 84, 56]], "three", rec)
    rec2 = record("b", ev(points=[[100, 100]]), answer="Yes")  # no gt box; target = point Gaussian
    gm.update("m", "t", [MAP_A], [[0, 0, 10, 10]], "no", rec2)
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
    deadline = time.monotonic() + HANG_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {HANG_S} s (hung)")
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
