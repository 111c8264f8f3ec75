"""Line tracing: is one lettered node connected to another by a path of lines?

Each image holds lettered nodes (circles with A, B, C, ...) joined by curved edges (cubic Bezier curves from
centre to centre). Edges may cross each other; a crossing is not a junction. Two nodes are **connected** when a path
of edges joins them, possibly through intermediate nodes; the answer ("Yes"/"No") is computed from the edge list with
a union-find, never from pixels, and the question wording states the rule.

A drawing must be traceable, so candidate edges are redrawn (the reason counted in ``meta["rejections"]``) when an
edge passes through or near a node it does not join, bends too sharply, crosses another edge at a flat angle or near
a node, or runs within ``min_gap`` line widths of another edge without crossing it (including two edges leaving one
node in nearly the same direction), and two edges that share a node never cross. Nodes never overlap: centres are
at least ``node_spacing`` radii apart. Edge pairs are drawn with probability proportional to their length, since
long edges cross others more often and crossings are what make tracing hard.

Evidence: when the answer is Yes, ``polylines`` are the edges of one shortest path from the first to the second
queried node, in order and oriented along the path (each runs centre to centre, so consecutive polylines share their
end point and the chain starts and ends at the queried nodes' centres), and ``boxes`` the two queried nodes'
bounding boxes. When the answer is No, ``boxes`` holds the two queried nodes only; with
``negative_evidence="edges"`` the polylines of every edge touching either queried node are added (oriented away from
that node).

Meta holds what is needed to re-check a sample: node letters and centres, the node radius, per edge its two letters,
cubic Bezier control points, polyline vertex count (``draw.bezier_points(control, n_points)`` rebuilds it exactly)
and colour, the queried letters, the shortest path (letters) when connected, the template index and rejection counts.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_gen import draw
from data_gen.base import GenerationError, Sample, Task, TaskConfig
from klal.data.schema import Evidence

TEMPLATES = (
    "Is node {a} connected to node {b} by a path of lines?",
    "Can you get from node {a} to node {b} by following the lines, possibly through other nodes? "
    "Lines that only cross each other do not connect.",
    "Following the lines (two lines that cross do not join), is there a path from node {a} to node {b}?",
    "Are nodes {a} and {b} joined by a chain of lines, possibly passing through other nodes?",
)
"""Question phrasings; ``{a}`` and ``{b}`` are node letters."""

_SPACING = 2.5
"""Largest distance in px between consecutive polyline vertices; well below min_gap so near misses are seen."""
_EDGE_TRIES = 30
"""Candidate curves drawn for one edge before the whole image is restarted."""
_NODE_TRIES = 200
"""Candidate positions drawn for one node before the whole image is restarted."""
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class LineTracingConfig(TaskConfig):
    """Options of the line tracing task (lengths in line widths are multiples of ``line_width``)."""

    line_width: int = 3
    """Edge stroke width in pixels."""
    num_nodes: tuple[int, int] = (7, 10)
    """Inclusive range of the number of nodes per image (at most 26: one letter each)."""
    num_edges: tuple[int, int] = (5, 9)
    """Inclusive range of the number of edges per image (capped by the node pairs available)."""
    node_radius: float = 15.0
    """Radius of a node circle in pixels."""
    node_spacing: float = 4.0
    """Smallest distance between two node centres, in node radii (2 would let circles touch)."""
    max_edge_length: float = 0.7
    """Longest straight distance between the two nodes of an edge, as a fraction of ``image_size``."""
    edge_bend: float = 0.3
    """Largest sideways offset of an edge's inner Bezier control points, as a fraction of its chord length."""
    edge_color_mode: str = "single"
    """"single": every edge in ``edge_color`` (harder: colour gives no hint); "per_edge": each edge a colour drawn
    from ``colors`` (distinct while there are enough colours)."""
    edge_color: str = "black"
    """Edge colour in "single" mode (a key of :data:`data_gen.draw.NAMED_COLORS`)."""
    colors: tuple[str, ...] = ("red", "blue", "green", "orange", "purple", "brown", "magenta", "cyan")
    """Edge colours in "per_edge" mode."""
    min_angle: float = 30.0
    """Smallest crossing angle between two edges in degrees; flatter crossings look like a junction or a merge."""
    min_separation: float = 4.0
    """Smallest distance between two edge crossings, in line widths."""
    min_gap: float = 2.5
    """Smallest centre-line distance, in line widths, at which two edges may pass without crossing."""
    min_radius: float = 4.0
    """Smallest radius of curvature of an edge, in line widths."""
    node_clearance: float = 2.0
    """Smallest gap between an edge and the circle of a node it does not join, in line widths; crossings keep the
    same distance from every circle."""
    allow_isolated_query: bool = False
    """Whether a queried node may have no edge at all (an easy "No"); off by default."""
    negative_evidence: str = "nodes"
    """Evidence of a "No" answer: "nodes" (the two queried nodes' boxes) or "edges" (also the edges touching them)."""
    background: str = "white"
    """Background: "white" or "light" (a random very light grey/tint per image)."""


