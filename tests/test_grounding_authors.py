"""The training-free baselines against their authors' released code (issue 12), rule by rule, on hand-worked cases.

Released code compared: merci00001/entropy-gradient-grounding (EGG: ``utils.elbow_chord``, ``utils.spatial_entropy``,
``utils.get_disjoint_segments``, ``refine.refine_big``, ``main_eval.should_stop`` and the dataset's aspect rule),
seilk/LocalizationHeads (the per-head spatial entropy) and saccharomycetes/mllms_know (ViCrop's
``bbox_from_att_image_adaptive`` and ``rel_attention_*``). Each expected number below is worked out by hand in the
comments, or computed by an independent straightforward re-implementation written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from klal.grounding import egg, loc_heads, vicrop
from klal.grounding.ops import (
    Region,
    cap_aspect_px,
    chord_elbow,
    elbow_threshold,
    extract_regions,
    gaussian_smooth,
)

# ------------------------------------------------------------------------------------------------------ chord elbow


def _reference_elbow(values) -> float:
    """The chord elbow by projection in raw units on the ascending curve (ties: the first, i.e. lowest, value)."""
    y = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if y.size <= 2:
        return float(y.min())
    pts = np.stack([np.arange(y.size, dtype=np.float64), y], axis=1)
    u = (pts[-1] - pts[0]) / np.linalg.norm(pts[-1] - pts[0])
    rel = pts - pts[0]
    dist = np.linalg.norm(rel - np.outer(rel @ u, u), axis=1)
    return float(y[int(np.argmax(dist))])


def test_elbow_two_or_fewer_values_give_the_smallest():
    assert elbow_threshold([5.0, 1.0]) == 1.0
    assert elbow_threshold([2.0, 7.0]) == 2.0
    assert elbow_threshold([3.0]) == 3.0
    assert elbow_threshold([4.0, 4.0, 4.0]) == 4.0  # flat: nothing off the chord


def test_elbow_exact_tie_goes_to_the_lower_value():
    # Ascending (0, 1, 3, 4) at x = 0..3; chord from (0, 0) to (3, 4): distance ~ |4x - 3y|.
    # (1, 1): |4 - 3| = 1; (2, 3): |8 - 9| = 1 -> a tie between the values 1 and 3; the lower value, 1, wins.
    assert elbow_threshold([4.0, 0.0, 3.0, 1.0]) == 1.0
    # (The index elbow on the DESCENDING curve, lowest index on ties, would pick 3: the order matters.)
    assert [4.0, 3.0, 1.0, 0.0][chord_elbow([4.0, 3.0, 1.0, 0.0])] == 3.0


def test_elbow_matches_a_projection_reference_on_random_values():
    rng = np.random.default_rng(0)
    for n in (3, 5, 17, 100):
        for _ in range(20):
            v = rng.gamma(0.5, size=n) * rng.uniform(0.01, 100)
            assert elbow_threshold(v) == _reference_elbow(v)


# ---------------------------------------------------------------------------------------------- spatial entropies


def test_stopping_entropy_two_known_components_hand_worked():
    # sigma 0 so the map is the grid itself. 36 cells: 4 at (1, 1) and (2, 2) (diagonal: ONE 8-connected component),
    # 2 at (4, 4). mean = 10/36 = 5/18, so B = relu(S - 2 mean) = 4 - 5/9 = 31/9 (twice) and 2 - 5/9 = 13/9.
    # Elbow of S: ascending 33 zeros then 2, 4, 4 at x = 32..35; chord (0, 0)-(35, 4): distance ~ |4x - 35y|:
    # last zero x = 32 -> 128, (33, 2) -> 62, (34, 4) -> 4: the elbow value is 0, so every B > 0 cell counts.
    # p = (62/9) / (75/9) = 62/75 and 13/75.
    g = np.zeros((6, 6))
    g[1, 1] = g[2, 2] = 4.0
    g[4, 4] = 2.0
    expected = -(62 / 75 * math.log(62 / 75) + 13 / 75 * math.log(13 / 75))
    assert egg.stopping_entropy(g, sigma=0) == pytest.approx(expected, rel=1e-12)
    # With 4-connectivity the diagonal pair would be two components (31/75 each): a different number.
    assert expected != pytest.approx(-(2 * 31 / 75 * math.log(31 / 75) + 13 / 75 * math.log(13 / 75)))


def test_stopping_entropy_threshold_is_the_elbow_of_the_smoothed_map_and_counts_all_of_b():
    # 30 zeros, five 1s (apart), one 10. mean = 15/36 = 5/12, 2 mean = 5/6: B = 1/6 at each 1, 55/6 at the 10.
    # Elbow: chord (0, 0)-(35, 10), distance ~ |10x - 35y|: last zero x = 29 -> 290, last 1 x = 34 -> 305, the 10 -> 0:
    # the elbow value is 1 > 1/6, so only the 10 is a component, but all of B (total 10) is the denominator:
    # p = (55/6) / 10 = 11/12 and H = -(11/12) log(11/12).
    g = np.zeros((6, 6))
    for c in range(5):
        g[0 if c % 2 else 5, c] = 1.0
    g[3, 3] = 10.0
    assert egg.stopping_entropy(g, sigma=0) == pytest.approx(-(11 / 12) * math.log(11 / 12), rel=1e-12)
    # A flat map has B = 0 everywhere: inf.
    assert egg.stopping_entropy(np.full((5, 5), 0.3)) == math.inf


def _reference_stopping_entropy(grid: np.ndarray) -> float:
    """Straight re-implementation: scipy's default-mode smoothing, relu(S - 2 mean), elbow, 8-components."""
    s = ndimage.gaussian_filter(np.asarray(grid, dtype=np.float64), sigma=1.5)
    b = np.maximum(s - 2 * s.mean(), 0.0)
    if b.sum() <= 0:
        return math.inf
    labels, n = ndimage.label(b > _reference_elbow(s.ravel()), structure=np.ones((3, 3)))
    ps = [b[labels == i].sum() / b.sum() for i in range(1, n + 1)]
    return float(-sum(p * math.log(p) for p in ps if p > 0)) if ps else 0.0


