"""Line intersection generator and the drawing helpers, against independent computations.

The crossing counts are re-derived from the waypoints stored in meta with a different method than the generator's:
the generator flattens each Catmull-Rom spline into a dense polyline and intersects segments; here each spline piece
is written in Hermite power form and intersections are found by recursive parameter subdivision with exact bounding
boxes (from the roots of the derivative), down to sub-0.05 px pieces.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_gen import draw
from data_gen.base import GenerationError
from data_gen.tasks.line_intersection import (
    ALL_TEMPLATES,
    PAIR_TEMPLATES,
    LineIntersectionConfig,
    LineIntersectionTask,
)

SEEDS = range(40)

# ----------------------------------------------------------------------------------------------- independent recount


def _hermite_pieces(waypoints: list[list[float]]) -> list[np.ndarray]:
    """Power-basis coefficients (a, b, c, d) per piece: p(t) = a t^3 + b t^2 + c t + d, t in [0, 1].

    Uniform Catmull-Rom: tangent m_i = (W[i+1] - W[i-1]) / 2, with the missing end neighbours reflected.
    """
    w = np.asarray(waypoints, dtype=np.float64)
    k = len(w)
    prev = [2 * w[0] - w[1]] + [w[i - 1] for i in range(1, k)]
    nxt = [w[i + 1] for i in range(k - 1)] + [2 * w[-1] - w[-2]]
    m = [(nxt[i] - prev[i]) / 2.0 for i in range(k)]
    pieces = []
    for i in range(k - 1):
        p0, p1, m0, m1 = w[i], w[i + 1], m[i], m[i + 1]
        pieces.append(np.stack([2 * p0 + m0 - 2 * p1 + m1, -3 * p0 - 2 * m0 + 3 * p1 - m1, m0, p0]))
    return pieces


def _eval(co: np.ndarray, t: float) -> np.ndarray:
    return ((co[0] * t + co[1]) * t + co[2]) * t + co[3]


def _deriv(co: np.ndarray, t: float) -> np.ndarray:
    return (3 * co[0] * t + 2 * co[1]) * t + co[2]


def _bbox(co: np.ndarray, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact bounding box of a cubic piece over [t0, t1]: ends plus interior extrema of each coordinate."""
    ts = [t0, t1]
    for dim in range(2):
        qa, qb, qc = 3 * co[0][dim], 2 * co[1][dim], co[2][dim]
        if abs(qa) < 1e-12:
            roots = [-qc / qb] if abs(qb) > 1e-12 else []
        else:
            disc = qb * qb - 4 * qa * qc
            roots = [] if disc < 0 else [(-qb + s * math.sqrt(disc)) / (2 * qa) for s in (-1, 1)]
        ts += [r for r in roots if t0 < r < t1]
    pts = np.array([_eval(co, t) for t in ts])
    return pts.min(0), pts.max(0)


