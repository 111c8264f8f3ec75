"""Target-map converters: hand-worked maps and the no-map / error rule (geometry: tests/test_geometry.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from klal.data.schema import Evidence
from klal.data.targets import (
    NO_MAP_EMPTY,
    NO_MAP_OUTSIDE,
    NO_MAP_OUTSIDE_OR_ZERO,
    NO_MAP_REASONS,
    NO_MAP_ZERO_AREA,
    TargetMapError,
    TargetSpec,
    box_map,
    build_target_map,
    build_target_map_with_reason,
    explain_no_map,
    mask_map,
    point_map,
    polyline_map,
)
from klal.models.qwen2_5_vl import FAMILY

SQ = (224, 224)  # a 224 x 224 image: its own processed size with the default pixel bounds, an 8 x 8 grid
G8 = (8, 8)


def one_hot(shape: tuple[int, int], i: int, j: int) -> np.ndarray:
    m = np.zeros(shape)
    m[i, j] = 1.0
    return m


def gauss_grid(cx: float, cy: float, sigma: float, gh: int, gw: int) -> np.ndarray:
    """Closed-form normalised Gaussian at cell centres, written independently of the module."""
    out = np.zeros((gh, gw))
    for i in range(gh):
        for j in range(gw):
            out[i, j] = math.exp(-((j + 0.5 - cx) ** 2 + (i + 0.5 - cy) ** 2) / (2 * sigma**2))
    return out / out.sum()


# -- boxes -------------------------------------------------------------------------------------------------------------


def test_box_covering_one_cell_is_one_hot():
    m = build_target_map({"boxes": [[28, 56, 56, 84]]}, SQ, G8)
    np.testing.assert_array_equal(m, one_hot((8, 8), 2, 1))
    assert m.dtype == np.float64


def test_box_one_and_a_half_cells_gives_two_thirds_one_third():
    m = build_target_map({"boxes": [[0, 0, 42, 28]]}, SQ, G8)
    expected = np.zeros((8, 8))
    expected[0, 0], expected[0, 1] = 2 / 3, 1 / 3
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_box_rescaled_from_448_to_224():
    # 448 x 448 processed to 224 x 224 (max_pixels = 224^2): a 56 x 56 box is one token cell.
    grid = FAMILY.grids_for_size(448, 448, 56 * 56, 224 * 224)[0]
    assert grid == G8
    m = build_target_map({"boxes": [[56, 56, 112, 112]]}, (448, 448), grid)
    np.testing.assert_array_equal(m, one_hot((8, 8), 1, 1))


def test_box_rescaled_per_axis():
    # H=112 -> 56 (2 token rows), W=448 -> 112 (4 token columns): x scale 1/112 token/px, y scale 1/56 token/px.
    m = build_target_map({"boxes": [[112, 56, 224, 112]]}, (112, 448), (2, 4))
    np.testing.assert_array_equal(m, one_hot((2, 4), 1, 1))


def test_box_partly_outside_is_clipped():
    np.testing.assert_array_equal(build_target_map({"boxes": [[-28, -5, 28, 28]]}, SQ, G8), one_hot((8, 8), 0, 0))
    np.testing.assert_array_equal(build_target_map({"boxes": [[196, 196, 300, 900]]}, SQ, G8), one_hot((8, 8), 7, 7))
    m = build_target_map({"boxes": [[-14, 0, 42, 28]]}, SQ, G8)  # clipped to [0, 42]: 1.5 cells
    np.testing.assert_allclose(m[0, :2], [2 / 3, 1 / 3], atol=1e-12)


def test_box_area_raw_mass_is_area_in_cells():
    assert box_map([[0, 0, 56, 56]], SQ, G8).sum() == pytest.approx(4.0)
    assert box_map([[0, 0, 56, 56], [112, 112, 140, 126]], SQ, G8).sum() == pytest.approx(4.5)
    assert box_map([[0, 0, 56, 56]], SQ, G8, mode="gaussian").sum() == pytest.approx(4.0)
    assert box_map([[500, 500, 600, 600]], SQ, G8).sum() == 0.0


def test_gaussian_box_matches_closed_form_and_is_symmetric():
    # Box [56, 112]^2 -> tokens [2, 4]^2, centre (3, 3), sigma = 0.5 * 2 = 1 token per axis.
    m = build_target_map({"boxes": [[56, 56, 112, 112]]}, SQ, G8, TargetSpec(box_mode="gaussian"))
    np.testing.assert_allclose(m, gauss_grid(3, 3, 1.0, 8, 8), rtol=1e-12)
    assert m[2, 2] == pytest.approx(m[3, 3]) and m[2, 3] == pytest.approx(m[3, 2])
    assert m[1, 2] / m[2, 2] == pytest.approx(math.exp(-1.0))  # cell centres 1.5 and 0.5 tokens from the centre
    # Anisotropic: a 4 x 2 token box gets sigma_x = 2, sigma_y = 1.
    m = build_target_map({"boxes": [[56, 56, 168, 112]]}, SQ, G8, TargetSpec(box_mode="gaussian"))
    gx = np.exp(-((np.arange(8) + 0.5 - 4.0) ** 2) / (2 * 2.0**2))
    gy = np.exp(-((np.arange(8) + 0.5 - 3.0) ** 2) / (2 * 1.0**2))
    np.testing.assert_allclose(m, np.outer(gy, gx) / np.outer(gy, gx).sum(), rtol=1e-12)


def test_centerline_box():
    spec = TargetSpec(box_mode="centerline")
    # tokens x [1, 5], y [1, 3]: centre line y = 2, a 1-token band [1.5, 2.5] -> rows 1 and 2 half each.
    m = build_target_map({"boxes": [[28, 28, 140, 84]]}, SQ, G8, spec)
    expected = np.zeros((8, 8))
    expected[1:3, 1:5] = 1 / 8
    np.testing.assert_allclose(m, expected, atol=1e-12)
    # y [1, 2]: centre 1.5, band [1, 2] -> row 1 only.
    m = build_target_map({"boxes": [[28, 28, 140, 56]]}, SQ, G8, spec)
    expected = np.zeros((8, 8))
    expected[1, 1:5] = 1 / 4
    np.testing.assert_allclose(m, expected, atol=1e-12)


# -- points ------------------------------------------------------------------------------------------------------------


def test_point_nearest_cell():
    spec = TargetSpec(point_mode="nearest")
    np.testing.assert_array_equal(build_target_map({"points": [[30, 60]]}, SQ, G8, spec), one_hot((8, 8), 2, 1))
    # On the right/bottom border the point belongs to the last cell.
    np.testing.assert_array_equal(build_target_map({"points": [[224, 224]]}, SQ, G8, spec), one_hot((8, 8), 7, 7))
    # Rescaled: (300, 100) in a 448 x 448 image processed to 224 -> tokens (5.36, 1.79).
    m = build_target_map({"points": [[300, 100]]}, (448, 448), G8, spec)
    np.testing.assert_array_equal(m, one_hot((8, 8), 1, 5))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_point_gaussian_closed_form(sigma):
    m = build_target_map({"points": [[112, 112]]}, SQ, G8, TargetSpec(point_sigma=sigma))
    np.testing.assert_allclose(m, gauss_grid(4, 4, sigma, 8, 8), rtol=1e-12)
    # Symmetric around the point at the shared corner of cells (3, 3), (3, 4), (4, 3), (4, 4).
    assert m[3, 3] == pytest.approx(m[4, 4]) == pytest.approx(m[3, 4]) == pytest.approx(m[4, 3])
    np.testing.assert_allclose(m, m.T, rtol=1e-12)
    np.testing.assert_allclose(m, m[::-1, ::-1], rtol=1e-12)


def test_point_gaussian_tiny_sigma_does_not_underflow():
    m = build_target_map({"points": [[30, 60]]}, SQ, G8, TargetSpec(point_sigma=1e-3))
    np.testing.assert_allclose(m, one_hot((8, 8), 2, 1), atol=1e-12)


def test_gaussian_box_of_vanishing_width_stays_finite():
    # Width 1e-300 px: (offset / sigma)^2 overflows for every cell; the limit is the nearest column.
    m = build_target_map({"boxes": [[0, 30, 1e-300, 80]]}, SQ, G8, TargetSpec(box_mode="gaussian"))
    assert np.all(np.isfinite(m)) and m.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(m[:, 0].sum(), 1.0)


def test_point_raw_mass_is_one_per_point_inside():
    assert point_map([[10, 10], [200, 100], [300, 10]], SQ, G8).sum() == pytest.approx(2.0)


# -- polylines ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thickness", [0.1, 0.5, 0.99])
def test_horizontal_polyline_fills_its_row_uniformly(thickness):
    # y = 98 px = 3.5 tokens: the middle of row 3.
    m = build_target_map({"polylines": [[[0, 98], [224, 98]]]}, SQ, G8, TargetSpec(polyline_thickness=thickness))
    expected = np.zeros((8, 8))
    expected[3] = 1 / 8
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_vertical_polyline_with_interior_vertex():
    m = build_target_map({"polylines": [[[42, 0], [42, 100], [42, 224]]]}, SQ, G8, TargetSpec(polyline_thickness=0.5))
    expected = np.zeros((8, 8))
    expected[:, 1] = 1 / 8
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_polyline_thickness_spreads_over_rows():
    # Thickness 2 around y = 3.5: the kernel spans [2.5, 4.5] -> rows 2, 3, 4 get 1/4, 1/2, 1/4.
    m = build_target_map({"polylines": [[[0, 98], [224, 98]]]}, SQ, G8, TargetSpec(polyline_thickness=2.0))
    np.testing.assert_allclose(m.sum(axis=1), [0, 0, 0.25, 0.5, 0.25, 0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(m[3], np.full(8, 0.5 / 8), atol=1e-9)


def test_thick_polyline_at_the_border_is_reflected_back():
    # y = 14 px = 0.5 tokens, thickness 2: brush [-0.5, 1.5]; the part above the image folds back into row 0.
    m = build_target_map({"polylines": [[[0, 14], [224, 14]]]}, SQ, G8, TargetSpec(polyline_thickness=2.0))
    np.testing.assert_allclose(m.sum(axis=1), [0.75, 0.25, 0, 0, 0, 0, 0, 0], atol=1e-12)


def test_slanted_polyline_matches_brute_force_brush():
    # Independent estimate: dense points along the line, each spread over a fine lattice of its brush square.
    thickness, h = 0.7, 0.35
    verts_tok = np.array([[1.3, 2.2], [6.1, 3.9], [5.0, 6.6]])
    dense = []
    for a, b in zip(verts_tok[:-1], verts_tok[1:]):
        n = int(np.hypot(*(b - a)) * 400)
        t = (np.arange(n) + 0.5) / n
        dense.append((a + t[:, None] * (b - a), np.full(n, np.hypot(*(b - a)) / n)))
    pts = np.concatenate([d[0] for d in dense])
    wts = np.concatenate([d[1] for d in dense])
    offs = (np.arange(20) + 0.5) / 20 * thickness - h
    ox, oy = np.meshgrid(offs, offs)
    xs = (pts[:, 0, None] + ox.ravel()[None]).ravel()
    ys = (pts[:, 1, None] + oy.ravel()[None]).ravel()
    ws = np.repeat(wts / ox.size, ox.size)
    brute, _, _ = np.histogram2d(ys, xs, bins=[8, 8], range=[[0, 8], [0, 8]], weights=ws)
    m = build_target_map({"polylines": [(verts_tok * 28).tolist()]}, SQ, G8, TargetSpec(polyline_thickness=thickness))
    np.testing.assert_allclose(m, brute / brute.sum(), atol=5e-4)


def test_polyline_is_resolution_independent_and_clipped():
    line = [[0, 0], [300, 150], [448, 448]]
    big = build_target_map({"polylines": [[[x * 2, y * 2] for x, y in line]]}, (896, 896), (16, 16))
    small = build_target_map({"polylines": [line]}, (448, 448), (16, 16))
    np.testing.assert_allclose(big, small, atol=1e-12)
    # Extending a line beyond the image changes nothing: only the in-image part counts.
    inside = build_target_map({"polylines": [[[0, 98], [224, 98]]]}, SQ, G8)
    longer = build_target_map({"polylines": [[[-224, 98], [500, 98]]]}, SQ, G8)
    np.testing.assert_allclose(inside, longer, atol=1e-12)


def test_polyline_raw_mass_is_length_times_thickness():
    # In-image length 4 tokens (112 px), thickness 0.5 -> mass 2.
    assert polyline_map([[[0, 98], [112, 98]]], SQ, G8, thickness=0.5).sum() == pytest.approx(2.0)
    # Diagonal of the 8 x 8 grid: length 8 * sqrt(2).
    assert polyline_map([[[0, 0], [224, 224]]], SQ, G8, thickness=1.0).sum() == pytest.approx(8 * math.sqrt(2))


def test_diagonal_polyline_is_symmetric_and_on_the_diagonal():
    m = build_target_map({"polylines": [[[0, 0], [224, 224]]]}, SQ, G8, TargetSpec(polyline_thickness=0.1))
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert np.trace(m) > 0.95


# -- masks -------------------------------------------------------------------------------------------------------------


def test_mask_area_fraction_by_hand():
    mask = np.zeros(SQ, dtype=bool)
    mask[0:42, 0:28] = True  # cell (0, 0) full, cell (1, 0) half (rows 28..41)
    mask[100:107, 200:204] = True  # 7 x 4 = 28 px inside cell (3, 7): 28 / 784 of it
    frac = mask_map(mask, G8)
    expected = np.zeros((8, 8))
    expected[0, 0], expected[1, 0], expected[3, 7] = 1.0, 0.5, 28 / 784
    np.testing.assert_allclose(frac, expected, atol=1e-12)
    m = build_target_map({"masks": [mask]}, SQ, G8)
    np.testing.assert_allclose(m, expected / expected.sum(), atol=1e-12)


def test_mask_non_integer_scale():
    # A 3 x 3 mask on a 2 x 2 grid: each pixel is 2/3 token wide.
    mask = np.zeros((3, 3))
    mask[0, 0] = 1.0  # covers [0, 2/3]^2, all inside cell (0, 0)
    np.testing.assert_allclose(mask_map(mask, (2, 2)), [[4 / 9, 0], [0, 0]], atol=1e-12)
    mask = np.zeros((3, 3))
    mask[1, 1] = 1.0  # covers [2/3, 4/3]^2: 1/3 x 1/3 in each of the four cells
    np.testing.assert_allclose(mask_map(mask, (2, 2)), np.full((2, 2), 1 / 9), atol=1e-12)


def test_mask_block_average_on_downscale():
    rng = np.random.default_rng(1)
    mask = rng.random((448, 448)) < 0.3
    expected = mask.reshape(8, 56, 8, 56).mean(axis=(1, 3))
    np.testing.assert_allclose(mask_map(mask, G8), expected, atol=1e-12)


# -- combination -------------------------------------------------------------------------------------------------------


def line_tracing_evidence() -> dict:
    # Two one-cell node boxes and a path along row 4 (thickness 0.5 keeps it in that row).
    return {"boxes": [[0, 0, 28, 28], [196, 196, 224, 224]], "polylines": [[[0, 126], [224, 126]]]}


@pytest.mark.parametrize(
    ("combine", "box_share", "line_share"),
    [("element", 1 / 3, 1 / 3), ("kind", 1 / 4, 1 / 2), ("mass", 1 / 6, 4 / 6)],
)
def test_combination_rules(combine, box_share, line_share):
    spec = TargetSpec(combine=combine, polyline_thickness=0.5)
    m = build_target_map(line_tracing_evidence(), SQ, G8, spec)
    assert m[0, 0] == pytest.approx(box_share)
    assert m[7, 7] == pytest.approx(box_share)
    assert m[4].sum() == pytest.approx(line_share)
    np.testing.assert_allclose(m[4], line_share / 8, atol=1e-9)
    assert m.sum() == pytest.approx(1.0)


def test_boxes_of_different_size_get_equal_mass_per_element():
    m = build_target_map({"boxes": [[0, 0, 28, 28], [112, 112, 224, 224]]}, SQ, G8)
    assert m[0, 0] == pytest.approx(0.5)
    np.testing.assert_allclose(m[4:, 4:], 0.5 / 16, atol=1e-12)


def test_element_outside_is_dropped_others_kept():
    m = build_target_map({"boxes": [[300, 300, 400, 400], [28, 56, 56, 84]], "points": [[-5, 10]]}, SQ, G8)
    np.testing.assert_array_equal(m, one_hot((8, 8), 2, 1))


def test_evidence_dataclass_and_dict_agree():
    ev = Evidence(boxes=[[10, 20, 100, 90]], points=[[50, 60]], polylines=[[[0, 0], [100, 200], [220, 10]]])
    np.testing.assert_array_equal(build_target_map(ev, SQ, G8), build_target_map(ev.to_dict(), SQ, G8))


def test_maps_are_distributions_on_the_token_grid():
    rng = np.random.default_rng(2)
    specs = [
        TargetSpec(box_mode=b, point_mode=p, combine=c, point_sigma=s, polyline_thickness=t)
        for b, p, c, s, t in itertools.product(
            ["area", "gaussian", "centerline"], ["gaussian", "nearest"], ["element", "kind", "mass"], [0.3, 2.0], [0.2]
        )
    ]
    for k in range(40):
        h, w = (int(v) for v in rng.integers(30, 900, size=2))
        ev = {
            "boxes": [sorted(rng.uniform(-50, w + 50, 2)) for _ in range(rng.integers(0, 3))],
            "points": [[rng.uniform(0, w), rng.uniform(0, h)] for _ in range(rng.integers(0, 3))],
            "polylines": [rng.uniform(-20, max(h, w), (3, 2)).tolist() for _ in range(rng.integers(0, 2))],
        }
        ev["boxes"] = [[b[0], b[0] * h / w, b[1], b[1] * h / w] for b in ev["boxes"]]
        grid = FAMILY.grids_for_size(h, w, 56 * 56, 448 * 448)[0]
        for spec in specs[k % 4 :: 4]:
            m, reason = build_target_map_with_reason(ev, (h, w), grid, spec)
            if m is None:
                assert reason in NO_MAP_REASONS
                continue
            assert reason is None
            assert m.shape == grid
            assert m.dtype == np.float64
            assert np.all(np.isfinite(m)) and np.all(m >= 0)
            assert m.sum() == pytest.approx(1.0, abs=1e-12)


# -- no map and errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evidence", "reason"),
    [
        (None, NO_MAP_EMPTY),
        ({}, NO_MAP_EMPTY),
        (Evidence(), NO_MAP_EMPTY),
        ({"boxes": [], "points": [], "polylines": []}, NO_MAP_EMPTY),
        ({"boxes": [[230, 0, 300, 50]]}, NO_MAP_OUTSIDE),
        ({"boxes": [[224, 0, 300, 50]]}, NO_MAP_OUTSIDE),  # touches the border only
        ({"points": [[-1, 5], [5, 225]]}, NO_MAP_OUTSIDE),
        ({"polylines": [[[-10, -10], [-10, 300]]]}, NO_MAP_OUTSIDE),
        ({"boxes": [[10, 10, 10, 50]]}, NO_MAP_ZERO_AREA),
        ({"polylines": [[[5, 5], [5, 5]]]}, NO_MAP_ZERO_AREA),
        ({"masks": [np.zeros(SQ)]}, NO_MAP_ZERO_AREA),
        ({"boxes": [[10, 10, 50, 10], [300, 300, 400, 400]]}, NO_MAP_OUTSIDE_OR_ZERO),
    ],
)
def test_no_map_cases(evidence, reason):
    assert build_target_map(evidence, SQ, G8) is None
    assert build_target_map_with_reason(evidence, SQ, G8) == (None, reason)
    assert explain_no_map(evidence, SQ) == reason


def test_explain_no_map_is_none_when_there_is_a_map():
    assert explain_no_map({"boxes": [[0, 0, 5, 5]]}, SQ) is None


@pytest.mark.parametrize(
    ("evidence", "message"),
    [
        ({"boxes": [[0, 0, float("nan"), 10]]}, r"boxes\[0\].*NaN"),
        ({"points": [[1, 2], [float("inf"), 3]]}, r"points\[1\].*NaN or inf"),
        ({"polylines": [[[0, 0], [1, float("nan")]]]}, r"polylines\[0\]\[1\].*NaN"),
        ({"boxes": [[0, 0, 10]]}, r"boxes\[0\].*4 coordinates"),
        ({"boxes": [[0, 0, 10, 10, 3]]}, r"boxes\[0\].*4 coordinates"),
        ({"points": [[1, 2, 3]]}, r"points\[0\].*2 coordinates"),
        ({"boxes": [[0, 0, 10, 10], [50, 0, 10, 10]]}, r"boxes\[1\].*x1 < x0"),
        ({"boxes": [[0, 30, 10, 10]]}, r"boxes\[0\].*y1 < y0"),
        ({"polylines": [[[0, 0]]]}, r"polylines\[0\].*at least 2 vertices"),
        ({"polylines": [[[0, 0], [1, 2, 3]]]}, r"polylines\[0\]\[1\].*2 coordinates"),
        ({"boxes": [["a", 0, 1, 1]]}, r"boxes\[0\].*not a list of numbers"),
        ({"box": [[0, 0, 1, 1]]}, r"unknown evidence key"),
        ({"masks": [np.zeros((10, 10))]}, r"masks\[0\].*does not match the image size"),
        ({"masks": [np.full(SQ, 2.0)]}, r"masks\[0\].*\[0, 1\]"),
    ],
)
def test_malformed_evidence_raises(evidence, message):
    with pytest.raises(TargetMapError, match=message):
        build_target_map(evidence, SQ, G8)
    with pytest.raises(TargetMapError, match=message):
        explain_no_map(evidence, SQ)


def test_malformed_element_raises_even_next_to_a_good_one():
    with pytest.raises(TargetMapError, match=r"points\[0\]"):
        build_target_map({"boxes": [[0, 0, 10, 10]], "points": [[float("nan"), 1]]}, SQ, G8)


@pytest.mark.parametrize(
    ("orig", "grid", "message"),
    [
        ((224, 224), (3.5, 8), "two positive integers"),
        ((0, 224), G8, "orig_hw must be positive"),
        (SQ, (0, 1), "two positive integers"),
        (SQ, "ab", "grid must be"),
    ],
)
def test_bad_sizes_raise(orig, grid, message):
    with pytest.raises(TargetMapError, match=message):
        build_target_map({"boxes": [[0, 0, 1, 1]]}, orig, grid)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"box_mode": "circle"}, "box_mode"),
        ({"point_mode": "disk"}, "point_mode"),
        ({"combine": "max"}, "combine"),
        ({"point_sigma": 0.0}, "point_sigma"),
        ({"polyline_thickness": -1.0}, "polyline_thickness"),
        ({"box_sigma_scale": float("nan")}, "box_sigma_scale"),
    ],
)
def test_target_spec_validates(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TargetSpec(**kwargs)