def test_stopping_entropy_matches_a_reference_with_reflect_smoothing():
    rng = np.random.default_rng(3)
    for shape in [(8, 8), (12, 7), (16, 16)]:
        for _ in range(5):
            g = rng.gamma(0.3, size=shape)
            g[rng.integers(shape[0]), rng.integers(shape[1])] += 20.0
            assert egg.stopping_entropy(g) == pytest.approx(_reference_stopping_entropy(g), rel=1e-9, abs=1e-12)
    # The boundary mode is scipy's default ("reflect"): a border peak smooths differently under "nearest".
    g = np.zeros((9, 9))
    g[0, 4] = 1.0
    np.testing.assert_allclose(gaussian_smooth(g, 1.5, "reflect"), ndimage.gaussian_filter(g, 1.5))
    assert not np.allclose(gaussian_smooth(g, 1.5, "reflect"), gaussian_smooth(g, 1.5, "nearest"))


def test_head_entropy_on_the_raw_attention_row_hand_worked():
    # A raw head map over 16 image tokens summing to 0.33 (its S_img, not 1): 0.1 and 0.05 side by side (one
    # component), 0.05 in the far corner, 0.01 elsewhere. mean = 0.33 / 16 = 0.020625;
    # B = 0.079375, 0.029375 | 0.029375 (all > 0.001); total B = 0.138125.
    a = np.full((4, 4), 0.01)
    a[0, 0], a[0, 1], a[3, 3] = 0.1, 0.05, 0.05
    p1, p2 = (0.079375 + 0.029375) / 0.138125, 0.029375 / 0.138125
    assert loc_heads.head_entropy(a) == pytest.approx(-(p1 * math.log(p1) + p2 * math.log(p2)), rel=1e-12)
    # The floor (0.001) is on RAW attention: the same shape with 100x less mass has B below it everywhere: entropy 0
    # with no component (the released code would rank that head first; klal gives it no vote, tested below).
    assert loc_heads.head_entropy(a / 100) == 0.0
    # B sums to 0 (flat): inf.
    assert loc_heads.head_entropy(np.full((4, 4), 0.02)) == math.inf


def test_heads_with_no_component_above_the_floor_get_no_vote():
    # Two layers x two heads over a 4 x 4 image grid (raw maps: each sums to its S_img).
    a = np.full((4, 4), 0.01)
    a[0, 0], a[0, 1], a[3, 3] = 0.1, 0.05, 0.05
    maps = np.full((2, 2, 4, 4), 1e-4 / 16)
    maps[0, 0] = a  # S_img 0.33, two components
    maps[1, 1] = np.full((4, 4), 0.33 / 16)  # S_img 0.33 but flat: B = 0, entropy inf -> no vote
    s_img = maps.sum(axis=(2, 3))
    assert loc_heads.select_heads_for_sample(s_img, maps, top_k=2) == [(0, 0)]
    # Head (1, 1) with a's shape and 1/100 of its mass: B > 0 but below the 0.001 floor everywhere, entropy 0 (the
    # released code would rank it first). S_img ascending (1e-4, 1e-4, 0.0033, 0.33): chord distance ~
    # |3 (y - 1e-4) - 0.3299 x| is 0.3299 at x = 1 and 0.6502 at x = 2, so the elbow value is 0.0033 and (1, 1) passes
    # the S_img filter, yet it gets no vote.
    maps[1, 1] = a / 100
    s_img = maps.sum(axis=(2, 3))
    assert elbow_threshold(s_img) == pytest.approx(0.0033)
    assert loc_heads.head_entropy(maps[1, 1]) == 0.0
    assert loc_heads.select_heads_for_sample(s_img, maps, top_k=2) == [(0, 0)]
    # klal's earlier choice (each map normalised to sum 1 first) gives it components: it votes, after (0, 0) (same
    # shape, same entropy; the larger S_img goes first).
    assert loc_heads.select_heads_for_sample(s_img, maps, top_k=4, normalise=True) == [(0, 0), (1, 1)]


# --------------------------------------------------------------------------------------------------- EGG regions


