"""Drawing and geometry helpers shared by the curve-based task generators.

Curves are Bezier curves given by their control points and flattened into dense polylines; every geometric
decision a generator makes (how many crossings, whether two strokes come too close) is computed on those polylines,
never read back from pixels. Coordinates are image pixels, x right, y down.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree

NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 230),
    "green": (20, 150, 50),
    "orange": (250, 140, 0),
    "purple": (140, 50, 190),
    "black": (0, 0, 0),
    "brown": (130, 75, 20),
    "magenta": (230, 0, 190),
    "cyan": (0, 175, 200),
    "gray": (128, 128, 128),
    "pink": (250, 120, 170),
    "olive": (120, 130, 0),
}
"""Colours a generator may use, by the name questions call them. Values are exact stroke RGB (no anti-aliasing)."""


def color_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a named colour.

    Raises:
        KeyError: naming the unknown colour and the known ones.
    """
    try:
        return NAMED_COLORS[name]
    except KeyError:
        raise KeyError(f"unknown colour {name!r}; known colours: {sorted(NAMED_COLORS)}") from None


@lru_cache(maxsize=64)
def _bernstein_basis(degree: int, n: int) -> np.ndarray:
    """(n, degree + 1) Bernstein basis at n parameters evenly spaced over [0, 1]; read-only because it is cached."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    k = np.arange(degree + 1)[None, :]
    binom = np.array([math.comb(degree, i) for i in range(degree + 1)], dtype=np.float64)[None, :]
    basis = binom * t**k * (1.0 - t) ** (degree - k)
    basis.setflags(write=False)
    return basis


def bezier_sample_count(control: np.ndarray, spacing: float) -> int:
    """Number of evenly spaced parameters that keep consecutive curve points at most ``spacing`` px apart.

    The speed of a Bezier curve never exceeds ``degree * max |P[i+1] - P[i]|``, so that many px per unit of the
    parameter bounds every chord of the flattened polyline.

    Args:
        control: (degree + 1, 2) control points.
        spacing: largest allowed distance between consecutive polyline vertices, in px.
    """
    degree = len(control) - 1
    longest = float(np.max(np.linalg.norm(np.diff(control, axis=0), axis=1)))
    return max(8, math.ceil(degree * longest / spacing) + 1)


def bezier_points(control: np.ndarray, n: int) -> np.ndarray:
    """Dense polyline of a Bezier curve.

    Args:
        control: (degree + 1, 2) control points.
        n: number of vertices (evenly spaced in the curve parameter, both ends included).

    Returns:
        (n, 2) float64 vertices; the first and last equal the first and last control points.
    """
    control = np.asarray(control, dtype=np.float64)
    return _bernstein_basis(len(control) - 1, n) @ control


def catmull_rom_pieces(waypoints: np.ndarray) -> np.ndarray:
    """Cubic Bezier control points of the uniform Catmull-Rom spline through the waypoints.

    The spline passes through every waypoint with tangent ``(W[i+1] - W[i-1]) / 2``; at the two ends the missing
    neighbour is the reflection of the inner one (``W[-1] = 2 W[0] - W[1]``), so the curve leaves its ends heading
    straight at the next waypoint.

    Args:
        waypoints: (k, 2) points, k >= 2.

    Returns:
        (k - 1, 4, 2) control points, one cubic Bezier piece per pair of consecutive waypoints.
    """
    w = np.asarray(waypoints, dtype=np.float64)
    ext = np.concatenate([2.0 * w[:1] - w[1:2], w, 2.0 * w[-1:] - w[-2:-1]])
    p0, p1, p2, p3 = ext[:-3], ext[1:-2], ext[2:-1], ext[3:]
    return np.stack([p1, p1 + (p2 - p0) / 6.0, p2 - (p3 - p1) / 6.0, p2], axis=1)


def spline_points(waypoints: np.ndarray, spacing: float) -> np.ndarray:
    """Dense polyline of the Catmull-Rom spline through the waypoints (see :func:`catmull_rom_pieces`).

    Args:
        waypoints: (k, 2) points, k >= 2.
        spacing: largest distance between consecutive vertices, in px.
    """
    parts = []
    for i, piece in enumerate(catmull_rom_pieces(waypoints)):
        pts = bezier_points(piece, bezier_sample_count(piece, spacing))
        parts.append(pts if i == 0 else pts[1:])
    return np.concatenate(parts)


def arc_lengths(poly: np.ndarray) -> np.ndarray:
    """Cumulative arc length at each vertex of a polyline (0 at the first vertex)."""
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(poly, axis=0), axis=1))])


def segment_intersection(
    p0: tuple[float, float] | np.ndarray,
    p1: tuple[float, float] | np.ndarray,
    q0: tuple[float, float] | np.ndarray,
    q1: tuple[float, float] | np.ndarray,
) -> tuple[float, float] | None:
    """Intersection point of the closed segments p0-p1 and q0-q1.

    Segments that only touch (an endpoint lying on the other segment, shared endpoints) do intersect. Parallel
    segments, collinear overlapping ones included, return None: they have no single crossing point.
    """
    px, py = float(p0[0]), float(p0[1])
    rx, ry = float(p1[0]) - px, float(p1[1]) - py
    qx, qy = float(q0[0]), float(q0[1])
    sx, sy = float(q1[0]) - qx, float(q1[1]) - qy
    denom = rx * sy - ry * sx
    if denom == 0.0:
        return None
    t = ((qx - px) * sy - (qy - py) * sx) / denom
    u = ((qx - px) * ry - (qy - py) * rx) / denom
    if 0.0 <= t <= 1.0 and 0.0 <= u <= 1.0:
        return (px + t * rx, py + t * ry)
    return None


def _segment_params(p: np.ndarray, r: np.ndarray, q: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, ...]:
    """Elementwise line-line parameters of segments p + t r and q + u s: (denominator, t, u); t, u are nan where
    the segments are parallel."""
    denom = r[:, 0] * s[:, 1] - r[:, 1] * s[:, 0]
    dx, dy = q[:, 0] - p[:, 0], q[:, 1] - p[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (dx * s[:, 1] - dy * s[:, 0]) / denom
        u = (dx * r[:, 1] - dy * r[:, 0]) / denom
    return denom, t, u


def _near_segment_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of segments of a and b that are close enough to possibly meet.

    Two segments can only meet when their midpoints are within the sum of their half-lengths, so a k-d tree query
    over midpoints at the largest such sum finds every candidate in near-linear time.
    """
    ma, mb = (a[:-1] + a[1:]) / 2.0, (b[:-1] + b[1:]) / 2.0
    reach = (np.linalg.norm(np.diff(a, axis=0), axis=1).max() + np.linalg.norm(np.diff(b, axis=0), axis=1).max()) / 2
    pairs = cKDTree(ma).sparse_distance_matrix(cKDTree(mb), reach * (1.0 + 1e-9) + 1e-9, output_type="ndarray")
    return pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)


