"""klal.grounding.ops against hand-worked cases and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from klal.grounding.ops import (
    CropTooSmallError,
    Region,
    best_window,
    cap_aspect,
    cells_to_pixels,
    chord_elbow,
    connected_components,
    elbow_threshold,
    expand_box,
    extract_regions,
    gaussian_smooth,
    mask_to_box,
    normalize,
    pixels_to_cells,
    spatial_entropy,
    spatial_entropy_count,
)

# ------------------------------------------------------------------------------------------------------ chord elbow

# Slope -2 for four steps, then slope -0.5: the kink is at index 4 (value 2).
KINKED = [10.0, 8.0, 6.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.0]


def test_chord_elbow_piecewise_linear_kink():
    # Normalised: x = i/8, y = v/10; chord from (0, 1) to (1, 0) is x + y = 1, distance (1 - x - y) / sqrt(2).
    # i=3: 1 - .375 - .4 = .225; i=4: 1 - .5 - .2 = .3; i=5: 1 - .625 - .15 = .225 -> index 4.
    assert chord_elbow(KINKED) == 4
    # Units do not matter (both axes are normalised), and neither does a constant offset.
    assert chord_elbow(np.asarray(KINKED) * 1000.0 + 7.0) == 4
    # The mirrored (rising) curve has its kink at the mirrored index.
    assert chord_elbow(KINKED[::-1]) == len(KINKED) - 1 - 4


def test_chord_elbow_one_over_x_hand_worked():
    values = [1.0 / (i + 1) for i in range(10)]
    # x = i/9, y = (1/(i+1) - 0.1) / 0.9; distance to x + y = 1 is proportional to 1 - x - y:
    # i=1: 1 - 0.1111 - 0.4444 = 0.4444; i=2: 1 - 0.2222 - 0.2593 = 0.5185; i=3: 1 - 0.3333 - 0.1667 = 0.5.
    assert chord_elbow(values) == 2
    # Independently: perpendicular distance by projecting onto the chord's unit vector (no cross product).
    n = len(values)
    pts = np.stack([np.arange(n) / (n - 1), (np.asarray(values) - min(values)) / (max(values) - min(values))], axis=1)
    u = (pts[-1] - pts[0]) / np.linalg.norm(pts[-1] - pts[0])
    rel = pts - pts[0]
    dist = np.linalg.norm(rel - np.outer(rel @ u, u), axis=1)
    assert int(np.argmax(dist)) == 2


def test_chord_elbow_degenerate_curves():
    assert chord_elbow([]) == 0
    assert chord_elbow([5.0]) == 0
    assert chord_elbow([5.0, 1.0]) == 0
    assert chord_elbow([3.0, 3.0, 3.0, 3.0]) == 0  # flat: nothing off the chord
    assert chord_elbow([4.0, 3.0, 2.0, 1.0]) == 0  # straight line: nothing off the chord
    with pytest.raises(ValueError, match="NaN"):
        chord_elbow([1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="1-D"):
        chord_elbow(np.zeros((2, 3)))


def test_elbow_threshold_sorts_descending_first():
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(KINKED)
    assert elbow_threshold(shuffled) == 2.0  # sorted curve is KINKED, elbow at index 4 -> value 2
    assert elbow_threshold(np.asarray(shuffled).reshape(3, 3)) == 2.0  # any shape is flattened
    assert elbow_threshold([0.0, 0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        elbow_threshold([])


# ------------------------------------------------------------------------------------------ smoothing, components


def test_gaussian_smooth_nearest_mode_keeps_constant_grid_and_mass_peak():
    flat = np.full((4, 6), 2.5)
    np.testing.assert_allclose(gaussian_smooth(flat, 1.5), flat)  # "nearest" padding: no loss at the border
    g = np.zeros((9, 9))
    g[4, 4] = 1.0
    s = gaussian_smooth(g, 1.0)
    assert s.argmax() == 40 and s.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(s, s.T)  # isotropic
    np.testing.assert_array_equal(gaussian_smooth(g, 0), g)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_smooth(g, -1.0)


def test_connected_components_connectivity():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours
    mask[3, 3] = True
    _, n4 = connected_components(mask, 4)
    labels8, n8 = connected_components(mask, 8)
    assert (n4, n8) == (3, 2)
    assert labels8[0, 0] == labels8[1, 1] != labels8[3, 3]
    assert labels8[0, 1] == 0
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(mask, 6)


# -------------------------------------------------------------------------------------------------- spatial entropy


def test_spatial_entropy_two_blobs_three_to_one():
    g = np.zeros((8, 8))
    g[1, 1:4] = 1.0  # blob of 3 cells
    g[6, 6] = 1.0  # blob of 1 cell, far away
    # mean = 4/64; each blob cell keeps 1 - 1/16 after the ReLU, so the masses are 3:1.
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert spatial_entropy(g) == pytest.approx(expected, rel=1e-12)
    # Scaling the map does not change the shares (the floor is far below).
    assert spatial_entropy(g * 10.0) == pytest.approx(expected, rel=1e-12)


def test_spatial_entropy_single_blob_diagonal_and_flat():
    g = np.zeros((6, 6))
    g[2:4, 2:4] = 1.0
    assert spatial_entropy(g) == 0.0
    diag = np.zeros((6, 6))
    diag[2, 2] = diag[3, 3] = 1.0  # joined by 8-connectivity -> one component
    assert spatial_entropy(diag) == 0.0
    apart = np.zeros((6, 6))
    apart[2, 2] = apart[4, 4] = 1.0  # not touching -> two equal components
    assert spatial_entropy(apart) == pytest.approx(math.log(2))
    assert spatial_entropy(np.full((5, 5), 0.04)) == math.inf  # nothing above the mean


def test_spatial_entropy_mean_scale_and_floor():
    g = np.zeros((4, 4))
    g[0, 0] = 10.0
    g[3, 3] = 1.2
    # mean = 11.2 / 16 = 0.7. mean_scale 1: B = 9.3 and 0.5 -> two components.
    p = 9.3 / 9.8
    assert spatial_entropy(g) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    # mean_scale 2: 2 * mean = 1.4 > 1.2, the weak blob vanishes.
    assert spatial_entropy(g, mean_scale=2.0) == 0.0
    # The floor is absolute: weak blob B = 0.5 falls below floor 0.6. Its B still counts in the denominator (the
    # authors' shares are over the sum of B over all cells), so the one component has p = 9.3 / 9.8, not 1.
    p = 9.3 / 9.8
    assert spatial_entropy(g, floor=0.6) == pytest.approx(-p * math.log(p), rel=1e-12)
    assert spatial_entropy_count(g, floor=0.6) == (pytest.approx(-p * math.log(p), rel=1e-12), 1)
    # No cell above the floor but B positive: entropy 0 with no component; B zero everywhere: inf.
    assert spatial_entropy_count(g, floor=20.0) == (0.0, 0)
    assert spatial_entropy_count(np.full((3, 3), 2.0)) == (math.inf, 0)
    with pytest.raises(ValueError, match="NaN"):
        spatial_entropy(np.array([[1.0, np.nan]]))


# ------------------------------------------------------------------------------------------------ boxes and regions


def test_mask_to_box():
    m = np.zeros((5, 7), dtype=bool)
    assert mask_to_box(m) is None
    m[1, 2] = m[3, 5] = True
    assert mask_to_box(m) == (1, 2, 4, 6)


def test_cap_aspect_grows_short_side():
    # A 1 x 9 box in the middle of a 9 x 12 grid becomes 3 x 9 (ratio exactly 3), centred on the original row.
    assert cap_aspect((4, 0, 5, 9), 3.0, (9, 12)) == (3, 0, 6, 9)
    # Tall version: columns grow instead.
    assert cap_aspect((0, 4, 9, 5), 3.0, (12, 9)) == (0, 3, 9, 6)
    # At the top border the growth is shifted down into the grid.
    assert cap_aspect((0, 2, 1, 11), 3.0, (9, 12)) == (0, 2, 3, 11)
    # Already within the cap: unchanged.
    assert cap_aspect((2, 2, 4, 7), 3.0, (9, 12)) == (2, 2, 4, 7)


def test_cap_aspect_shrinks_long_side_when_grid_too_thin():
    # Grid of one row: the short side cannot grow, so the long side shrinks to 3 cells.
    assert cap_aspect((0, 0, 1, 9), 3.0, (1, 9)) == (0, 3, 1, 6)  # around the box centre (col 4.5)
    assert cap_aspect((0, 0, 1, 9), 3.0, (1, 9), center=(0.5, 1.0)) == (0, 0, 1, 3)  # around col 1, clamped at 0
    assert cap_aspect((0, 0, 1, 9), 3.0, (1, 9), center=(0.5, 7.5)) == (0, 6, 1, 9)
    with pytest.raises(ValueError, match="max_aspect"):
        cap_aspect((0, 0, 1, 9), 0.5, (1, 9))
    with pytest.raises(ValueError, match="outside the grid"):
        cap_aspect((0, 0, 1, 10), 3.0, (1, 9))


def test_extract_regions_ranks_by_raw_mass_not_smoothed():
    g = np.zeros((20, 20))
    g[4, 4] = 20.0  # A: one strong cell, raw mass 20
    g[10:15, 10:15] = 0.84  # B: broad weak 5x5 block, raw mass 21
    regions = extract_regions(g, sigma=1.5, top_k=2)
    assert len(regions) == 2 and all(isinstance(r, Region) for r in regions)
    in_a = [r.mask[4, 4] for r in regions]
    assert in_a == [False, True]  # B first, A second
    assert regions[0].mass == pytest.approx(21.0)
    assert regions[1].mass == pytest.approx(20.0)
    for r in regions:
        assert r.mass == pytest.approx(g[r.mask].sum())  # raw mass over the component's cells
    # The case is meaningful: ranked by the smoothed map (peak or mass inside the component) A would come first.
    s = gaussian_smooth(g, 1.5)
    assert s[regions[1].mask].max() > s[regions[0].mask].max()
    assert s[regions[1].mask].sum() > s[regions[0].mask].sum()
    # top_k keeps the best one only.
    (best,) = extract_regions(g, sigma=1.5, top_k=1)
    assert not best.mask[4, 4] and best.mass == pytest.approx(21.0)


def test_extract_regions_caps_aspect_of_a_line():
    g = np.zeros((9, 12))
    g[4, 1:10] = 1.0  # a 1 x 9 line
    (region,) = extract_regions(g, sigma=0, top_k=2)
    assert region.box == (3, 1, 6, 10)
    assert mask_to_box(region.mask) == (4, 1, 5, 10)  # the mask stays the component itself
    (uncapped,) = extract_regions(g, sigma=0, max_aspect=None)
    assert uncapped.box == (4, 1, 5, 10)

    # One-row grid: the short side cannot grow, so the long side shrinks to 3 cells around the RAW mass centre,
    # col (5 * (0.5 + 1.5 + 2.5) + 1 * (3.5 + ... + 8.5)) / 21 = 58.5 / 21 = 2.79 -> start floor(2.79 - 1.5 + 0.5) = 1.
    row = np.zeros((1, 12))
    row[0, :9] = [5, 5, 5, 1, 1, 1, 1, 1, 1]
    (region,) = extract_regions(row, sigma=0)
    assert mask_to_box(region.mask) == (0, 0, 1, 9)
    assert region.box == (0, 1, 1, 4)  # the box centre (4.5) would give (0, 3, 1, 6)


def test_extract_regions_block_on_zero_background():
    # The sorted curve is a step (9 ones, then exact zeros); its chord elbow is the first zero, and keeping ">= 0"
    # would return the whole grid, so the cells above the flat tail are kept instead.
    g = np.zeros((16, 16))
    g[5:8, 9:12] = 1.0
    (region,) = extract_regions(g, sigma=0, top_k=2)
    assert region.box == (5, 9, 8, 12) and region.mass == 9.0
    # Smoothed (sigma 1.5) the block spreads, but the region is still around it, not the whole grid.
    best = extract_regions(g, sigma=1.5)[0]
    r0, c0, r1, c1 = best.box
    assert r0 <= 5 and c0 <= 9 and r1 >= 8 and c1 >= 12
    assert (r1 - r0) * (c1 - c0) < 16 * 16 / 2
    assert best.mass == 9.0


def test_extract_regions_flat_and_bad_input():
    (whole,) = extract_regions(np.zeros((3, 4)))
    assert whole.box == (0, 0, 3, 4) and whole.mass == 0.0
    with pytest.raises(ValueError, match="relevance"):
        extract_regions(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="top_k"):
        extract_regions(np.ones((3, 3)), top_k=0)


# --------------------------------------------------------------------------------------------------------- windows


def test_best_window_finds_planted_block():
    rng = np.random.default_rng(1)
    g = rng.uniform(0, 0.01, size=(12, 10))
    g[5:8, 2:5] += 1.0
    box, score = best_window(g, [(3, 3)])
    assert box == (5, 2, 8, 5)
    assert score == pytest.approx(g[5:8, 2:5].sum() / 3.0)
    # Across sizes sum / sqrt(area): 2x2 ~ 4/2 = 2, 3x3 ~ 9/3 = 3, 6x6 ~ 9.x/6 ~ 1.6 -> the 3x3 window wins.
    box, score = best_window(g, [(2, 2), (3, 3), (6, 6)])
    assert box == (5, 2, 8, 5)
    assert score == pytest.approx(g[5:8, 2:5].sum() / 3.0)


def test_best_window_matches_brute_force_and_clips_sizes():
    rng = np.random.default_rng(2)
    g = rng.random((7, 5))
    for h, w in [(1, 1), (2, 3), (4, 2)]:
        sums = {(r, c): g[r : r + h, c : c + w].sum() for r in range(7 - h + 1) for c in range(5 - w + 1)}
        r, c = max(sums, key=sums.get)
        box, score = best_window(g, [(h, w)])
        assert box == (r, c, r + h, c + w)
        assert score == pytest.approx(sums[(r, c)] / math.sqrt(h * w))
    box, _ = best_window(g, [(50, 50)])  # larger than the grid -> the whole grid
    assert box == (0, 0, 7, 5)
    with pytest.raises(ValueError, match="sizes"):
        best_window(g, [])
    with pytest.raises(ValueError, match="window size"):
        best_window(g, [(0, 2)])


# -------------------------------------------------------------------------------------------------- unit changes


def test_cells_to_pixels_hand_worked_non_square():
    # W=1000, H=700, grid 5 x 7: a cell is 1000/7 = 142.857 px wide and 700/5 = 140 px tall.
    x0, y0, x1, y1 = cells_to_pixels((1, 2, 4, 6), (5, 7), (1000, 700))
    assert (x0, y0, x1, y1) == pytest.approx((2000 / 7, 140.0, 6000 / 7, 560.0))
    assert cells_to_pixels((0, 0, 5, 7), (5, 7), (1000, 700)) == pytest.approx((0.0, 0.0, 1000.0, 700.0))


@pytest.mark.parametrize(("grid", "image"), [((5, 7), (1000, 700)), ((9, 7), (300, 333))])
def test_pixels_to_cells_round_trip(grid, image):
    # (9, 7) over 300 x 333: 3 * (300 / 7) * 7 / 300 = 2.9999999999999996 in floats, so a bare floor would drift.
    gh, gw = grid
    for r0 in range(gh):
        for r1 in range(r0 + 1, gh + 1):
            for c0 in range(gw):
                for c1 in range(c0 + 1, gw + 1):
                    box = (r0, c0, r1, c1)
                    assert pixels_to_cells(cells_to_pixels(box, grid, image), grid, image) == box


def test_pixels_to_cells_cover_and_errors():
    grid, image = (5, 7), (1000, 700)
    # (300, 150)-(310, 155): cols floor(2.1)=2 .. ceil(2.17)=3, rows floor(1.07)=1 .. ceil(1.107)=2.
    assert pixels_to_cells((300, 150, 310, 155), grid, image) == (1, 2, 2, 3)
    assert pixels_to_cells((300, 150, 300, 150), grid, image) == (1, 2, 2, 3)  # zero size -> its cell
    assert pixels_to_cells((-50, -10, 2000, 900), grid, image) == (0, 0, 5, 7)  # clipped to the grid
    with pytest.raises(ValueError, match="grid_hw"):
        pixels_to_cells((0, 0, 1, 1), (0, 7), image)
    with pytest.raises(ValueError, match="x1 < x0"):
        pixels_to_cells((10, 0, 5, 1), grid, image)


def test_expand_box_grows_and_clamps_at_border():
    image = (640, 480)
    # Centre (30, 30): a 224 box around it would start at -82 -> shifted to 0.
    assert expand_box((10, 10, 50, 50), 224, image) == pytest.approx((0, 0, 224, 224))
    # Bottom-right corner: shifted back so it ends at the image border.
    assert expand_box((600, 440, 630, 470), 224, image) == pytest.approx((416, 256, 640, 480))
    # Centred growth in the interior; an axis already long enough is unchanged.
    assert expand_box((300, 100, 340, 400), 224, image) == pytest.approx((208, 100, 432, 400))
    # Parts outside the image are clipped first.
    assert expand_box((-100, -100, 700, 500), 224, image) == pytest.approx((0, 0, 640, 480))


def test_expand_box_raises_on_tiny_image():
    with pytest.raises(CropTooSmallError, match=r"200 x 480.*min_side=224") as info:
        expand_box((0, 0, 10, 10), 224, (200, 480))
    assert isinstance(info.value, ValueError)
    with pytest.raises(CropTooSmallError):
        expand_box((0, 0, 10, 10), 224, (480, 100))
    assert expand_box((0, 0, 10, 10), 224, (224, 224)) == pytest.approx((0, 0, 224, 224))  # exactly fits


def test_normalize_never_nan():
    g = np.array([[1.0, 3.0], [0.0, 4.0]])
    np.testing.assert_allclose(normalize(g), g / 8.0)
    uniform = np.full((2, 3), 1 / 6)
    for bad in (np.zeros((2, 3)), -np.ones((2, 3)), np.array([[1.0, np.nan, 0, 0, 0, 0]]).reshape(2, 3)):
        np.testing.assert_allclose(normalize(bad), uniform)
    inf = np.zeros((2, 3))
    inf[0, 0] = np.inf
    np.testing.assert_allclose(normalize(inf), uniform)
    huge = np.full((2, 3), 1e308)  # the sum overflows to inf
    np.testing.assert_allclose(normalize(huge), uniform)
    out = normalize(np.array([[1e-320, 0.0]]))  # subnormal but positive sum
    assert not np.isnan(out).any() and out.sum() == pytest.approx(1.0)