def test_region_threshold_is_strictly_greater_than_the_elbow():
    # 6 x 6, sigma 0: a 2 x 2 block of 5s (rows 0-1, cols 0-1), rows 3-4 all 1s (12 cells), 20 zeros.
    # Elbow: ascending at x = 0..35, chord (0, 0)-(35, 5), distance ~ |x - 7y|: last zero (x = 19) 19, last 1
    # (x = 31) 24, 5s at most 3: the elbow value is 1. "> 1" keeps only the 5s; ">= 1" would add the 1s.
    g = np.zeros((6, 6))
    g[0:2, 0:2] = 5.0
    g[3:5, :] = 1.0
    assert elbow_threshold(g) == 1.0
    (only,) = egg.find_regions(g, sigma=0)
    assert only.box == (0, 0, 2, 2) and only.mass == 20.0
    assert len(extract_regions(g, sigma=0, top_k=None, max_aspect=None, strict=False)) == 2
    # A flat grid has nothing strictly above its elbow: no region at all.
    assert egg.rank_regions(np.full((4, 5), 0.7)) == []


def test_regions_are_4_connected():
    # Two cells touching at a corner on a zero background (sigma 0; elbow value 0): two 4-components, one 8-component.
    g = np.zeros((6, 6))
    g[2, 2] = 2.0
    g[3, 3] = 1.0
    regions = egg.find_regions(g, sigma=0)
    assert [r.box for r in regions] == [(2, 2, 3, 3), (3, 3, 4, 4)]
    assert len(egg.find_regions(g, sigma=0, connectivity=8)) == 1


def test_region_smoothing_is_scipys_default_reflect():
    # A peak in the corner (0, 0) and one inside at (3, 4), sigma 1.5. scipy's default boundary ("reflect") mirrors
    # the corner peak once about the edge; "nearest" repeats it over all six cells of the kernel's reach, which lifts
    # row and column 2 next to it above the elbow too. The expected regions are computed independently: scipy's
    # default-mode filter, the chord elbow by projection, 4-connected labels.
    g = np.zeros((6, 6))
    g[0, 0] = g[3, 4] = 1.0
    s = ndimage.gaussian_filter(g, 1.5)
    labels, n = ndimage.label(s > _reference_elbow(s.ravel()))
    assert n == 1 and np.array_equal(np.argwhere(labels == 1), [[0, 0], [0, 1], [1, 0], [1, 1]])
    (region,) = egg.find_regions(g)
    assert region.box == (0, 0, 2, 2) and region.mass == 1.0
    np.testing.assert_array_equal(region.mask, labels == 1)
    # The pooled search smooths the same way: on a 60 x 60 px image (10 px cells) the box is (0, 0, 20, 20).
    (pooled,) = egg.pool_regions([g], [(0, 0, 60, 60)])
    assert pooled.box == pytest.approx((0, 0, 20, 20))
    # "nearest" (klal's earlier choice) gives another region: the test tells the two apart.
    assert [r.box for r in egg.find_regions(g, smooth_mode="nearest")] == [(0, 0, 3, 3)]


def test_rank_regions_by_raw_mass_where_the_smoothed_map_disagrees():
    g = np.zeros((20, 20))
    g[4, 4] = 20.0  # A: one strong cell, raw mass 20
    g[10:15, 10:15] = 0.84  # B: broad weak 5 x 5 block, raw mass 21
    masks = egg.rank_regions(g)
    assert len(masks) == 2
    assert not masks[0][4, 4] and masks[1][4, 4]  # B first, A second
    assert g[masks[0]].sum() == pytest.approx(21.0) and g[masks[1]].sum() == pytest.approx(20.0)
    # Ranked by the smoothed map (its peak or its mass inside the component) A would come first.
    s = ndimage.gaussian_filter(g, 1.5)
    assert s[masks[1]].max() > s[masks[0]].max() and s[masks[1]].sum() > s[masks[0]].sum()
    # Independent check of the masks themselves: scipy default smoothing, > elbow, 4-connected labels.
    labels, n = ndimage.label(s > _reference_elbow(s.ravel()))
    assert sorted(int(labels[m].max()) for m in masks) == list(range(1, n + 1))
    for m in masks:
        assert (labels == labels[m].max()).sum() == m.sum()


def test_rank_regions_ties_keep_raster_order():
    # Two identical single-cell peaks placed symmetrically about the diagonal: the smoothed map is symmetric under
    # transposition, so the two components are transposes of each other with the same raw mass (1.0 each).
    g = np.zeros((12, 12))
    g[8, 2] = g[2, 8] = 1.0
    masks = egg.rank_regions(g)
    assert len(masks) == 2 and g[masks[0]].sum() == g[masks[1]].sum() == 1.0
    assert masks[0][2, 8] and masks[1][8, 2]  # the component starting in row 2 comes first


def test_aspect_cap_in_pixels_grows_about_the_centre_then_clips():
    image = (400, 400)
    # 300 x 20 px, centre y = 110: height grows to 300 / 3 = 100 about it -> y 60..160.
    assert cap_aspect_px((0, 100, 300, 120), 3.0, image) == pytest.approx((0, 60, 300, 160))
    # At the top edge: centre y = 10 -> y -40..60, clipped to 0..60 (NOT shifted to 0..100): ratio 5 remains.
    assert cap_aspect_px((50, 0, 350, 20), 3.0, image) == pytest.approx((50, 0, 350, 60))
    # Tall box at the left edge: width 90 * 3 = 30 about x = 15 -> 0..30 (exactly inside).
    assert cap_aspect_px((10, 10, 20, 100), 3.0, image) == pytest.approx((0, 10, 30, 100))
    # Within the cap: unchanged.
    assert cap_aspect_px((10, 10, 40, 20), 3.0, image) == pytest.approx((10, 10, 40, 20))