@dataclass
class _Edge:
    """A placed edge between nodes ``u`` and ``v`` (indices), its Bezier control points and polylines."""

    u: int
    v: int
    control: np.ndarray
    poly: np.ndarray
    visible: np.ndarray
    """The part of ``poly`` outside both end circles (what a reader sees of the stroke)."""


class LineTracingTask(Task):
    """Yes/No connectivity between two lettered nodes of a drawn graph; answers balanced."""

    name: ClassVar[str] = "line_tracing"
    config_cls: ClassVar[type[TaskConfig]] = LineTracingConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "easy": {
            "num_nodes": (5, 6),
            "num_edges": (2, 4),
            "edge_color_mode": "per_edge",
            "edge_bend": 0.15,
            "line_width": 4,
        },
        "medium": {},
        "hard": {
            "num_nodes": (9, 12),
            "num_edges": (8, 12),
            "node_radius": 13.0,
            "max_edge_length": 0.75,
            "edge_bend": 0.4,
            "min_angle": 25.0,
        },
    }

    config: LineTracingConfig

    def validate(self) -> None:
        """Raise GenerationError naming the first impossible option."""
        c = self.config
        n = self.name
        if c.image_size < 64:
            raise GenerationError(f"{n}: image_size={c.image_size} is too small (need >= 64)")
        if c.line_width < 1:
            raise GenerationError(f"{n}: line_width={c.line_width} must be >= 1")
        if c.max_attempts < 1:
            raise GenerationError(f"{n}: max_attempts={c.max_attempts} must be >= 1")
        for opt in ("num_nodes", "num_edges"):
            val = getattr(c, opt)
            if len(val) != 2 or val[0] > val[1]:
                raise GenerationError(f"{n}: {opt}={val!r} must be a (min, max) pair with min <= max")
        lo_n, hi_n = c.num_nodes
        lo_e, hi_e = c.num_edges
        if lo_n < 2 or hi_n > len(_LETTERS):
            raise GenerationError(f"{n}: num_nodes={tuple(c.num_nodes)} must lie within 2..{len(_LETTERS)}")
        if lo_e < 1:
            raise GenerationError(f"{n}: num_edges={tuple(c.num_edges)} needs at least 1 edge (else never 'Yes')")
        if lo_e > math.comb(lo_n, 2):
            raise GenerationError(
                f"{n}: num_edges={tuple(c.num_edges)} asks for {lo_e} edges but {lo_n} nodes have only "
                f"{math.comb(lo_n, 2)} pairs"
            )
        # "No" needs two components holding the queried nodes; with non-isolated query nodes each has an edge.
        spare = 1 if c.allow_isolated_query else 2
        if not any(k >= 2 * spare and lo_e <= math.comb(k - spare, 2) + (spare - 1) for k in range(lo_n, hi_n + 1)):
            raise GenerationError(
                f"{n}: num_edges={tuple(c.num_edges)} with num_nodes={tuple(c.num_nodes)} can never leave two "
                "separate groups of nodes, so the answer could never be 'No'"
            )
        if c.node_radius < 6:
            raise GenerationError(f"{n}: node_radius={c.node_radius} is too small for a legible letter (need >= 6)")
        if c.node_spacing <= 2.0:
            raise GenerationError(f"{n}: node_spacing={c.node_spacing} must exceed 2 node radii (circles overlap)")
        usable = c.image_size - 2.0 * (c.node_radius + c.line_width)
        # Random sequential placement reliably fills about half the area of a hexagonal packing of the discs.
        needed = hi_n * (c.node_spacing * c.node_radius) ** 2 * math.sqrt(3) / 2.0
        if usable <= 0 or needed > 0.5 * usable * usable:
            raise GenerationError(
                f"{n}: num_nodes up to {hi_n} with node_radius={c.node_radius} and node_spacing={c.node_spacing} "
                f"do not fit in image_size={c.image_size}"
            )
        if not 0.0 < c.max_edge_length <= 1.5:
            raise GenerationError(f"{n}: max_edge_length={c.max_edge_length} must lie in (0, 1.5]")
        if c.max_edge_length * c.image_size < c.node_spacing * c.node_radius:
            raise GenerationError(
                f"{n}: max_edge_length={c.max_edge_length} is shorter than the node spacing, no edge fits"
            )
        if not 0.0 <= c.edge_bend <= 1.0:
            raise GenerationError(f"{n}: edge_bend={c.edge_bend} must lie in [0, 1]")
        if c.edge_color_mode not in ("single", "per_edge"):
            raise GenerationError(f"{n}: edge_color_mode={c.edge_color_mode!r} must be 'single' or 'per_edge'")
        if c.edge_color not in draw.NAMED_COLORS:
            raise GenerationError(f"{n}: edge_color={c.edge_color!r} is unknown; known: {sorted(draw.NAMED_COLORS)}")
        unknown = [col for col in c.colors if col not in draw.NAMED_COLORS]
        if unknown:
            raise GenerationError(f"{n}: colors has unknown colour(s) {unknown}; known: {sorted(draw.NAMED_COLORS)}")
        if c.edge_color_mode == "per_edge" and not c.colors:
            raise GenerationError(f"{n}: colors is empty but edge_color_mode='per_edge' needs colours")
        if not 0.0 < c.min_angle < 90.0:
            raise GenerationError(f"{n}: min_angle={c.min_angle} must lie in (0, 90) degrees")
        for opt in ("min_separation", "min_gap", "min_radius", "node_clearance"):
            if getattr(c, opt) < 0:
                raise GenerationError(f"{n}: {opt}={getattr(c, opt)} must be >= 0")
        if c.min_gap * c.line_width < 2.0 * _SPACING:
            raise GenerationError(
                f"{n}: min_gap={c.min_gap} line widths ({c.min_gap * c.line_width:g} px) is below "
                f"{2 * _SPACING:g} px, too small to tell a near miss from a crossing"
            )
        if c.negative_evidence not in ("nodes", "edges"):
            raise GenerationError(f"{n}: negative_evidence={c.negative_evidence!r} must be 'nodes' or 'edges'")
        if c.background not in ("white", "light"):
            raise GenerationError(f"{n}: background={c.background!r} must be 'white' or 'light'")

    def answer_classes(self) -> list[str]:
        """``["Yes", "No"]``."""
        return ["Yes", "No"]

    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw a graph and a queried pair whose connectivity equals ``target_answer`` (random when None)."""
        c = self.config
        if target_answer is None:
            target = "Yes" if rng.random() < 0.5 else "No"
        elif target_answer in ("Yes", "No"):
            target = target_answer
        else:
            raise GenerationError(f"{self.name}: target_answer={target_answer!r} must be 'Yes' or 'No'")
        rejections: Counter[str] = Counter()
        for attempt in range(c.max_attempts):
            k = int(rng.integers(c.num_nodes[0], c.num_nodes[1] + 1))
            centres = self._place_nodes(rng, k)
            if centres is None:
                rejections["node_placement"] += 1
                continue
            e_hi = min(c.num_edges[1], math.comb(k, 2))
            if c.num_edges[0] > e_hi:
                rejections["edge_count"] += 1
                continue
            edges = self._place_edges(rng, centres, int(rng.integers(c.num_edges[0], e_hi + 1)), rejections)
            if edges is None:
                rejections["restart"] += 1
                continue
            query = self._pick_query(rng, k, edges, target)
            if query is None:
                rejections["no_query_pair"] += 1
                continue
            return self._render(rng, centres, edges, query, target, rejections, attempt)
        raise GenerationError(
            f"{self.name}: no '{target}' image after max_attempts={c.max_attempts} restarts "
            f"(rejections: {dict(rejections)}); raise max_attempts, lower num_edges or node_spacing"
        )

    # ----------------------------------------------------------------------------------------------- construction

    def _place_nodes(self, rng: np.random.Generator, k: int) -> np.ndarray | None:
        """``k`` node centres at least ``node_spacing`` radii apart, clear of the border; None when stuck."""
        c = self.config
        lo = c.node_radius + c.line_width
        hi = c.image_size - lo
        min_d2 = (c.node_spacing * c.node_radius) ** 2
        centres: list[np.ndarray] = []
        for _ in range(k):
            for _ in range(_NODE_TRIES):
                p = np.round(rng.uniform(lo, hi, size=2), 2)
                if all(float(np.sum((p - q) ** 2)) >= min_d2 for q in centres):
                    centres.append(p)
                    break
            else:
                return None
        return np.array(centres)

    def _place_edges(
        self, rng: np.random.Generator, centres: np.ndarray, m: int, rej: Counter[str]
    ) -> list[_Edge] | None:
        """``m`` edges between distinct node pairs, each redrawn until valid; None when one cannot be placed."""
        c = self.config
        k = len(centres)
        dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if dist[i, j] <= c.max_edge_length * c.image_size]
        edges: list[_Edge] = []
        crossings: list[np.ndarray] = []
        for _ in range(m):
            used = {(min(e.u, e.v), max(e.u, e.v)) for e in edges}
            free = [p for p in pairs if p not in used]
            if not free:
                rej["no_free_pair"] += 1
                return None
            # Favour long edges (see the module docstring).
            weight = np.array([dist[p] for p in free])
            weight /= weight.sum()
            for _ in range(_EDGE_TRIES):
                u, v = free[int(rng.choice(len(free), p=weight))]
                if rng.random() < 0.5:
                    u, v = v, u
                edge = self._candidate(rng, centres, u, v, rej)
                if edge is None:
                    continue
                found = self._check(edge, edges, centres, crossings, rej)
                if found is not None:
                    edges.append(edge)
                    crossings.extend(found)
                    break
            else:
                return None
        return edges

    def _candidate(
        self, rng: np.random.Generator, centres: np.ndarray, u: int, v: int, rej: Counter[str]
    ) -> _Edge | None:
        """A curved edge from node ``u`` to node ``v``; None (reason counted) when it is invalid on its own."""
        c = self.config
        lw = c.line_width
        a, b = centres[u], centres[v]
        chord = b - a
        length = float(np.linalg.norm(chord))
        normal = np.array([-chord[1], chord[0]]) / length
        offsets = rng.uniform(-c.edge_bend, c.edge_bend, size=2) * length
        along = rng.uniform(0.2, 0.45), rng.uniform(0.55, 0.8)
        control = np.round(
            np.stack([a, a + along[0] * chord + offsets[0] * normal, a + along[1] * chord + offsets[1] * normal, b]),
            2,
        )
        poly = draw.bezier_points(control, draw.bezier_sample_count(control, _SPACING))
        if poly.min() < lw or poly.max() > c.image_size - lw:
            rej["outside"] += 1
            return None
        r = c.node_radius
        outside = (np.linalg.norm(poly - a, axis=1) > r) & (np.linalg.norm(poly - b, axis=1) > r)
        idx = np.nonzero(outside)[0]
        if len(idx) < 2 or len(idx) != idx[-1] - idx[0] + 1:
            rej["reenters_node"] += 1  # the curve dips back into one of its own circles
            return None
        if draw.min_turn_radius(poly) < c.min_radius * lw or draw.folds_back(poly, c.min_gap * lw):
            rej["sharp_bend"] += 1
            return None
        if draw.self_intersects(poly):
            rej["self_crossing"] += 1
            return None
        others = np.delete(centres, [u, v], axis=0)
        if len(others):
            clear = r + lw / 2.0 + c.node_clearance * lw
            d2 = np.sum((poly[:, None, :] - others[None]) ** 2, axis=-1)
            if d2.min() < clear * clear:
                rej["through_node"] += 1
                return None
        return _Edge(u, v, control, poly, poly[idx[0] : idx[-1] + 1])

    def _check(
        self,
        edge: _Edge,
        edges: list[_Edge],
        centres: np.ndarray,
        crossings: list[np.ndarray],
        rej: Counter[str],
    ) -> list[np.ndarray] | None:
        """Crossing points of ``edge`` with the placed edges, or None (reason counted) when it must be redrawn."""
        c = self.config
        lw = c.line_width
        found: list[np.ndarray] = []
        hits = []
        for other in edges:
            h = draw.polyline_intersections(edge.visible, other.visible)
            hits.append(h)
            if not len(h["i"]):
                continue
            if {edge.u, edge.v} & {other.u, other.v}:
                rej["crosses_neighbour"] += 1  # edges sharing a node must not also cross: reads as a loop
                return None
            if np.any(h["angle"] < c.min_angle):
                rej["flat_crossing"] += 1
                return None
            clear = c.node_radius + lw / 2.0 + c.node_clearance * lw
            d2 = np.sum((h["points"][:, None, :] - centres[None]) ** 2, axis=-1)
            if d2.min() < clear * clear:
                rej["crossing_near_node"] += 1
                return None
            found.extend(h["points"])
        pts = np.array([*crossings, *found]).reshape(-1, 2)
        if len(found) and draw.points_closer_than(pts, c.min_separation * lw):
            rej["separation"] += 1
            return None
        gap = c.min_gap * lw
        for h, other in zip(hits, edges):
            if draw.unexplained_close_regions(edge.visible, other.visible, gap, h["i"], h["j"]):
                rej["near_miss"] += 1
                return None
        return found

    def _pick_query(
        self, rng: np.random.Generator, k: int, edges: list[_Edge], target: str
    ) -> tuple[int, int, list[int] | None] | None:
        """A node pair whose connectivity is ``target``, with a shortest path when connected; None if none."""
        c = self.config
        root = list(range(k))

        def find(x: int) -> int:
            while root[x] != x:
                root[x] = root[root[x]]
                x = root[x]
            return x

        degree = [0] * k
        for e in edges:
            root[find(e.u)] = find(e.v)
            degree[e.u] += 1
            degree[e.v] += 1
        eligible = [
            (a, b)
            for a in range(k)
            for b in range(k)
            if a != b
            and (find(a) == find(b)) == (target == "Yes")
            and (c.allow_isolated_query or (degree[a] and degree[b]))
        ]
        if not eligible:
            return None
        a, b = eligible[int(rng.integers(len(eligible)))]
        return a, b, (_shortest_path(k, edges, a, b) if target == "Yes" else None)

    # ------------------------------------------------------------------------------------------------- rendering

    def _render(
        self,
        rng: np.random.Generator,
        centres: np.ndarray,
        edges: list[_Edge],
        query: tuple[int, int, list[int] | None],
        target: str,
        rej: Counter[str],
        attempt: int,
    ) -> Sample:
        """Draw edges then nodes on top, phrase the question and collect the evidence."""
        c = self.config
        if c.edge_color_mode == "single":
            names = [c.edge_color] * len(edges)
        else:
            palette = list(dict.fromkeys(c.colors))
            names = [str(x) for x in rng.choice(palette, size=len(edges), replace=len(edges) > len(palette))]
        bg = (255, 255, 255) if c.background == "white" else tuple(int(v) for v in rng.integers(232, 256, size=3))
        image = Image.new("RGB", (c.image_size, c.image_size), bg)
        drawer = ImageDraw.Draw(image)
        for edge, col in zip(edges, names):
            draw.draw_polyline(drawer, edge.poly, draw.color_rgb(col), c.line_width)
        r = c.node_radius
        font = _font(max(8, round(r * 1.15)))
        outline = max(2, c.line_width - 1)
        for i, (x, y) in enumerate(centres):
            drawer.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255), outline=(0, 0, 0), width=outline)
            drawer.text((float(x), float(y)), _LETTERS[i], fill=(0, 0, 0), font=font, anchor="mm")

        a, b, path = query
        template = int(rng.integers(len(TEMPLATES)))
        question = TEMPLATES[template].format(a=_LETTERS[a], b=_LETTERS[b])
        boxes = [
            [float(centres[n][0] - r), float(centres[n][1] - r), float(centres[n][0] + r), float(centres[n][1] + r)]
            for n in (a, b)
        ]
        polylines: list[list[list[float]]] = []
        if path is not None:
            by_pair = {frozenset((e.u, e.v)): e for e in edges}
            for s, t in zip(path[:-1], path[1:]):
                e = by_pair[frozenset((s, t))]
                polylines.append((e.poly if e.u == s else e.poly[::-1]).tolist())
        elif c.negative_evidence == "edges":
            for n in (a, b):
                for e in edges:
                    if n in (e.u, e.v):
                        polylines.append((e.poly if e.u == n else e.poly[::-1]).tolist())
        meta = {
            "template": template,
            "rule": "connected = joined by a path of edges through nodes; crossing edges do not connect",
            "query": [_LETTERS[a], _LETTERS[b]],
            "path": None if path is None else [_LETTERS[n] for n in path],
            "node_radius": float(r),
            "nodes": [{"label": _LETTERS[i], "center": [float(x), float(y)]} for i, (x, y) in enumerate(centres)],
            "edges": [
                {
                    "nodes": [_LETTERS[e.u], _LETTERS[e.v]],
                    "control": e.control.tolist(),
                    "n_points": len(e.poly),
                    "color": col,
                }
                for e, col in zip(edges, names)
            ],
            "rejections": dict(sorted(rej.items())),
            "restarts": attempt,
        }
        evidence = Evidence(boxes=boxes, polylines=polylines)
        return Sample(image=image, question=question, answer=target, evidence=evidence, meta=meta)


def _shortest_path(k: int, edges: list[_Edge], a: int, b: int) -> list[int]:
    """Node indices of one shortest path from ``a`` to ``b`` (breadth-first search, neighbours in index order)."""
    adj: list[list[int]] = [[] for _ in range(k)]
    for e in edges:
        adj[e.u].append(e.v)
        adj[e.v].append(e.u)
    prev = {a: a}
    queue = deque([a])
    while queue:
        x = queue.popleft()
        if x == b:
            break
        for y in sorted(adj[x]):
            if y not in prev:
                prev[y] = x
                queue.append(y)
    if b not in prev:
        raise ValueError(f"line_tracing: node {b} is not reachable from node {a}")
    path = [b]
    while path[-1] != a:
        path.append(prev[path[-1]])
    return path[::-1]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (falls back to the fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()