def _orient(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def _chords_meet(p, q, r, s) -> bool:
    """Closed-segment test by orientation signs (no division), touching included."""
    d1, d2, d3, d4 = _orient(r, s, p), _orient(r, s, q), _orient(p, q, r), _orient(p, q, s)
    return d1 * d2 <= 0 and d3 * d4 <= 0 and not (d1 == d2 == 0)


def _piece_crossings(ca, cb, out, ta=(0.0, 1.0), tb=(0.0, 1.0)) -> None:
    lo_a, hi_a = _bbox(ca, *ta)
    lo_b, hi_b = _bbox(cb, *tb)
    if np.any(hi_a < lo_b) or np.any(hi_b < lo_a):
        return
    size_a, size_b = float(np.max(hi_a - lo_a)), float(np.max(hi_b - lo_b))
    if size_a < 0.05 and size_b < 0.05:
        p, q, r, s = _eval(ca, ta[0]), _eval(ca, ta[1]), _eval(cb, tb[0]), _eval(cb, tb[1])
        if _chords_meet(p, q, r, s):
            ua, ub = _deriv(ca, sum(ta) / 2), _deriv(cb, sum(tb) / 2)
            cos = abs(ua @ ub) / (np.linalg.norm(ua) * np.linalg.norm(ub))
            out.append(((p + q + r + s) / 4.0, math.degrees(math.acos(min(1.0, cos)))))
        return
    if size_a >= size_b:
        mid = sum(ta) / 2
        _piece_crossings(ca, cb, out, (ta[0], mid), tb)
        _piece_crossings(ca, cb, out, (mid, ta[1]), tb)
    else:
        mid = sum(tb) / 2
        _piece_crossings(ca, cb, out, ta, (tb[0], mid))
        _piece_crossings(ca, cb, out, ta, (mid, tb[1]))


def recount(wa: list[list[float]], wb: list[list[float]]) -> list[tuple[np.ndarray, float]]:
    """Crossings (point, angle in degrees) of two splines, duplicates at subdivision seams merged."""
    raw: list[tuple[np.ndarray, float]] = []
    for ca in _hermite_pieces(wa):
        for cb in _hermite_pieces(wb):
            _piece_crossings(ca, cb, raw)
    merged: list[tuple[np.ndarray, float]] = []
    for p, ang in raw:
        if all(np.linalg.norm(p - q) > 0.5 for q, _ in merged):
            merged.append((p, ang))
    return merged


@pytest.fixture(scope="module")
def task() -> LineIntersectionTask:
    return LineIntersectionTask(LineIntersectionConfig())


@pytest.fixture(scope="module")
def samples(task):
    return [task.sample(seed, seed) for seed in SEEDS]


# ------------------------------------------------------------------------------------------------------- helpers


def test_segment_intersection_hand_cases():
    assert draw.segment_intersection((0, 0), (2, 2), (0, 2), (2, 0)) == pytest.approx((1.0, 1.0))
    assert draw.segment_intersection((0, 0), (4, 0), (1, -1), (1, 3)) == pytest.approx((1.0, 0.0))
    # Parallel, and collinear overlapping: no single crossing point.
    assert draw.segment_intersection((0, 0), (2, 0), (0, 1), (2, 1)) is None
    assert draw.segment_intersection((0, 0), (2, 0), (1, 0), (3, 0)) is None
    # Touching at endpoints (shared endpoint, and an endpoint on the other segment's interior).
    assert draw.segment_intersection((0, 0), (1, 0), (1, 0), (1, 1)) == pytest.approx((1.0, 0.0))
    assert draw.segment_intersection((0, 0), (2, 0), (1, 0), (1, 5)) == pytest.approx((1.0, 0.0))
    # Lines cross but the segments stop short of it.
    assert draw.segment_intersection((0, 0), (1, 1), (3, 0), (2, 1)) is None


def test_polyline_intersections_half_open_vertices_and_angle():
    # A vertical line through a vertex of a V: one crossing, not two (the vertex belongs to one segment).
    v = np.array([[0.0, 0.0], [2.0, 2.0], [4.0, 0.0]])
    line = np.array([[2.0, -1.0], [2.0, 5.0]])
    hits = draw.polyline_intersections(v, line)
    assert len(hits["i"]) == 1
    assert hits["points"][0] == pytest.approx([2.0, 2.0])
    assert hits["angle"][0] == pytest.approx(45.0)
    # Parallel polylines never cross.
    assert len(draw.polyline_intersections(v, v + [0.0, 1.0])["i"]) == 0


def test_polyline_intersections_match_brute_force_orientation_test():
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = np.cumsum(rng.normal(0, 5, size=(40, 2)), axis=0)
        b = np.cumsum(rng.normal(0, 5, size=(35, 2)), axis=0) + rng.normal(0, 5, size=2)
        expected = {
            (i, j) for i in range(len(a) - 1) for j in range(len(b) - 1) if _chords_meet(a[i], a[i + 1], b[j], b[j + 1])
        }
        hits = draw.polyline_intersections(a, b)
        assert set(zip(hits["i"].tolist(), hits["j"].tolist())) == expected
        for p, i, j in zip(hits["points"], hits["i"], hits["j"]):
            # The point lies on both segments: zero cross product with each direction.
            for s0, s1 in ((a[i], a[i + 1]), (b[j], b[j + 1])):
                assert abs(_orient(s0, s1, p)) < 1e-6 * (1 + np.linalg.norm(s1 - s0) ** 2)


def test_spline_passes_through_waypoints_and_matches_hermite_form():
    w = [[10.0, 10.0], [60.0, 30.0], [90.0, 80.0], [40.0, 120.0]]
    poly = draw.spline_points(np.array(w), spacing=1.0)
    for p in w:
        assert np.min(np.linalg.norm(poly - p, axis=1)) < 1e-9
    pieces = _hermite_pieces(w)
    for bez, herm in zip(draw.catmull_rom_pieces(np.array(w)), pieces):
        for t in (0.0, 0.3, 0.71, 1.0):
            b = sum(math.comb(3, k) * t**k * (1 - t) ** (3 - k) * bez[k] for k in range(4))
            assert b == pytest.approx(_eval(herm, t))
    assert np.max(np.linalg.norm(np.diff(poly, axis=0), axis=1)) <= 1.0 + 1e-9


def test_close_regions_turn_radius_and_folds():
    x = np.linspace(0, 100, 101)
    low = np.stack([x, np.zeros_like(x)], 1)
    near = np.stack([x, np.full_like(x, 6.0)], 1)  # parallel 6 px apart: one close region, no crossing
    assert draw.unexplained_close_regions(low, near, 10.0, np.array([], int), np.array([], int)) == 1
    assert draw.unexplained_close_regions(low, near, 5.0, np.array([], int), np.array([], int)) == 0
    cross = np.stack([x, x - 50.0], 1)  # a clean crossing: its close region is explained by the crossing
    hits = draw.polyline_intersections(low, cross)
    assert len(hits["i"]) == 1
    assert draw.unexplained_close_regions(low, cross, 10.0, hits["i"], hits["j"]) == 0
    ang = np.linspace(0, math.pi, 200)
    arc = np.stack([30 * np.cos(ang), 30 * np.sin(ang)], 1)
    assert draw.min_turn_radius(arc) == pytest.approx(30.0, rel=1e-3)
    hairpin = np.concatenate([np.stack([x, np.zeros_like(x)], 1), np.stack([x[::-1], np.full_like(x, 4.0)], 1)])
    assert draw.folds_back(hairpin, 10.0)
    assert not draw.folds_back(low, 10.0)
    loop = np.stack([np.cos(np.linspace(0, 2.5 * math.pi, 300)), np.sin(np.linspace(0, 2.5 * math.pi, 300))], 1)
    assert draw.self_intersects(loop * 50)
    assert not draw.self_intersects(arc)


# ------------------------------------------------------------------------------------------------------- samples


def test_answer_equals_independent_recount(samples):
    modes = set()
    for s in samples:
        curves = s.meta["curves"]
        by_color = {c["color"]: c["waypoints"] for c in curves}
        if s.meta["question_mode"] == "pair":
            a, b = s.meta["pair"]
            assert a in s.question and b in s.question
            found = recount(by_color[a], by_color[b])
        else:
            found = [
                x
                for i in range(len(curves))
                for j in range(i + 1, len(curves))
                for x in recount(curves[i]["waypoints"], curves[j]["waypoints"])
            ]
        modes.add(s.meta["question_mode"])
        assert int(s.answer) == len(found), (s.meta["question_mode"], s.question)
        assert len(s.evidence.points) == len(found)
        for p in s.evidence.points:
            assert min(np.linalg.norm(np.asarray(p) - q) for q, _ in found) < 1.0
    assert modes == {"pair", "all"}


def _dense(waypoints: list[list[float]], per_piece: int = 150) -> np.ndarray:
    """The spline sampled finely (about 1 px apart here) from its Hermite form."""
    ts = np.linspace(0.0, 1.0, per_piece)[:, None]
    parts = [((co[0] * ts + co[1]) * ts + co[2]) * ts + co[3] for co in _hermite_pieces(waypoints)]
    return np.concatenate(parts)


def _check_rules(s, c) -> None:
    lw = c.line_width
    # The generator measures angles on chords of its 2.5 px polyline; on a bend of radius >= min_radius line
    # widths a chord's direction differs from the tangent by at most half its turn, for each of the two curves.
    tol = math.degrees(2.5 / (c.min_radius * lw))
    gap = c.min_gap * lw
    # Near a crossing at angle >= a, points of the two curves closer than gap lie within gap / sin(a) of it.
    reach = 1.5 * gap / math.sin(math.radians(c.min_angle - tol)) + lw
    curves = [_dense(x["waypoints"]) for x in s.meta["curves"]]
    arcs = [np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(d, axis=0), axis=1))]) for d in curves]
    pts = []
    for i in range(len(curves)):
        for j in range(i + 1, len(curves)):
            found = recount(s.meta["curves"][i]["waypoints"], s.meta["curves"][j]["waypoints"])
            for p, ang in found:
                assert ang >= c.min_angle - tol
                assert np.all(p >= c.border_margin * lw) and np.all(p <= c.image_size - c.border_margin * lw)
                for k in (i, j):  # far enough from both ends of both curves
                    pos = arcs[k][np.argmin(np.linalg.norm(curves[k] - p, axis=1))]
                    assert min(pos, arcs[k][-1] - pos) >= c.end_margin * lw - 1.0
                pts.append(p)
            # Near misses: wherever the curves come closer than the gap (less the generator's vertex spacing
            # slack), a crossing must be right there.
            d = np.linalg.norm(curves[i][:, None, :] - curves[j][None, :, :], axis=-1)
            close_i = np.nonzero(np.any(d < gap - 2.5, axis=1))[0]
            for a in close_i:
                assert any(np.linalg.norm(curves[i][a] - p) < reach for p, _ in found), s.meta["curves"][i]["color"]
    for i in range(len(pts)):
        for j in range(i + 1, len(pts)):
            assert np.linalg.norm(pts[i] - pts[j]) >= c.min_separation * lw - 0.5
    assert len(pts) == len(s.meta["crossings"])