def test_pool_regions_crop_regions_cut_from_the_crop_and_ranked_with_the_original():
    # Image 0 is 400 x 400 with an 8 x 8 map (50 px cells); crop 1 covers (100, 200)-(200, 300) with an 8 x 8 map
    # (12.5 px cells). sigma 0 so the regions are the cells themselves (zero background: elbow value 0).
    m0 = np.zeros((8, 8))
    m0[6, 6] = 5.0  # mass 5 on image 0: cells -> (300, 300, 350, 350)
    m1 = np.zeros((8, 8))
    m1[0, 0:4] = 2.0  # mass 8, a 1 x 4 line on the crop: (0, 0)-(50, 12.5) in crop pixels
    pooled = egg.pool_regions([m0, m1], [(0, 0, 400, 400), (100, 200, 200, 300)], sigma=0)
    assert [p.source for p in pooled] == [1, 0]  # 8 > 5: the crop's region first
    # The line is 50 x 12.5 px (ratio 4): its height grows to 50 / 3 about y = 6.25 -> -2.08..14.58, clipped at the
    # CROP's top edge to 0..14.58, then shifted by the crop's offset (100, 200).
    assert pooled[0].box == pytest.approx((100, 200, 150, 200 + 6.25 + 25 / 3))
    assert pooled[1].box == pytest.approx((300, 300, 350, 350))
    # Equal masses keep the order of the sources.
    m1[0, 0:4] = 1.25
    assert [p.source for p in egg.pool_regions([m0, m1], [(0, 0, 400, 400), (100, 200, 200, 300)], sigma=0)] == [0, 1]


# ----------------------------------------------------------------------------------------------- EGG stopping rule


@pytest.mark.parametrize(
    ("entropies", "expected"),
    [
        ([1.0, 1.5, 0.2], 1),  # rises at t = 1: round 1 (its crops) is returned even though its entropy rose
        ([2.0, 1.0, 0.5, 0.7], 3),  # falls twice, then rises
        ([1.0, 1.0, 1.0, 2.0], 3),  # equal entropies go on
        ([0.0, 5.0], 0),  # H_0 == 0: round 0, no crops
        ([0.0], 0),
        ([1.0, 0.5, 0.0, 3.0], 2),  # H_t == 0 stops
        # The release starts from H_{-1} = 1000: a flat original (inf > 1000) stops at once, whatever follows.
        ([math.inf, 0.5, 0.4, 0.6], 0),
        ([math.inf, math.inf, 1.0, 1.5], 0),
        ([1000.5, 2.0], 0),  # 1000.5 > 1000
        ([1000.0, 999.0, 1000.0], 2),  # 1000 is not above 1000: go on; 999 < 1000: go on; 1000 > 999 stops
        ([float(20 - t) for t in range(20)], 15),  # always falling: the cap (15) stops it
    ],
)
def test_returned_round(entropies, expected):
    assert egg.returned_round(entropies) == expected


