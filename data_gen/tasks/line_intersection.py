"""Line intersection: count where smooth coloured curves cross.

Each image holds a few smooth curves (uniform Catmull-Rom splines through random waypoints, see
:func:`data_gen.draw.catmull_rom_pieces`), each in its own named colour. The question asks either how often two
named curves cross ("pair" question) or how many crossings there are in total ("all" question). The answer is
counted on the curves' geometry: the dense polylines are intersected segment by segment, never read from pixels.

A drawn crossing must be unambiguous to a reader, so candidate curves are redrawn (and the reason counted in
``meta["rejections"]``) when a crossing is flatter than ``min_angle``, two crossings lie closer than
``min_separation`` line widths, a crossing is near the image border or a curve's end, a curve bends more sharply
than ``min_radius``, crosses or folds back onto itself, or two curves pass within ``min_gap`` line widths without
crossing there (a near miss or a tangent touch looks like a crossing when drawn).

Curves are added one at a time and only the newest is redrawn, so hitting the target count is cheap: a new curve is
either an independent smooth random walk or a "braid" that follows an existing curve on alternating sides, flipping
side as many times as it should cross it (independent curves rarely cross more than twice). Either way the count
that decides the answer is the one measured on the geometry.

Meta holds what is needed to re-check a sample: per curve (in drawing order) its colour, waypoints and polyline
vertex count (``draw.spline_points(waypoints, meta["spacing"])`` rebuilds the polyline exactly), every crossing with
its point, the two curves (indices into ``meta["curves"]``) and its angle, the question mode and template index, and
the rejection counts.

Evidence: ``points`` are the crossing points counted by the answer (of the named pair, or all of them). A zero answer
has no crossing to point at; with ``empty_evidence="curves"`` (default) its evidence is the polylines of the curves
the question is about (the named pair, or every curve), with ``"none"`` it is empty.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from data_gen import draw
from data_gen.base import GenerationError, Sample, Task, TaskConfig
from klal.data.schema import Evidence

PAIR_TEMPLATES = (
    "How many times do the {a} and the {b} line cross?",
    "How many times does the {a} line intersect the {b} line?",
    "At how many points do the {a} line and the {b} line cross each other?",
    "Count the crossings between the {a} line and the {b} line.",
)
"""Pair questions; ``{a}`` and ``{b}`` are colour names."""

ALL_TEMPLATES = (
    "How many intersection points are there in total?",
    "How many times do the lines cross each other in total?",
    "Count all the points where two of the lines cross.",
    "What is the total number of crossings between the lines?",
)
"""Questions about the total number of crossings."""

_SPACING = 2.5
"""Largest distance in px between consecutive polyline vertices; well below min_gap so near misses are seen."""
_CURVE_TRIES = 40
"""Candidates drawn for one curve before the whole image is restarted."""
_EASY_PER_CURVE = 2
"""In "all" mode, crossings left for each curve still to come at most (independent curves rarely make more)."""
_TURN_SD = math.radians(35.0)
"""Spread of the heading change between consecutive waypoints of an independent curve."""
_MAX_TURN = math.radians(70.0)
"""Largest heading change between consecutive waypoints of an independent curve."""


@dataclass
class LineIntersectionConfig(TaskConfig):
    """Options of the line intersection task (lengths in line widths are multiples of ``line_width``)."""

    num_curves: tuple[int, int] = (2, 4)
    """Inclusive range of the number of curves per image."""
    waypoints: tuple[int, int] = (3, 6)
    """Inclusive range of the number of points each curve passes through (curve complexity: more is wigglier)."""
    curve_length: tuple[float, float] = (0.5, 1.2)
    """Range of a curve's waypoint path length, as a fraction of ``image_size``."""
    colors: tuple[str, ...] = ("red", "blue", "green", "orange", "purple", "black")
    """Colour names to draw from (keys of :data:`data_gen.draw.NAMED_COLORS`); each curve gets a different one."""
    min_answer: int = 0
    """Smallest answer (crossing count)."""
    max_answer: int = 5
    """Largest answer (crossing count); answers are balanced over min_answer..max_answer."""
    pair_fraction: float = 0.5
    """Probability of a pair question ("the red and the blue line"); the rest ask for the total."""
    weave_fraction: float = 0.5
    """Probability that a new curve is drawn braided around an existing one (crossing it a chosen number of times)
    rather than as an independent random walk. Independent curves rarely cross more than twice."""
    min_angle: float = 15.0
    """Smallest crossing angle in degrees; flatter crossings read as touches and are redrawn."""
    min_separation: float = 3.0
    """Smallest distance between two crossing points, in line widths."""
    min_gap: float = 2.5
    """Smallest centre-line distance, in line widths, at which two curves may pass each other without crossing."""
    min_radius: float = 4.0
    """Smallest radius of curvature of a curve, in line widths; a sharper bend hides which way a crossing goes."""
    border_margin: float = 4.0
    """Smallest distance of a crossing from the image border, in line widths."""
    end_margin: float = 4.0
    """Smallest distance along a curve from a crossing to either end of that curve, in line widths."""
    background: str = "white"
    """Background: "white" or "light" (a random very light grey/tint per image)."""
    empty_evidence: str = "curves"
    """Evidence of a zero answer: "curves" (polylines of the curves asked about) or "none" (empty evidence)."""


