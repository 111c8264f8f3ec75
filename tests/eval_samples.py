"""Hand-made samples shared by the evaluation tests: a 112 x 112 image on a 4 x 4 token grid, evidence dicts, rows and
a hand-written KL."""

from __future__ import annotations

import math

import numpy as np

# The geometry is given explicitly: a 112 x 112 image under a 4 x 4 token grid,
# one token = 28 px of the original.
HW = (112, 112)
GRID4 = (4, 4)


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