def polyline_intersections(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """All crossings between two polylines.

    Each segment is taken half-open (its end vertex belongs to the next segment) except the last one of each
    polyline, so a crossing that falls exactly on a shared vertex is reported once, not twice. Parallel segments
    (collinear overlaps included) report nothing.

    Args:
        a: (n, 2) vertices of the first polyline, n >= 2.
        b: (m, 2) vertices of the second polyline, m >= 2.

    Returns:
        Dict with ``points`` (k, 2) crossing points, ``i`` / ``j`` (k,) indices of the crossing segments in ``a`` /
        ``b``, ``t`` / ``u`` (k,) positions along those segments in [0, 1], and ``angle`` (k,) the crossing angle in
        degrees, folded into [0, 90]; sorted by ``i`` then ``j``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ii, jj = _near_segment_pairs(a, b)
    r, s = np.diff(a, axis=0)[ii], np.diff(b, axis=0)[jj]
    denom, t, u = _segment_params(a[ii], r, b[jj], s)
    t_hi = np.where(ii == len(a) - 2, 1.0 + 1e-12, 1.0)
    u_hi = np.where(jj == len(b) - 2, 1.0 + 1e-12, 1.0)
    hit = (denom != 0.0) & (t >= 0.0) & (t < t_hi) & (u >= 0.0) & (u < u_hi)
    order = np.lexsort((jj[hit], ii[hit]))
    ii, jj, t, u, r, s = ii[hit][order], jj[hit][order], t[hit][order], u[hit][order], r[hit][order], s[hit][order]
    points = a[ii] + t[:, None] * r
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.abs(np.sum(r * s, axis=1)) / (np.linalg.norm(r, axis=1) * np.linalg.norm(s, axis=1))
    angle = np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
    return {"points": points.reshape(-1, 2), "i": ii, "j": jj, "t": t, "u": u, "angle": angle}


def self_intersects(poly: np.ndarray) -> bool:
    """True when two non-adjacent segments of the polyline cross or touch (the curve loops over itself)."""
    poly = np.asarray(poly, dtype=np.float64)
    if len(poly) < 4:
        return False
    ii, jj = _near_segment_pairs(poly, poly)
    keep = jj > ii + 1
    ii, jj = ii[keep], jj[keep]
    d = np.diff(poly, axis=0)
    denom, t, u = _segment_params(poly[ii], d[ii], poly[jj], d[jj])
    return bool(np.any((denom != 0.0) & (t >= 0.0) & (t <= 1.0) & (u >= 0.0) & (u <= 1.0)))


def folds_back(poly: np.ndarray, gap: float) -> bool:
    """True when two parts of one polyline come within ``gap`` px while being far apart along the curve.

    "Far apart along the curve" is more than ``2 * gap`` of arc length: a bend tight enough for that would merge
    the two sides of the stroke into one blob (a hairpin or a near self-touch), which a reader cannot follow. Any
    self-crossing of a loop longer than ``2 * gap`` is caught too.
    """
    pairs = cKDTree(poly).query_pairs(gap, output_type="ndarray")
    if len(pairs) == 0:
        return False
    arc = arc_lengths(poly)
    return bool(np.any(np.abs(arc[pairs[:, 0]] - arc[pairs[:, 1]]) > 2.0 * gap))


def min_turn_radius(poly: np.ndarray) -> float:
    """Smallest radius of curvature along a polyline, estimated at each inner vertex as the mean length of its two
    segments over the turn between them (inf for a straight polyline)."""
    d = np.diff(np.asarray(poly, dtype=np.float64), axis=0)
    seg = np.linalg.norm(d, axis=1)
    heading = np.arctan2(d[:, 1], d[:, 0])
    turn = np.abs((np.diff(heading) + math.pi) % (2.0 * math.pi) - math.pi)
    with np.errstate(divide="ignore"):
        radius = (seg[:-1] + seg[1:]) / 2.0 / turn
    return float(radius.min()) if len(radius) else math.inf


def points_closer_than(points: np.ndarray, dist: float) -> bool:
    """True when two of ``points`` ``(N, 2)`` lie less than ``dist`` apart (crossings too close to tell apart)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 2:
        return False
    d2 = np.sum((pts[:, None] - pts[None]) ** 2, axis=-1)
    np.fill_diagonal(d2, np.inf)
    return bool(d2.min() < dist**2)


def unexplained_close_regions(a: np.ndarray, b: np.ndarray, gap: float, i: np.ndarray, j: np.ndarray) -> int:
    """Number of places where two polylines pass within ``gap`` px of each other without crossing there.

    The vertex pairs closer than ``gap`` form connected regions in the (vertex of a, vertex of b) index grid; a
    region is explained when it contains a known crossing (segment ``i[k]`` of a with segment ``j[k]`` of b).
    Unexplained regions are near misses or tangent touches: drawn strokes there look joined though the curves never
    cross. Assumes vertex spacing well below ``gap`` so that a crossing always lands inside its region.

    Args:
        a: (n, 2) first polyline.
        b: (m, 2) second polyline.
        gap: distance in px below which two strokes read as touching.
        i: segment indices in ``a`` of the known crossings.
        j: segment indices in ``b`` of the known crossings.
    """
    pairs = cKDTree(a).sparse_distance_matrix(cKDTree(b), gap, output_type="ndarray")
    pairs = pairs[pairs["v"] < gap]
    if len(pairs) == 0:
        return 0
    pi, pj = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    # Label on the smallest window of the index grid holding every close pair.
    i0, j0 = pi.min(), pj.min()
    close = np.zeros((pi.max() - i0 + 1, pj.max() - j0 + 1), dtype=bool)
    close[pi - i0, pj - j0] = True
    labels, n = ndimage.label(close, structure=np.ones((3, 3), dtype=bool))
    explained = set()
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    for di in (0, 1):
        for dj in (0, 1):
            ci, cj = i + di - i0, j + dj - j0
            ok = (ci >= 0) & (ci < close.shape[0]) & (cj >= 0) & (cj < close.shape[1])
            explained.update(int(v) for v in labels[ci[ok], cj[ok]])
    explained.discard(0)
    return n - len(explained)


def draw_polyline(draw: ImageDraw.ImageDraw, poly: np.ndarray, color: tuple[int, int, int], width: int) -> None:
    """Stroke a polyline with rounded joints (no gaps where a dense curve bends)."""
    draw.line([(float(x), float(y)) for x, y in poly], fill=color, width=width, joint="curve")