@dataclass
class _Curve:
    """A candidate curve: its waypoints, dense polyline and cumulative arc length."""

    waypoints: np.ndarray
    poly: np.ndarray
    arc: np.ndarray


class LineIntersectionTask(Task):
    """Count crossings of smooth coloured curves; answers balanced over ``min_answer..max_answer``."""

    name: ClassVar[str] = "line_intersection"
    config_cls: ClassVar[type[TaskConfig]] = LineIntersectionConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "easy": {"num_curves": (2, 2), "waypoints": (3, 5), "max_answer": 3, "line_width": 5, "min_angle": 30.0},
        "medium": {},
        "hard": {
            "num_curves": (3, 5),
            "waypoints": (4, 7),
            "max_answer": 6,
            "line_width": 3,
            "min_angle": 15.0,
            "colors": ("red", "blue", "green", "orange", "purple", "black", "brown", "magenta"),
        },
    }

    config: LineIntersectionConfig

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
        for opt in ("num_curves", "waypoints", "curve_length"):
            val = getattr(c, opt)
            if len(val) != 2 or val[0] > val[1]:
                raise GenerationError(f"{n}: {opt}={val!r} must be a (min, max) pair with min <= max")
        if c.num_curves[0] < 2:
            raise GenerationError(f"{n}: num_curves={tuple(c.num_curves)} needs at least 2 curves to cross")
        if c.waypoints[0] < 2:
            raise GenerationError(f"{n}: waypoints={tuple(c.waypoints)} needs at least 2 points per curve")
        if c.curve_length[0] <= 0:
            raise GenerationError(f"{n}: curve_length={tuple(c.curve_length)} must be positive")
        unknown = [col for col in c.colors if col not in draw.NAMED_COLORS]
        if unknown:
            raise GenerationError(f"{n}: colors has unknown colour(s) {unknown}; known: {sorted(draw.NAMED_COLORS)}")
        if len(set(c.colors)) < c.num_curves[1]:
            raise GenerationError(
                f"{n}: colors has {len(set(c.colors))} distinct colour(s) but num_curves allows {c.num_curves[1]} "
                "curves, each needing its own colour"
            )
        if c.min_answer < 0:
            raise GenerationError(f"{n}: min_answer={c.min_answer} must be >= 0")
        if c.max_answer < c.min_answer:
            raise GenerationError(f"{n}: max_answer={c.max_answer} is below min_answer={c.min_answer}")
        for opt in ("pair_fraction", "weave_fraction"):
            if not 0.0 <= getattr(c, opt) <= 1.0:
                raise GenerationError(f"{n}: {opt}={getattr(c, opt)} must lie in [0, 1]")
        if not 0.0 < c.min_angle < 90.0:
            raise GenerationError(f"{n}: min_angle={c.min_angle} must lie in (0, 90) degrees")
        for opt in ("min_separation", "min_gap", "min_radius", "border_margin", "end_margin"):
            if getattr(c, opt) < 0:
                raise GenerationError(f"{n}: {opt}={getattr(c, opt)} must be >= 0")
        if c.min_gap * c.line_width < 2.0 * _SPACING:
            raise GenerationError(
                f"{n}: min_gap={c.min_gap} line widths ({c.min_gap * c.line_width:g} px) is below "
                f"{2 * _SPACING:g} px, too small to tell a near miss from a crossing"
            )
        if c.background not in ("white", "light"):
            raise GenerationError(f"{n}: background={c.background!r} must be 'white' or 'light'")
        if c.empty_evidence not in ("curves", "none"):
            raise GenerationError(f"{n}: empty_evidence={c.empty_evidence!r} must be 'curves' or 'none'")
        # Bezout: two cubic pieces cross at most 9 times, so two splines with p and q pieces at most 9 p q times.
        pieces = c.waypoints[1] - 1
        pair_bound = 9 * pieces * pieces
        if c.pair_fraction > 0 and c.max_answer > pair_bound:
            raise GenerationError(
                f"{n}: max_answer={c.max_answer} is impossible for a pair question with 2 curves of "
                f"{c.waypoints[1]} waypoints (at most {pair_bound} crossings); lower max_answer or set pair_fraction=0"
            )
        all_bound = math.comb(c.num_curves[1], 2) * pair_bound
        if c.pair_fraction < 1 and c.max_answer > all_bound:
            raise GenerationError(
                f"{n}: max_answer={c.max_answer} is impossible with {c.num_curves[1]} curves of {c.waypoints[1]} "
                f"waypoints (at most {all_bound} crossings)"
            )
        if c.border_margin * c.line_width * 2 >= c.image_size:
            raise GenerationError(f"{n}: border_margin={c.border_margin} leaves no room in image_size={c.image_size}")

    def answer_classes(self) -> list[str]:
        """``["min_answer", ..., "max_answer"]`` as strings."""
        return [str(k) for k in range(self.config.min_answer, self.config.max_answer + 1)]

    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw curves until the asked-for crossing count equals ``target_answer`` (random in range when None)."""
        c = self.config
        if target_answer is None:
            target = int(rng.integers(c.min_answer, c.max_answer + 1))
        else:
            try:
                target = int(target_answer)
            except ValueError:
                raise GenerationError(f"{self.name}: target_answer={target_answer!r} is not an integer") from None
            if not c.min_answer <= target <= c.max_answer:
                raise GenerationError(
                    f"{self.name}: target_answer={target} is outside min_answer..max_answer "
                    f"({c.min_answer}..{c.max_answer})"
                )
        mode = "pair" if rng.random() < c.pair_fraction else "all"
        rejections: Counter[str] = Counter()
        for attempt in range(c.max_attempts):
            n = int(rng.integers(c.num_curves[0], c.num_curves[1] + 1))
            built = self._build(rng, n, mode, target, rejections)
            if built is not None:
                return self._render(rng, built[0], built[1], mode, target, rejections, attempt)
            rejections["restart"] += 1
        raise GenerationError(
            f"{self.name}: no image with a {mode} answer of {target} after max_attempts={c.max_attempts} restarts "
            f"(rejections: {dict(rejections)}); raise max_attempts or weave_fraction, or lower max_answer"
        )

    # ----------------------------------------------------------------------------------------------- construction

    def _build(
        self, rng: np.random.Generator, n: int, mode: str, target: int, rej: Counter[str]
    ) -> tuple[list[_Curve], list[dict[str, Any]]] | None:
        """Add ``n`` curves one at a time, each redrawn until valid; None when one cannot be placed.

        Pair mode: curves 0 and 1 are the asked-about pair and must cross exactly ``target`` times; the others are
        distractors with any number of crossings. All mode: the running total never exceeds ``target`` and the last
        curve brings it to exactly ``target``.
        """
        curves: list[_Curve] = []
        crossings: list[dict[str, Any]] = []
        total = 0
        for k in range(n):
            if mode == "pair" and k == 1:
                want: tuple[int, int] | None = (target, target)
            elif mode == "all" and k > 0:
                remaining = target - total
                left = n - 1 - k
                # Leave at most _EASY_PER_CURVE crossings per later curve, so the last one is not left with a
                # count that only a long braid could make.
                want = (max(0, remaining - _EASY_PER_CURVE * left), remaining)
            else:
                want = None
            for _ in range(_CURVE_TRIES):
                cand = self._candidate(rng, curves, mode, k, want, target, n)
                if cand is None:
                    rej["outside"] += 1
                    continue
                found = self._check(cand, curves, crossings, mode, k, want, rej)
                if found is not None:
                    curves.append(cand)
                    crossings.extend(found)
                    total += len(found)
                    break
            else:
                return None
        if mode == "all" and total != target:
            return None
        return curves, crossings

    def _candidate(
        self,
        rng: np.random.Generator,
        curves: list[_Curve],
        mode: str,
        k: int,
        want: tuple[int, int] | None,
        target: int,
        n: int,
    ) -> _Curve | None:
        """A new curve, independent or braided around an existing one; None when it leaves the image."""
        c = self.config
        lo_k, hi_k = c.waypoints
        wp = None
        if curves and rng.random() < c.weave_fraction:
            if mode == "pair" and k == 1:
                base = curves[0]
                crossings = want[0] if want else 0
            else:
                base = curves[int(rng.integers(len(curves)))]
                lo_c, hi_c = want if want is not None else (0, _EASY_PER_CURVE)
                crossings = int(rng.integers(lo_c, hi_c + 1))
            wp = self._weave(rng, base.waypoints, crossings)
        if wp is None:
            if k == 0:
                # Later curves are often braided around this one; a braid crossing t times follows t + 1 of its
                # waypoints, so give it enough for its share of the target (when the range allows).
                share = target if mode == "pair" else -(-target // max(1, n - 1))
                lo_k = max(lo_k, min(hi_k, share + 1))
            wp = self._walk(rng, int(rng.integers(lo_k, hi_k + 1)))
        if wp is None:
            return None
        margin = c.border_margin * c.line_width
        wp = np.round(np.clip(wp, margin, c.image_size - margin), 2)
        poly = draw.spline_points(wp, _SPACING)
        # The spline may overshoot its waypoints a little; the stroke must still lie wholly inside the image.
        if poly.min() < c.line_width or poly.max() > c.image_size - c.line_width:
            return None
        return _Curve(wp, poly, draw.arc_lengths(poly))

    def _walk(self, rng: np.random.Generator, k: int) -> np.ndarray | None:
        """Waypoints of a smooth random walk inside the image; None when the walk leaves it."""
        c = self.config
        margin = c.border_margin * c.line_width
        lo, hi = margin, c.image_size - margin
        step = rng.uniform(*c.curve_length) * c.image_size / (k - 1)
        pts = [rng.uniform(lo, hi, size=2)]
        # Start roughly towards the centre so a long walk has room; turn gently (a hairpin fails min_radius).
        to_centre = c.image_size / 2.0 - pts[0]
        heading = math.atan2(to_centre[1], to_centre[0]) + rng.uniform(-0.5, 0.5) * math.pi
        for i in range(k - 1):
            for attempt in range(8):
                spread = _TURN_SD * (1.0 + attempt / 4.0) if i or attempt else 0.0
                h = heading + float(np.clip(rng.normal(0.0, spread) if spread else 0.0, -_MAX_TURN, _MAX_TURN))
                nxt = pts[-1] + step * rng.uniform(0.8, 1.2) * np.array([math.cos(h), math.sin(h)])
                if np.all((nxt >= lo) & (nxt <= hi)):
                    break
            else:
                return None
            heading = h
            pts.append(nxt)
        return np.array(pts)

    def _weave(self, rng: np.random.Generator, base: np.ndarray, crossings: int) -> np.ndarray | None:
        """Waypoints that follow ``base`` on alternating sides so the curve crosses it about ``crossings`` times.

        The new curve follows a window of the base's waypoints, offset along the base's normal; the side flips
        between ``crossings`` chosen pairs of consecutive waypoints (each flip is one crossing when the offsets are
        clear of the base). Its ends may wander off the base so it does not look like a copy.
        """
        k = len(base)
        if crossings + 1 > k:
            return None
        w = int(rng.integers(max(2, crossings + 1), k + 1))
        i0 = int(rng.integers(0, k - w + 1))
        ext = np.concatenate([2.0 * base[:1] - base[1:2], base, 2.0 * base[-1:] - base[-2:-1]])
        tangent = ext[2:] - ext[:-2]
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        seg = np.linalg.norm(np.diff(base, axis=0), axis=1)
        local = np.concatenate([[seg[0]], (seg[:-1] + seg[1:]) / 2.0, [seg[-1]]])
        idx = np.arange(i0, i0 + w)
        flips = np.zeros(w, dtype=np.int64)
        if crossings:
            flips[1 + rng.choice(w - 1, size=crossings, replace=False)] = 1
        side = rng.choice([-1.0, 1.0]) * (-1.0) ** np.cumsum(flips)
        amp = rng.uniform(0.2, 0.4, size=w) * local[idx]
        jitter = rng.uniform(-0.15, 0.15, size=w) * local[idx]
        pts = base[idx] + (side * amp)[:, None] * normal[idx] + jitter[:, None] * tangent[idx]
        out = [pts]
        for end in (0, 1):
            if rng.random() < 0.5:
                continue
            # Wander off past this end: one more waypoint roughly continuing the curve, turned away a little.
            d = pts[0] - pts[1] if end == 0 else pts[-1] - pts[-2]
            ang = math.atan2(d[1], d[0]) + rng.normal(0.0, math.radians(35.0))
            extra = (pts[0] if end == 0 else pts[-1]) + rng.uniform(0.4, 0.9) * float(np.linalg.norm(d)) * np.array(
                [math.cos(ang), math.sin(ang)]
            )
            out = [extra[None], *out] if end == 0 else [*out, extra[None]]
        return np.concatenate(out)

    def _check(
        self,
        cand: _Curve,
        curves: list[_Curve],
        crossings: list[dict[str, Any]],
        mode: str,
        k: int,
        want: tuple[int, int] | None,
        rej: Counter[str],
    ) -> list[dict[str, Any]] | None:
        """New crossings of ``cand`` with the placed curves, or None (reason counted) when it must be redrawn.

        The cheap count test runs first: most candidates fail it, and the self tests cost more.
        """
        c = self.config
        lw = c.line_width
        hits = [draw.polyline_intersections(cand.poly, other.poly) for other in curves]
        counts = [len(h["i"]) for h in hits]
        relevant = counts[0] if mode == "pair" and k == 1 else sum(counts)
        if want is not None and not want[0] <= relevant <= want[1]:
            rej["count"] += 1
            return None
        if (
            draw.min_turn_radius(cand.poly) < c.min_radius * lw
            or draw.folds_back(cand.poly, c.min_gap * lw)
            or draw.self_intersects(cand.poly)
        ):
            rej["self"] += 1
            return None
        found: list[dict[str, Any]] = []
        border = c.border_margin * lw
        end = c.end_margin * lw
        for j, (h, other) in enumerate(zip(hits, curves)):
            if not len(h["i"]):
                continue
            if np.any(h["angle"] < c.min_angle):
                rej["angle"] += 1
                return None
            pts = h["points"]
            if np.any((pts < border) | (pts > c.image_size - border)):
                rej["border"] += 1
                return None
            pos_a = cand.arc[h["i"]] + h["t"] * (cand.arc[h["i"] + 1] - cand.arc[h["i"]])
            pos_b = other.arc[h["j"]] + h["u"] * (other.arc[h["j"] + 1] - other.arc[h["j"]])
            if np.any(np.minimum(pos_a, cand.arc[-1] - pos_a) < end) or np.any(
                np.minimum(pos_b, other.arc[-1] - pos_b) < end
            ):
                rej["end"] += 1
                return None
            for p, a in zip(pts, h["angle"]):
                found.append({"point": [float(p[0]), float(p[1])], "curves": [j, k], "angle": float(a)})
        pts_all = np.array([f["point"] for f in crossings + found]).reshape(-1, 2)
        if draw.points_closer_than(pts_all, c.min_separation * lw):
            rej["separation"] += 1
            return None
        gap = c.min_gap * lw
        for h, other in zip(hits, curves):
            if draw.unexplained_close_regions(cand.poly, other.poly, gap, h["i"], h["j"]):
                rej["near_miss"] += 1
                return None
        return found

    # ------------------------------------------------------------------------------------------------- rendering

    def _render(
        self,
        rng: np.random.Generator,
        curves: list[_Curve],
        crossings: list[dict[str, Any]],
        mode: str,
        target: int,
        rej: Counter[str],
        attempt: int,
    ) -> Sample:
        """Colour, shuffle the drawing order, draw, and phrase the question."""
        c = self.config
        n = len(curves)
        names = [str(x) for x in rng.choice(list(dict.fromkeys(c.colors)), size=n, replace=False)]
        # Draw in random order so the asked-about pair (built first) is not always under the others.
        order = [int(i) for i in rng.permutation(n)]
        slot = {built: pos for pos, built in enumerate(order)}
        bg = (255, 255, 255) if c.background == "white" else tuple(int(v) for v in rng.integers(232, 256, size=3))
        image = Image.new("RGB", (c.image_size, c.image_size), bg)
        drawer = ImageDraw.Draw(image)
        for built in order:
            draw.draw_polyline(drawer, curves[built].poly, draw.color_rgb(names[built]), c.line_width)

        if mode == "pair":
            pair = [0, 1] if rng.random() < 0.5 else [1, 0]
            template = int(rng.integers(len(PAIR_TEMPLATES)))
            question = PAIR_TEMPLATES[template].format(a=names[pair[0]], b=names[pair[1]])
            counted = [x for x in crossings if sorted(x["curves"]) == [0, 1]]
            asked = [0, 1]
        else:
            pair = None
            template = int(rng.integers(len(ALL_TEMPLATES)))
            question = ALL_TEMPLATES[template]
            counted = crossings
            asked = list(range(n))
        if len(counted) != target:  # the construction guarantees this; a mismatch is a bug, not bad input
            raise AssertionError(f"line_intersection: built {len(counted)} crossings for target {target}")
        evidence = Evidence(points=[list(x["point"]) for x in counted])
        if not counted and c.empty_evidence == "curves":
            evidence.polylines = [curves[i].poly.tolist() for i in asked]

        meta = {
            "question_mode": mode,
            "template": template,
            "pair": None if pair is None else [names[pair[0]], names[pair[1]]],
            "spline": "catmull-rom uniform, reflected end tangents",
            "spacing": _SPACING,
            "curves": [
                {
                    "color": names[built],
                    "waypoints": curves[built].waypoints.tolist(),
                    "n_points": len(curves[built].poly),
                }
                for built in order
            ],
            "crossings": [
                {"point": x["point"], "curves": sorted(slot[i] for i in x["curves"]), "angle": round(x["angle"], 2)}
                for x in crossings
            ],
            "rejections": dict(sorted(rej.items())),
            "restarts": attempt,
        }
        return Sample(image=image, question=question, answer=str(target), evidence=evidence, meta=meta)