def test_every_crossing_in_the_image_obeys_the_rules(samples, task):
    for s in samples:
        _check_rules(s, task.config)


def test_rules_hold_under_strict_settings():
    # Strict thresholds make violations common among raw candidates, so a missing check would show here.
    cfg = LineIntersectionConfig(min_angle=40.0, min_gap=4.0, end_margin=12.0, min_separation=10.0)
    t = LineIntersectionTask(cfg)
    for i in range(12):
        _check_rules(t.sample(21, i), cfg)


def test_evidence_points_lie_on_both_colours(samples, task):
    lw = task.config.line_width
    for s in samples:
        img = np.asarray(s.image)
        colors = [c["color"] for c in s.meta["curves"]]
        for x in s.meta["crossings"]:
            px, py = x["point"]
            # The upper stroke hides the lower one for lw / (2 sin angle) px along it; look a little further.
            rad = lw / (2 * math.sin(math.radians(x["angle"]))) + lw + 1
            yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
            disc = img[(xx - px) ** 2 + (yy - py) ** 2 <= rad * rad]
            for ci in x["curves"]:
                rgb = draw.NAMED_COLORS[colors[ci]]
                assert np.any(np.all(disc == rgb, axis=1)), (colors[ci], x)
        if s.meta["question_mode"] == "pair":
            pair_pts = [
                x["point"] for x in s.meta["crossings"] if {colors[i] for i in x["curves"]} == set(s.meta["pair"])
            ]
            assert sorted(map(tuple, pair_pts)) == sorted(map(tuple, s.evidence.points))


