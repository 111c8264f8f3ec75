"""Line tracing generator against independent computations.

Connectivity is recomputed from the edge list in meta with a Floyd-Warshall closure (the generator uses a
union-find and a breadth-first search); edge curves are re-evaluated from their control points with de Casteljau's
algorithm (the generator uses the Bernstein basis).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_gen import draw
from data_gen.base import GenerationError
from data_gen.tasks.line_tracing import TEMPLATES, LineTracingConfig, LineTracingTask

SEEDS = range(40)


def _de_casteljau(control: list[list[float]], t: float) -> np.ndarray:
    pts = np.asarray(control, dtype=np.float64)
    while len(pts) > 1:
        pts = (1 - t) * pts[:-1] + t * pts[1:]
    return pts[0]


def _distances(meta: dict) -> tuple[list[str], np.ndarray]:
    """Node labels and all-pairs shortest path lengths in edges (inf when not connected), by Floyd-Warshall."""
    labels = [n["label"] for n in meta["nodes"]]
    k = len(labels)
    d = np.full((k, k), np.inf)
    np.fill_diagonal(d, 0.0)
    for e in meta["edges"]:
        a, b = (labels.index(x) for x in e["nodes"])
        d[a, b] = d[b, a] = 1.0
    for m in range(k):
        d = np.minimum(d, d[:, m : m + 1] + d[m : m + 1, :])
    return labels, d


@pytest.fixture(scope="module")
def task() -> LineTracingTask:
    return LineTracingTask(LineTracingConfig())


@pytest.fixture(scope="module")
def samples(task):
    return [task.sample(seed, seed) for seed in SEEDS]


def test_answer_equals_floyd_warshall_connectivity(samples):
    for s in samples:
        labels, d = _distances(s.meta)
        a, b = (labels.index(x) for x in s.meta["query"])
        assert s.answer == ("Yes" if np.isfinite(d[a, b]) else "No")
        if s.answer == "Yes":
            path = s.meta["path"]
            assert path[0] == s.meta["query"][0] and path[-1] == s.meta["query"][1]
            assert len(path) - 1 == d[a, b]  # a shortest path
            edge_set = {frozenset(e["nodes"]) for e in s.meta["edges"]}
            assert all(frozenset(p) in edge_set for p in zip(path[:-1], path[1:]))
        else:
            assert s.meta["path"] is None
            # Default: queried nodes are never isolated (an isolated node would be an easy "No").
            assert np.sum(np.isfinite(d[a])) > 1 and np.sum(np.isfinite(d[b])) > 1


def test_evidence_chain_runs_from_node_to_node(samples):
    for s in samples:
        r = s.meta["node_radius"]
        centres = {n["label"]: np.array(n["center"]) for n in s.meta["nodes"]}
        qa, qb = s.meta["query"]
        assert s.evidence.boxes == [
            pytest.approx([centres[q][0] - r, centres[q][1] - r, centres[q][0] + r, centres[q][1] + r])
            for q in (qa, qb)
        ]
        assert not s.evidence.points
        if s.answer == "No":
            assert not s.evidence.polylines
            continue
        lines = [np.asarray(p) for p in s.evidence.polylines]
        assert len(lines) == len(s.meta["path"]) - 1
        assert np.linalg.norm(lines[0][0] - centres[qa]) <= r
        assert np.linalg.norm(lines[-1][-1] - centres[qb]) <= r
        for prev, nxt, node in zip(lines[:-1], lines[1:], s.meta["path"][1:-1]):
            assert np.allclose(prev[-1], nxt[0])  # continuous chain
            assert np.linalg.norm(nxt[0] - centres[node]) <= r  # through the intermediate node
        # Each evidence polyline is its edge's Bezier curve (checked at a few of its own vertices).
        by_pair = {frozenset(e["nodes"]): e for e in s.meta["edges"]}
        for line, pair in zip(lines, zip(s.meta["path"][:-1], s.meta["path"][1:])):
            e = by_pair[frozenset(pair)]
            n = len(line)
            assert n == e["n_points"]
            forward = e["nodes"][0] == pair[0]
            for idx in (0, n // 3, n - 1):
                t = idx / (n - 1) if forward else 1 - idx / (n - 1)
                assert line[idx] == pytest.approx(_de_casteljau(e["control"], t), abs=1e-6)


def test_question_names_the_queried_letters(samples):
    used = set()
    for s in samples:
        qa, qb = s.meta["query"]
        letters = re.findall(r"\b([A-Z])\b", s.question)
        assert letters == [qa, qb]
        assert s.question == TEMPLATES[s.meta["template"]].format(a=qa, b=qb)
        assert "path" in s.question or "following" in s.question.lower() or "chain" in s.question
        used.add(s.meta["template"])
    assert len(used) >= 3


def test_geometry_nodes_apart_and_edges_clear_of_other_nodes(samples, task):
    c = task.config
    for s in samples:
        r = s.meta["node_radius"]
        centres = {n["label"]: np.array(n["center"]) for n in s.meta["nodes"]}
        pts = np.array(list(centres.values()))
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 1e9
        assert d.min() >= max(2 * r, c.node_spacing * r) - 1e-6
        assert np.all(pts >= r) and np.all(pts <= c.image_size - r)
        for e in s.meta["edges"]:
            assert e["nodes"][0] != e["nodes"][1]
            curve = np.array([_de_casteljau(e["control"], t) for t in np.linspace(0, 1, 300)])
            assert curve[0] == pytest.approx(centres[e["nodes"][0]]) and curve[-1] == pytest.approx(
                centres[e["nodes"][1]]
            )
            for label, centre in centres.items():
                if label not in e["nodes"]:
                    assert np.min(np.linalg.norm(curve - centre, axis=1)) >= r + c.line_width / 2
        pairs = [frozenset(e["nodes"]) for e in s.meta["edges"]]
        assert len(set(pairs)) == len(pairs)  # no repeated edge
        assert c.num_edges[0] <= len(pairs) <= c.num_edges[1]
        assert c.num_nodes[0] <= len(centres) <= c.num_nodes[1]


def test_pixels_show_edges_and_nodes(samples, task):
    c = task.config
    for s in samples[:15]:
        img = np.asarray(s.image).astype(int)
        r = s.meta["node_radius"]
        for n in s.meta["nodes"]:
            x, y = n["center"]
            # Circle outline at the rim is black; the letter puts dark pixels inside.
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rim = img[
                    round(y + dy * (r - 1)) - 1 : round(y + dy * (r - 1)) + 2,
                    round(x + dx * (r - 1)) - 1 : round(x + dx * (r - 1)) + 2,
                ]
                assert np.any(np.all(rim == 0, axis=-1))
            inner = img[round(y - r / 2) : round(y + r / 2), round(x - r / 2) : round(x + r / 2)]
            assert np.any(np.all(inner == 0, axis=-1))
        for e in s.meta["edges"]:
            rgb = draw.NAMED_COLORS[e["color"]]
            mid = _de_casteljau(e["control"], 0.5)
            window = img[
                round(mid[1]) - c.line_width : round(mid[1]) + c.line_width + 1,
                round(mid[0]) - c.line_width : round(mid[0]) + c.line_width + 1,
            ]
            assert np.any(np.all(window == rgb, axis=-1))


def test_answers_balanced(task):
    answers = [task.sample(8, i).answer for i in range(20)]
    assert task.answer_classes() == ["Yes", "No"]
    assert answers.count("Yes") == answers.count("No") == 10


def test_deterministic_and_meta_serialisable(task):
    a, b = task.sample(4, 9), task.sample(4, 9)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.question, a.answer, a.evidence, a.meta) == (b.question, b.answer, b.evidence, b.meta)
    assert task.sample(4, 10).image.tobytes() != a.image.tobytes()
    json.dumps(a.meta)
    assert a.image.mode == "RGB" and a.image.size == (448, 448)


def test_negative_evidence_edges_and_per_edge_colours():
    t = LineTracingTask(LineTracingConfig(negative_evidence="edges", edge_color_mode="per_edge"))
    for i in range(1, 12, 2):  # odd index -> "No"
        s = t.sample(2, i)
        assert s.answer == "No"
        centres = {n["label"]: np.array(n["center"]) for n in s.meta["nodes"]}
        qa, qb = s.meta["query"]
        touching = sum(q in e["nodes"] for e in s.meta["edges"] for q in (qa, qb))
        assert len(s.evidence.polylines) == touching > 0
        for line in s.evidence.polylines:
            start = np.asarray(line[0])
            assert min(np.linalg.norm(start - centres[qa]), np.linalg.norm(start - centres[qb])) < 1e-6
        cols = [e["color"] for e in s.meta["edges"]]
        assert set(cols) <= set(t.config.colors)
        if len(cols) <= len(t.config.colors):
            assert len(set(cols)) == len(cols)


def test_presets_generate():
    for name, overrides in LineTracingTask.presets.items():
        t = LineTracingTask(LineTracingConfig(**overrides))
        assert [t.sample(1, i).answer for i in range(2)] == ["Yes", "No"], name


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"num_nodes": (1, 4)}, "num_nodes"),
        ({"num_nodes": (5, 30)}, "num_nodes"),
        ({"num_nodes": (6, 5)}, "num_nodes"),
        ({"num_edges": (0, 3)}, "num_edges"),
        ({"num_nodes": (3, 3), "num_edges": (4, 4)}, "num_edges"),
        ({"num_nodes": (4, 4), "num_edges": (3, 3)}, "num_edges"),
        ({"node_radius": 3.0}, "node_radius"),
        ({"node_spacing": 1.5}, "node_spacing"),
        ({"num_nodes": (20, 26), "node_radius": 30.0}, "num_nodes"),
        ({"edge_color_mode": "rainbow"}, "edge_color_mode"),
        ({"edge_color": "mauve"}, "edge_color"),
        ({"colors": ("red", "teal")}, "colors"),
        ({"min_angle": 95.0}, "min_angle"),
        ({"negative_evidence": "all"}, "negative_evidence"),
        ({"line_width": 0}, "line_width"),
    ],
)
def test_validate_names_the_option(overrides, option):
    with pytest.raises(GenerationError, match=option):
        LineTracingTask(LineTracingConfig(**overrides))


def test_bad_target_answer(task):
    with pytest.raises(GenerationError, match="target_answer"):
        task.generate(np.random.default_rng(0), "Maybe")