def test_returned_round_cap_and_errors():
    assert egg.returned_round([3.0, 2.0, 1.0, 0.5], max_rounds=2) == 2
    assert egg.returned_round([3.0, 2.0], max_rounds=0) == 0
    with pytest.raises(ValueError, match="not stopped"):
        egg.returned_round([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="max_rounds"):
        egg.returned_round([1.0], max_rounds=-1)


def test_zoom_rounds_replaces_crops_zooms_and_stops_where_returned_round_says():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    entropies = [2.0, 1.0, 1.0, 1.5, 0.1]  # returned_round -> 3
    seen: list[list[tuple[int, int]]] = []
    searched: list[list[tuple[float, ...]]] = []

    def relevance(images):
        seen.append([im.size for im in images])
        return [np.zeros((4, 6))] + [np.zeros((3, 3))] * (len(images) - 1)

    found = [egg.PooledRegion(0, Region((0, 0, 1, 1), 1.0, np.ones((1, 1), bool)), (0.0, 0.0, 75.0, 50.0))]

    def search(maps, sources):
        t = len(searched)
        searched.append([tuple(s) for s in sources])
        assert len(maps) == len(sources)
        # Round t plans t + 1 crops; fractional edges are widened to whole pixels.
        planned = [(10.0 * k, 0.5, 10.0 * k + 49.5, 50.0) for k in range(t + 1)]
        return found, entropies[t], planned

    rounds, t = egg.zoom_rounds(relevance, [image], search, max_rounds=15)
    assert t == 3 == egg.returned_round(entropies) and len(rounds) == 4
    # Round t's input: the image, then the crops planned in round t - 1 (replacing, not adding to, the earlier ones),
    # each zoomed from 50 x 50 to the image's area (300 x 200 = 60000 px -> 245 x 245).
    assert [len(s) for s in seen] == [1, 2, 3, 4]
    assert all(size == (245, 245) for s in seen for size in s[1:])
    assert searched[2] == [(0, 0, 300, 200), (0, 0, 50, 50), (10, 0, 60, 50)]
    assert rounds[3].crops == [(0, 0, 50, 50), (10, 0, 60, 50), (20, 0, 70, 50)]
    # The returned round's planned crops (the answer's): its own 4, at whole pixels.
    assert rounds[3].planned == [(0, 0, 50, 50), (10, 0, 60, 50), (20, 0, 70, 50), (30, 0, 80, 50)]
    # The cap counts rounds after round 0.
    _, t = egg.zoom_rounds(relevance, [image], lambda maps, sources: ([], 1.0 / (1 + len(maps)), []), max_rounds=2)
    assert t == 2


def test_zoom_rounds_a_round_without_regions_keeps_its_own_crops():
    # The release's refine_big returns its input unchanged when it finds no region ("No boxes found"), with entropy
    # 0, so the loop stops there and the answer sees that round's input crops.
    image = Image.new("RGB", (300, 200))
    found = [egg.PooledRegion(0, Region((0, 0, 1, 1), 1.0, np.ones((1, 1), bool)), (0.0, 0.0, 75.0, 50.0))]
    script = [(found, 2.0, [(0.0, 0.0, 50.0, 50.0), (100.0, 100.0, 150.0, 150.0)]), ([], 0.0, [])]
    rounds, t = egg.zoom_rounds(
        lambda images: [np.zeros((4, 6))] * len(images), [image], lambda maps, sources: script[len(maps) // 2]
    )
    assert t == 1 and rounds[1].entropy == 0.0
    assert rounds[1].crops == rounds[1].planned == [(0, 0, 50, 50), (100, 100, 150, 150)]


# ------------------------------------------------------------------------------------------------- ViCrop crop box


def test_crop_box_planted_block_hand_worked():
    # 448 x 448 image, 16 x 16 grid: 28 px blocks. A 4 x 4 block of attention at rows/cols 6-9.
    # Ratio 1: 224 px = 8 blocks. Windows holding the whole block: x, y in 2..6; the first found (x outer, y inner) is
    # (2, 2), sum 16. Neighbours: left (x = 1, cols 1-8) 12, right 16, up 12, down 16 -> mean 14, sharpness 2/64.
    # Ratio 1.2: 268.8 px = int(9.6) = 9 blocks; first max (1, 1), neighbours 12, 16, 12, 16 -> 2/81 < 2/64, and the
    # larger ratios are flatter still (ratio 2 covers the whole grid and is skipped). Ratio 1 wins:
    # cx = int(2 * 28 + 28 * 8 / 2) = 168 = cy, half = 112 -> (56, 56, 280, 280).
    att = np.zeros((16, 16))
    att[6:10, 6:10] = 1.0
    assert vicrop.crop_box(att, (448, 448)) == (56, 56, 280, 280)


def test_crop_box_clamps_the_centre_at_the_image_edge():
    # 560 x 280 image, 10 x 20 grid (28 px blocks), one hot cell in the top-right corner (row 0, col 19).
    # Ratio 1 (8 x 8 blocks): the only window holding it is (x, y) = (12, 0); neighbours left (11, 0) and down (12, 1)
    # hold 0 -> sharpness 1/64, the best (ratio 1.2: 1/81; ratio 1.4: an 11 x 10 window, 1/110; ...).
    # cx = int(12 * 28 + 112) = 448, cy = int(0 + 112) = 112; clamped to [112, 448] and [112, 168]: unchanged.
    att = np.zeros((10, 20))
    att[0, 19] = 1.0
    assert vicrop.crop_box(att, (560, 280)) == (336, 0, 560, 224)
    # Bottom-left corner: window (0, 2) for ratio 1 -> cx = 112, cy = int(2 * 28 + 112) = 168 -> (0, 56, 224, 280).
    att = np.zeros((10, 20))
    att[9, 0] = 1.0
    assert vicrop.crop_box(att, (560, 280)) == (0, 56, 224, 280)


def test_crop_box_ties_between_separated_windows_go_to_the_first_in_x_then_y():
    # 448 x 448 image, 16 x 16 grid (28 px blocks), one hot cell in the bottom-left corner (row 15, col 0) and one in
    # the top-right corner (row 0, col 15). Ratio 1 (8 x 8 blocks): the only windows holding them are (x, y) = (0, 8)
    # and (8, 0), both of sum 1. The release scans x in the outer loop, so (0, 8) is the first maximum (scanning y
    # first would find (8, 0)). Its neighbours right (1, 8) and up (0, 7) hold 0: sharpness 1/64; ratio 1.2 (9
    # blocks) gives 1/81, larger ratios less, ratio 2 covers the grid. cx = int(0 + 28 * 8 / 2) = 112,
    # cy = int(8 * 28 + 112) = 336, half 112: (0, 224, 224, 448), the bottom-left quarter.
    att = np.zeros((16, 16))
    att[15, 0] = att[0, 15] = 1.0
    assert vicrop.crop_box(att, (448, 448)) == (0, 224, 224, 448)


def test_crop_box_whole_image_when_ratio_1_covers_the_grid():
    # 200 x 200 px, 7 x 7 grid: a block is 28.57 px and 224 px is int(7.84) = 7 blocks, the whole grid.
    assert vicrop.crop_box(np.random.default_rng(0).random((7, 7)), (200, 200)) == (0, 0, 200, 200)
    with pytest.raises(ValueError, match="box_size"):
        vicrop.crop_box(np.ones((4, 4)), (100, 100), box_size=0)


def _reference_crop_box(att: np.ndarray, size: tuple[int, int], box_size: int = 224) -> tuple[int, int, int, int]:
    """A literal loop transcription of the adaptive rule in the issue (independent of klal's vectorised one)."""
    gh, gw = att.shape
    bw, bh = size[0] / gw, size[1] / gh
    best = None
    for r in (1, 1.2, 1.4, 1.6, 1.8, 2):
        nx, ny = min(int(box_size * r / bw), gw), min(int(box_size * r / bh), gh)
        if gw - nx < 1 and gh - ny < 1:
            if r == 1:
                return 0, 0, size[0], size[1]
            continue
        sums = np.zeros((gh - ny + 1, gw - nx + 1))
        top, pos = -np.inf, (0, 0)
        for x in range(gw - nx + 1):
            for y in range(gh - ny + 1):
                sums[y, x] = att[y : y + ny, x : x + nx].sum()
                if sums[y, x] > top:
                    top, pos = sums[y, x], (x, y)
        x, y = pos
        adj = [sums[y, x + d] for d in (-1, 1) if 0 <= x + d < sums.shape[1]]
        adj += [sums[y + d, x] for d in (-1, 1) if 0 <= y + d < sums.shape[0]]
        sharp = (top - np.mean(adj)) / (nx * ny)
        if best is None or sharp > best[0]:
            best = (sharp, r, x, y, nx, ny)
    _, r, x, y, nx, ny = best
    half = (box_size * r) // 2
    cx = min(max(int(x * bw + bw * nx / 2), half), size[0] - half)
    cy = min(max(int(y * bh + bh * ny / 2), half), size[1] - half)
    return int(max(0, cx - half)), int(max(0, cy - half)), int(min(size[0], cx + half)), int(min(size[1], cy + half))


@pytest.mark.parametrize(("grid", "size"), [((16, 16), (448, 448)), ((12, 20), (1000, 600)), ((24, 18), (640, 853))])
def test_crop_box_matches_a_loop_reference(grid, size):
    rng = np.random.default_rng(sum(grid))
    for _ in range(5):
        att = rng.gamma(0.5, size=grid)
        assert vicrop.crop_box(att, size) == _reference_crop_box(att, size)
    flat = np.ones(grid)  # every window ties: the scan order alone decides
    assert vicrop.crop_box(flat, size) == _reference_crop_box(flat, size)


# ------------------------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def gm():
    from klal.models.loader import ModelConfig, load_model_and_processor
    from klal.session import GroundingModel

    return GroundingModel(*load_model_and_processor(ModelConfig(max_pixels=224 * 224)))


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_a_zoomed_crop_gets_the_original_token_budget(gm):
    from klal.grounding.crop import crop_image

    image = _noise(224, 224)
    original = gm.inputs([image], "q")["grids"][0]
    assert original == (8, 8)
    # A 112 x 112 crop encoded as it is keeps 4 x 4 = 16 visual tokens (the bug: no extra detail at all) ...
    assert gm.inputs([crop_image(image, (56, 56, 168, 168))], "q")["grids"][0] == (4, 4)
    # ... zoomed to the original's area it gets the original's 64.
    assert gm.inputs([crop_image(image, (56, 56, 168, 168), zoom=True)], "q")["grids"][0] == original


def test_egg_end_to_end_follows_the_authors_loop(gm, monkeypatch):
    from klal.grounding.crop import whole_pixel_box
    from klal.grounding.registry import build_method

    row = {"id": "egg-1", "image": _noise(224, 168, 1), "question": "Which cell contains the red star?"}
    token_counts: list[list[int]] = []
    real_inputs = gm.inputs

    def spy(images, question):
        out = real_inputs(images, question)
        token_counts.append([h * w for h, w in out["grids"]])
        return out

    monkeypatch.setattr(gm, "inputs", spy)
    res = build_method("entropy_gradient", max_new_tokens=2).run(gm, row)
    rounds, t = res.extras["rounds"], res.extras["returned_round"]
    # The random tiny model's relevance has no cell above twice its mean: H_0 = inf, above the release's starting
    # 1000, so round 0 is returned after one relevance pass, and the answer sees the crops planned from its map.
    assert [r["stop_entropy"] for r in rounds] == [None] and t == 0
    assert res.passes["backward"] == 1
    assert rounds[0]["planned"] == [list(map(float, whole_pixel_box(row["image"], b))) for b in rounds[0]["boxes"]]
    assert res.extras["crop_boxes"] == rounds[0]["planned"] != []
    assert res.boxes == [tuple(b) for b in rounds[0]["boxes"]]
    # Every crop the answer saw carried about the original's 48 tokens, not the handful its own pixels would give.
    original = token_counts[0][0]
    assert len(token_counts) == 2 and len(token_counts[-1]) == 1 + len(res.extras["crop_boxes"])
    assert all(0.7 * original <= n <= 1.3 * original for n in token_counts[-1][1:])

    # answer_crops="returned": the returned round's own input crops, none for round 0.
    res = build_method("entropy_gradient", answer_crops="returned", max_new_tokens=2).run(gm, row)
    assert res.extras["returned_round"] == 0 and res.extras["crop_boxes"] == []


def _scripted_egg(gm, monkeypatch, maps: list[np.ndarray], **options) -> tuple[dict, list[list[tuple[int, int]]]]:
    """EGG on a 224 x 224 image whose relevance in round t is ``maps[t]`` on image 0 and zero on every crop (8 x 8
    grids: 28 px cells), with sigma 0 so the regions are the cells themselves. Returns the result's extras and the
    image sizes of every prompt built (the answer's last)."""
    from klal.grounding.registry import build_method

    calls: list[int] = []

    def relevance(_gm, images, _question):
        calls.append(len(images))
        return [maps[len(calls) - 1]] + [np.zeros((8, 8))] * (len(images) - 1), 1.0

    prompts: list[list[tuple[int, int]]] = []
    real_inputs = gm.inputs
    monkeypatch.setattr(egg, "entropy_relevance", relevance)
    monkeypatch.setattr(
        gm, "inputs", lambda images, q: prompts.append([im.size for im in images]) or real_inputs(images, q)
    )
    row = {"id": "scripted", "image": _noise(224, 224, 4), "question": "Where is the star?"}
    res = build_method("entropy_gradient", sigma=0.0, max_new_tokens=1, **options).run(gm, row)
    assert len(calls) == res.extras["returned_round"] + 1  # one relevance pass per round run
    return res.extras, prompts


def _peaks(*cells: tuple[int, int, float]) -> np.ndarray:
    grid = np.zeros((8, 8))
    for r, c, v in cells:
        grid[r, c] = v
    return grid


def test_egg_answers_with_the_crops_planned_from_the_returned_rounds_map(gm, monkeypatch):
    # Round 0: 2.0 at (1, 1) and 1.0 at (6, 6) on zeros. The elbow of the 64 values is 0 (ascending 62 zeros, 1, 2;
    # chord to (63, 2): distance ~ |2x - 63y| is 122 at the last zero, 61 at the 1), so the two cells are the regions,
    # ranked by mass: boxes (28, 28, 56, 56) and (168, 168, 196, 196). Stopping: mean 3/64, B = 2 - 6/64 = 122/64 and
    # 1 - 6/64 = 58/64, two components: p = 61/90 and 29/90, H_0 = 0.6285 (< 1000: go on).
    # Round 1 (the original and those two crops): 1.0 at (0, 7), (3, 3) and (7, 0) of the original, zeros on the
    # crops: three equal components, H_1 = ln 3 = 1.0986 > H_0, so round 1 is returned. Its map plans the first two
    # regions in raster order (equal masses): (196, 0, 224, 28) and (84, 84, 112, 112).
    h0 = -(61 / 90 * math.log(61 / 90) + 29 / 90 * math.log(29 / 90))
    maps = [_peaks((1, 1, 2.0), (6, 6, 1.0)), _peaks((0, 7, 1.0), (3, 3, 1.0), (7, 0, 1.0))]
    extras, prompts = _scripted_egg(gm, monkeypatch, maps)
    rounds = extras["rounds"]
    assert [r["stop_entropy"] for r in rounds] == pytest.approx([h0, math.log(3)], rel=1e-12)
    assert extras["returned_round"] == 1
    assert rounds[1]["crops"] == [[28, 28, 56, 56], [168, 168, 196, 196]]
    assert extras["crop_boxes"] == rounds[1]["planned"] == [[196, 0, 224, 28], [84, 84, 112, 112]]
    # The answer's prompt: the original and those two crops, each 28 x 28 px zoomed to the original's 224 x 224.
    assert prompts[-1] == [(224, 224)] * 3
    # answer_crops="returned": round 1's own input crops, one round behind.
    extras, _ = _scripted_egg(gm, monkeypatch, maps, answer_crops="returned")
    assert extras["crop_boxes"] == [[28, 28, 56, 56], [168, 168, 196, 196]]


def test_egg_answers_with_round_0s_planned_crop_when_h0_is_0(gm, monkeypatch):
    # One peak at (2, 5): one region (box (140, 56, 168, 84)) and one component, so H_0 = -1 log 1 = 0: round 0 is
    # returned at once, and the release still answers with the crop planned from its map.
    extras, prompts = _scripted_egg(gm, monkeypatch, [_peaks((2, 5, 1.0))])
    assert extras["returned_round"] == 0 and extras["rounds"][0]["stop_entropy"] == 0.0
    assert extras["crop_boxes"] == [[140, 56, 168, 84]] and prompts[-1] == [(224, 224)] * 2
    extras, prompts = _scripted_egg(gm, monkeypatch, [_peaks((2, 5, 1.0))], answer_crops="returned")
    assert extras["crop_boxes"] == [] and prompts[-1] == [(224, 224)]


def test_egg_a_returned_round_without_regions_answers_with_its_own_crops(gm, monkeypatch):
    # Round 0 as in the rising case (H_0 = 0.6285, crops (28, 28, 56, 56) and (168, 168, 196, 196)); round 1's maps
    # are all zero: no region anywhere, H_1 = 0 stops, and its input crops stay the answer's (refine_big's "no boxes"
    # return keeps its input).
    maps = [_peaks((1, 1, 2.0), (6, 6, 1.0)), np.zeros((8, 8))]
    extras, _ = _scripted_egg(gm, monkeypatch, maps)
    assert extras["returned_round"] == 1 and extras["rounds"][1]["stop_entropy"] == 0.0
    assert extras["crop_boxes"] == extras["rounds"][1]["crops"] == [[28, 28, 56, 56], [168, 168, 196, 196]]


def test_vicrop_rel_att_uses_raw_attention_and_the_answer_suffix(gm, monkeypatch):
    from klal.grounding.base import GENERIC_PROMPT
    from klal.grounding.registry import build_method

    image = _noise(224, 168, 2)
    row = {"id": "vicrop-1", "image": image, "question": "Which cell contains the red star?"}
    method = build_method("vicrop_rel_att", box_size=56, max_new_tokens=2)
    layer, source = method.layer_index(gm, row["id"])
    assert (layer, source) == (2, "relative_depth")  # the tiny model is no checkpoint the authors name
    suffix = " Answer the question using a single word or phrase."
    q, g = gm.inputs([image], row["question"] + suffix), gm.inputs([image], GENERIC_PROMPT + suffix)

    # Raw = each head's attention over the image tokens as it is (summing to the head's S_img), here taken from the
    # localization-heads statistics pass: its per-head raw maps at that layer, head-meaned.
    def raw(inputs_question: str) -> np.ndarray:
        _, maps = loc_heads.head_statistics(gm, {"id": "x", "image": image, "question": inputs_question})
        return maps[layer].mean(axis=0).ravel()

    expected = raw(row["question"] + suffix) / raw(GENERIC_PROMPT + suffix)  # the authors' plain ratio
    got = method.relevance(gm, [image], q, layer).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # ... which is not the renormalised ratio klal used before (each head's map divided by its own S_img).
    renorm = build_method("vicrop_rel_att", attention="renormalised").relevance(gm, [image], q, layer).numpy()
    assert not np.allclose(got, renorm, rtol=1e-3)
    assert vicrop.raw_attention(gm, g, layer).numpy() == pytest.approx(raw(GENERIC_PROMPT + suffix), rel=1e-5)

    # Every prompt the method builds ends with the suffix: the question, the generic prompt, the answer.
    asked: list[str] = []
    real_inputs = gm.inputs
    monkeypatch.setattr(gm, "inputs", lambda images, question: asked.append(question) or real_inputs(images, question))
    res = method.run(gm, row)
    assert asked == [row["question"] + suffix, GENERIC_PROMPT + suffix, row["question"] + suffix]
    # The crop is the adaptive box of the relevance map (box_size 56 on this 224 x 168 image).
    (box,) = res.boxes
    assert box == tuple(float(v) for v in vicrop.crop_box(res.maps[0], image.size, 56))
    assert res.extras["layer"] == 2 and res.extras["layer_source"] == "relative_depth"


def test_vicrop_answers_with_the_crop_at_its_own_size(monkeypatch):
    from klal.geometry import DEFAULT_MAX_PIXELS
    from klal.grounding.crop import crop_image
    from klal.grounding.registry import build_method
    from klal.models.loader import ModelConfig, load_model_and_processor
    from klal.session import GroundingModel

    # The authors' Qwen path builds its processor with max_pixels = 256 * 28 * 28 = 200704 = 448 * 448, klal's
    # default bound too: with it a 224 px crop is (224 / 28)^2 = 64 visual tokens, and upscaled to a 448 px
    # original's area it would be (448 / 28)^2 = 256.
    assert DEFAULT_MAX_PIXELS == 256 * 28 * 28
    gm448 = GroundingModel(*load_model_and_processor(ModelConfig()))
    image = _noise(448, 448, 5)
    assert gm448.inputs([crop_image(image, (112, 112, 336, 336))], "q")["grids"] == [(8, 8)]
    assert gm448.inputs([crop_image(image, (112, 112, 336, 336), zoom=True)], "q")["grids"] == [(16, 16)]

    # By default the answer's prompt carries the crop exactly as the box cuts it (the release: image.crop(bbox)).
    sizes: list[list[tuple[int, int]]] = []
    real_inputs = gm448.inputs
    monkeypatch.setattr(
        gm448, "inputs", lambda images, q: sizes.append([im.size for im in images]) or real_inputs(images, q)
    )
    row = {"id": "vicrop-448", "image": image, "question": "Which cell contains the red star?"}
    res = build_method("vicrop_rel_att", max_new_tokens=1).run(gm448, row)
    x0, y0, x1, y1 = res.boxes[0]
    side = x1 - x0
    # One of the ratios 1, 1.2, ..., 1.8 of 224 px (ratio 2 covers the 16 x 16 grid and is skipped), inside the image.
    assert side == y1 - y0 and side in (224, 268, 312, 358, 402)
    assert sizes[-1] == [(448, 448), (side, side)] and res.extras["crop_size"] == [side, side]
    # zoom=True (klal's earlier default) upscales the same crop to the original's 448 x 448.
    res = build_method("vicrop_rel_att", max_new_tokens=1, zoom=True).run(gm448, row)
    assert res.boxes[0] == (x0, y0, x1, y1) and sizes[-1] == [(448, 448), (448, 448)]