def test_zero_answer_evidence_is_the_asked_curves(task):
    seen = 0
    for idx in range(0, 60, 6):  # index % 6 == 0 -> answer "0"
        s = task.sample(3, idx)
        assert s.answer == "0" and not s.evidence.points
        asked = 2 if s.meta["question_mode"] == "pair" else len(s.meta["curves"])
        assert len(s.evidence.polylines) == asked
        seen += 1
    assert seen == 10
    none = LineIntersectionTask(LineIntersectionConfig(empty_evidence="none")).sample(3, 0)
    assert none.answer == "0" and none.evidence.is_empty()


def test_answers_balanced_and_questions_varied(task):
    k = 5
    samples = [task.sample(11, i) for i in range(6 * k)]
    counts = {a: sum(s.answer == a for s in samples) for a in task.answer_classes()}
    assert task.answer_classes() == ["0", "1", "2", "3", "4", "5"]
    assert counts == {str(a): k for a in range(6)}
    templates = {(s.meta["question_mode"], s.meta["template"]) for s in samples}
    assert len(templates) >= 4
    for s in samples:
        pool = PAIR_TEMPLATES if s.meta["question_mode"] == "pair" else ALL_TEMPLATES
        assert s.meta["template"] < len(pool)


def test_deterministic_and_meta_serialisable(task):
    a, b = task.sample(5, 17), task.sample(5, 17)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.question, a.answer, a.evidence, a.meta) == (b.question, b.answer, b.evidence, b.meta)
    assert task.sample(5, 18).image.tobytes() != a.image.tobytes()
    json.dumps(a.meta)
    assert a.image.mode == "RGB" and a.image.size == (448, 448)
    # The stored waypoints reproduce the drawn polyline exactly.
    for c in a.meta["curves"]:
        assert len(draw.spline_points(np.array(c["waypoints"]), a.meta["spacing"])) == c["n_points"]


def test_presets_generate():
    for name, overrides in LineIntersectionTask.presets.items():
        t = LineIntersectionTask(LineIntersectionConfig(**overrides))
        classes = t.answer_classes()
        for i in (0, len(classes) - 1):
            s = t.sample(0, i)
            assert s.answer == classes[i], name


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"max_answer": 99, "waypoints": (2, 2)}, "max_answer"),
        ({"min_answer": -1}, "min_answer"),
        ({"min_answer": 4, "max_answer": 2}, "max_answer"),
        ({"num_curves": (1, 3)}, "num_curves"),
        ({"num_curves": (4, 3)}, "num_curves"),
        ({"colors": ("red", "mauve")}, "colors"),
        ({"colors": ("red", "blue"), "num_curves": (2, 3)}, "colors"),
        ({"pair_fraction": 1.5}, "pair_fraction"),
        ({"min_angle": 0.0}, "min_angle"),
        ({"min_gap": -1.0}, "min_gap"),
        ({"line_width": 0}, "line_width"),
        ({"empty_evidence": "maybe"}, "empty_evidence"),
    ],
)
def test_validate_names_the_option(overrides, option):
    with pytest.raises(GenerationError, match=option):
        LineIntersectionTask(LineIntersectionConfig(**overrides))


def test_bezout_bound_in_message_and_bad_target(task):
    with pytest.raises(GenerationError, match=r"at most 9 crossings"):
        LineIntersectionTask(LineIntersectionConfig(waypoints=(2, 2), max_answer=10))
    with pytest.raises(GenerationError, match="target_answer"):
        task.generate(np.random.default_rng(0), "7")
