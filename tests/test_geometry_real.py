"""Target maps at the geometry of each family's smallest real checkpoint, against a reference derived without klal's
mapping.

Real-geometry replicas: each family's processor (and, for LLaVA-OneVision, the model's feature packing) with the
public config facts of its smallest checkpoint, at tiny widths:

* Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct: 14-px patches, merge 2, ``min_pixels`` 3136, ``max_pixels``
  12845056 (their ``preprocessor_config.json``);
* Qwen3-VL-2B-Instruct, Qwen3.5 (e.g. Qwen3.5-9B-Base): 16-px patches, merge 2, ``shortest_edge`` 65536,
  ``longest_edge`` 16777216;
* llava-onevision-qwen2-0.5b-ov-hf: 384-px SigLIP, 14-px patches (27 x 27 covering 378 px), the 36
  ``image_grid_pinpoints`` 384..2304 x 384..2304 (tilings up to 6 x 6), ``vision_feature_select_strategy`` full,
  ``anyres_max_9``, 729 base tokens.

The reference footprint of every visual token comes from transformers' own functions and the model's own placement,
never from klal's geometry: Qwen from ``smart_resize`` and the processor's patch order (decoded from pixel values
that encode their own coordinates); LLaVA-OneVision from ``select_best_resolution``, ``get_patch_output_size``, the
processor's padding and ``divide_to_patches`` (each tile's canvas position), and the model's ``pack_image_features``
run on features that one-hot encode each patch's row and column, read back after unpadding and pooling (row ends
found where the packed feature is ``image_newline``). Box targets (area mode) are then the box area inside each
token's footprint, weighted, with the family's policy of an equal share per grid; klal's maps must match to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klal.data.targets import grid_target_maps
from klal.geometry import Footprint
from klal.models.family import family_for_type

# (width, height) of the test images: odd sizes, long thin ones, and 2304 x 2304 for LLaVA's largest (6 x 6) tiling.
SIZES = [(350, 220), (200, 330), (640, 480), (500, 333), (1000, 300), (57, 1000), (1000, 57), (700, 57), (2304, 2304)]


def _box(w: int, h: int) -> list[float]:
    """The evidence box of an image: a corner box on 1000 x 300 (the issue's case), else an off-centre box."""
    if (w, h) == (1000, 300):
        return [0.0, 0.0, 130.0, 70.0]
    return [0.23 * w, 0.31 * h, 0.61 * w, 0.77 * h]


def _cover(lo: np.ndarray, hi: np.ndarray, a: float, b: float) -> np.ndarray:
    """Length of ``[a, b]`` inside each interval ``[lo, hi]``."""
    return np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None)


def _klal_vector(family, processor, w: int, h: int, box: list[float], uniform: bool = False) -> np.ndarray:
    """klal's target over the image's cells in sequence order (``uniform``: the old equal-cell geometry)."""
    grids = family.processor_grids(processor, h, w)
    fps = family.footprints(processor, h, w, grids)
    if uniform:
        fps = [None if f is None else Footprint.uniform((h, w), f.shape) for f in fps]
    maps, _ = grid_target_maps({"boxes": [box]}, (h, w), fps)
    return np.concatenate([m.reshape(-1) for m in maps if m is not None])


# -- Qwen families ---------------------------------------------------------------------------------------------------

QWEN_REAL = {
    "qwen2_vl": (14, 3136, 12845056),
    "qwen2_5_vl": (14, 3136, 12845056),
    "qwen3_vl": (16, 65536, 16777216),
    "qwen3_5": (16, 65536, 16777216),
}
"""model type -> (patch size, min pixels, max pixels) of its smallest real checkpoint; merge size 2 on all."""


@pytest.fixture(scope="module", params=sorted(QWEN_REAL))
def qwen_real(request):
    family = family_for_type(request.param)
    patch, lo, hi = QWEN_REAL[request.param]
    processor = family.build_tiny_processor(lo, hi)
    ip = processor.image_processor
    assert (ip.patch_size, ip.merge_size) == (patch, 2), "the family's processor is not at the real patch geometry"
    return family, processor


def _qwen_token_pixels(processor, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """Per visual token (in the model's order), the resized-image pixel coordinates its patches hold, decoded from
    an image that encodes each pixel's own (x, y) in its colours; and the processor's (rows, cols) of tokens."""
    enc = processor.image_processor(images=[image], return_tensors="pt")
    ip = processor.image_processor
    t, gh, gw = (int(v) for v in enc["image_grid_thw"][0])
    pv = enc["pixel_values"].double()  # (t*gh*gw, 3 * temporal * p * p), channels first within each patch
    p, tp = ip.patch_size, ip.temporal_patch_size
    mean, std = torch.tensor(ip.image_mean, dtype=torch.float64), torch.tensor(ip.image_std, dtype=torch.float64)
    px = pv.view(-1, 3, tp, p, p)[:, :, 0] * std[None, :, None, None] + mean[None, :, None, None]
    vals = torch.round(px * 255).long()  # (patches, 3, p, p)
    x = vals[:, 0] + 256 * (vals[:, 2] % 16)
    y = vals[:, 1] + 256 * (vals[:, 2] // 16)
    merge = ip.merge_size
    per_token = torch.stack([x, y], -1).view(-1, merge * merge * p * p, 2)  # merge^2 consecutive patches per token
    return per_token.numpy(), (gh // merge, gw // merge)


def test_qwen_token_placement_is_row_major_blocks_of_the_resized_image(qwen_real):
    """At a size smart_resize keeps, each token holds exactly the ``T x T`` block (row-major) klal's equal cells say."""
    family, processor = qwen_real
    ip = processor.image_processor
    side = ip.patch_size * ip.merge_size
    w, h = 12 * side, 9 * side
    if w * h < ip.size["shortest_edge"]:
        w, h = 24 * side, 18 * side
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx % 256, yy % 256, (xx // 256) + 16 * (yy // 256)], -1).astype(np.uint8)
    pixels, (rows, cols) = _qwen_token_pixels(processor, Image.fromarray(rgb))
    assert (rows, cols) == (h // side, w // side)
    fp = family.footprints(processor, h, w)[0]
    boxes = fp.boxes()  # klal's footprint of each token in original pixels
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        x0, y0, x1, y1 = boxes[i, j]
        got = pixels[k]
        assert (
            got[:, 0].min() == x0 and got[:, 0].max() + 1 == x1 and got[:, 1].min() == y0 and got[:, 1].max() + 1 == y1
        )


@pytest.mark.parametrize("size", SIZES[:-1])  # 2304 x 2304 is LLaVA's largest tiling; Qwen has no tiling
def test_qwen_target_maps_match_the_reference_at_real_geometry(qwen_real, size):
    family, processor = qwen_real
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    w, h = size
    ip = processor.image_processor
    side = ip.patch_size * ip.merge_size
    rh, rw = smart_resize(h, w, factor=side, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    enc = processor.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")
    assert [int(v) for v in enc["image_grid_thw"][0][1:]] == [rh // ip.patch_size, rw // ip.patch_size]
    # Token (i, j) holds resized pixels [j T, (j + 1) T) x [i T, (i + 1) T) (row-major, as the placement test shows);
    # the resize maps the whole original onto the whole resized image.
    ky, kx = np.arange(rh // side), np.arange(rw // side)
    box = _box(w, h)
    my = _cover(ky * side * h / rh, (ky + 1) * side * h / rh, box[1], box[3])
    mx = _cover(kx * side * w / rw, (kx + 1) * side * w / rw, box[0], box[2])
    ref = np.outer(my, mx).reshape(-1)
    ref /= ref.sum()
    got = _klal_vector(family, processor, w, h, box)
    assert np.abs(got - ref).max() <= 1e-6


# -- LLaVA-OneVision -------------------------------------------------------------------------------------------------

LLAVA_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
"""llava-onevision-qwen2-0.5b-ov-hf's ``image_grid_pinpoints``."""


@pytest.fixture(scope="module")
def llava_real():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from klal.models.llava_onevision import TINY_CHAT_TEMPLATE, _processor_class, tiny_tokenizer

    family = family_for_type("llava_onevision")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=LLAVA_PINPOINTS)
    tok = tiny_tokenizer()
    processor = family.mark(
        _processor_class()(
            ip,
            tok,
            chat_template=TINY_CHAT_TEMPLATE,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    )
    cfg = family.tiny_config(tok, vision_image_size=384, vision_patch_size=14)
    cfg.image_grid_pinpoints = LLAVA_PINPOINTS
    model = family.build_tiny_model(cfg)
    family.check_pair(model, processor, "llava-onevision-0.5b replica")
    return family, processor, model


def _llava_reference(processor, model, w: int, h: int):
    """Per image token in sequence order: None for a row end, else ``(wy, wx)`` weights over the reference source
    intervals ``(ys, xs)`` (original pixels, base view's then tiles'), and whether it is a base token."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_transforms import divide_to_patches
    from transformers.image_utils import ChannelDimension

    ip = processor.image_processor
    s, patch = 384, 14
    p = s // patch
    # Base view: the image squashed to s x s; patch k sees squashed pixels [k P, (k + 1) P).
    k = np.arange(p)
    base_y = np.stack([k * patch * h / s, (k + 1) * patch * h / s], 1)
    base_x = np.stack([k * patch * w / s, (k + 1) * patch * w / s], 1)
    # Tiles: the processor's resize, padding and tiling of a canvas that holds its own coordinates.
    best = select_best_resolution((h, w), LLAVA_PINPOINTS)
    new_h, new_w = get_patch_output_size(np.zeros((1, h, w)), best, input_data_format=ChannelDimension.FIRST)
    (pad_y, _), (pad_x, _) = ip._get_padding_size((new_h, new_w), best)
    cy, cx = np.mgrid[0 : best[0], 0 : best[1]]
    tiles = divide_to_patches(np.stack([cy, cx]).astype(np.float64), patch_size=s)
    row_ids, col_ids = {}, {}
    tile_rows, tile_cols = [], []  # per tile, per patch row / column: its canvas start
    for t in tiles:
        tile_rows.append([int(t[0, i * patch, 0]) for i in range(p)])
        tile_cols.append([int(t[1, 0, j * patch]) for j in range(p)])
        for v in tile_rows[-1]:
            row_ids.setdefault(v, len(row_ids))
        for v in tile_cols[-1]:
            col_ids.setdefault(v, len(col_ids))

    def to_orig(starts: dict, paste: int, size: int, resized: int) -> np.ndarray:
        c = np.array(sorted(starts, key=starts.get), dtype=np.float64)
        lo = np.clip((c - paste) * size / resized, 0, size)
        hi = np.clip((c + patch - paste) * size / resized, 0, size)
        return np.stack([lo, hi], 1)

    tile_y = to_orig(row_ids, pad_y, h, new_h)
    tile_x = to_orig(col_ids, pad_x, w, new_w)
    ny, nx = len(row_ids), len(col_ids)
    # Features: one-hot base row | base col | tile row | tile col | newline flag.
    n_ch = 2 * p + ny + nx + 1
    feats = torch.zeros(1 + len(tiles), p * p, n_ch, dtype=torch.float64)
    for i in range(p):
        for j in range(p):
            feats[0, i * p + j, i] = 1
            feats[0, i * p + j, p + j] = 1
    for n, (rs, cs) in enumerate(zip(tile_rows, tile_cols)):
        for i in range(p):
            for j in range(p):
                feats[1 + n, i * p + j, 2 * p + row_ids[rs[i]]] = 1
                feats[1 + n, i * p + j, 2 * p + ny + col_ids[cs[j]]] = 1
    newline = torch.zeros(n_ch, dtype=torch.float64)
    newline[-1] = 1
    packed, _ = model.model.pack_image_features(
        [feats], torch.tensor([[h, w]]), image_newline=newline, vision_aspect_ratio=model.config.vision_aspect_ratio
    )
    ys, xs = np.concatenate([base_y, tile_y]), np.concatenate([base_x, tile_x])
    out = []
    for v in packed[0].numpy():
        if np.array_equal(v, newline.numpy()):
            out.append(None)
            continue
        wy = (
            np.concatenate([v[:p], np.zeros(ny)])
            if v[:p].any()
            else np.concatenate([np.zeros(p), v[2 * p : 2 * p + ny]])
        )
        wx = (
            np.concatenate([v[p : 2 * p], np.zeros(nx)])
            if v[p : 2 * p].any()
            else np.concatenate([np.zeros(p), v[2 * p + ny : 2 * p + ny + nx]])
        )
        out.append((wy, wx, bool(v[:p].any())))
    return out, ys, xs


def _llava_reference_target(ref, ys, xs, box) -> tuple[np.ndarray, np.ndarray]:
    """The reference target over the image's cells (sequence order) and the cell mask over its image tokens."""
    tokens, _, _ = ref, ys, xs
    my = _cover(ys[:, 0], ys[:, 1], box[1], box[3])
    mx = _cover(xs[:, 0], xs[:, 1], box[0], box[2])
    cells = [t for t in tokens if t is not None]
    mass = np.array([(wy @ my) * (wx @ mx) for wy, wx, _ in cells])
    is_base = np.array([b for _, _, b in cells])
    # The family's policy: each grid the evidence leaves mass on gets an equal share of the image's mass.
    groups = [g for g in (is_base, ~is_base) if mass[g].sum() > 0]
    out = np.zeros(len(cells))
    for g in groups:
        out[g] = mass[g] / mass[g].sum() / len(groups)
    return out, np.array([t is not None for t in tokens])


@pytest.mark.parametrize("size", SIZES)
def test_llava_onevision_target_maps_match_the_reference_at_real_geometry(llava_real, size):
    family, processor, model = llava_real
    w, h = size
    enc = processor(text=["<image>\n"], images=[Image.new("RGB", (w, h))], return_tensors="pt")
    n_image_tokens = int((enc["input_ids"][0] == processor.image_token_id).sum())
    ref, ys, xs = _llava_reference(processor, model, w, h)
    assert len(ref) == n_image_tokens  # the processor's token count is the model's packed length
    box = _box(w, h)
    want, is_cell = _llava_reference_target(ref, ys, xs, box)
    # klal's cells among the image tokens (its row ends where the model put image_newline).
    grids = family.processor_grids(processor, h, w)
    mask = family.visual_token_mask(enc["input_ids"], processor.image_token_id, [[grids]])[0]
    assert torch.equal(mask[enc["input_ids"][0] == processor.image_token_id], torch.from_numpy(is_cell))
    got = _klal_vector(family, processor, w, h, box)
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("size", [(1000, 57), (700, 57), (57, 1000)])
def test_llava_onevision_long_thin_images_train_at_real_geometry(llava_real, size):
    """Where transformers' processor and forward pass work on a long thin image, the collator and the model do too,
    and every image token klal calls a cell is one the model filled with a patch feature."""
    from klal.data.collate import KLALCollator

    family, processor, model = llava_real
    w, h = size
    row = {
        "id": "thin",
        "image": Image.new("RGB", (w, h)),
        "question": "Where?",
        "answer": "here",
        "evidence": {"boxes": [[0, 0, w / 3, h / 2]]},
    }
    batch = KLALCollator(processor)([row])
    assert bool(batch["has_target"][0]) and abs(float(batch["target"].sum()) - 1) < 1e-6
    with torch.no_grad():
        out = model(**{k: batch[k] for k in family.input_keys})
    assert torch.isfinite(out.logits).all()


# -- the footprint machinery on its own ------------------------------------------------------------------------------


def _explicit(fp: Footprint) -> Footprint:
    """The same equal cells as explicit intervals, so the general (measured) code path computes them."""
    from klal.geometry import AxisCells

    def axis(a: AxisCells) -> AxisCells:
        k = np.arange(a.count, dtype=np.float64)
        return AxisCells(a.count, a.size, lo=k * a.size / a.count, hi=(k + 1) * a.size / a.count)

    return Footprint(fp.height, fp.width, axis(fp.y), axis(fp.x))


EVIDENCE = {
    "boxes": [[13.0, 40.5, 170.0, 99.0], [300.0, 10.0, 333.0, 200.0]],
    "points": [[55.0, 12.0], [339.9, 219.0]],
    "polylines": [[[2.0, 3.0], [200.0, 150.0], [349.0, 60.0]], [[0.0, 110.0], [350.0, 110.0]]],
}


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"box_mode": "gaussian", "point_mode": "nearest", "polyline_thickness": 2.5},
        {"box_mode": "centerline", "point_sigma": 0.3, "polyline_thickness": 0.4, "combine": "mass"},
    ],
)
def test_measured_footprint_of_equal_cells_gives_the_equal_cell_maps(spec):
    """The general path (explicit source intervals) reproduces the equal-cell maps for every evidence kind."""
    from klal.data.targets import TargetSpec, build_target_map, evidence_cells

    mask = np.zeros((220, 350))
    mask[30:90, 100:180] = 1.0
    mask[150:160, 7:9] = 0.5
    evidence = {**EVIDENCE, "masks": [mask]}
    uniform = Footprint.uniform((220, 350), (8, 13))
    want = build_target_map(evidence, (220, 350), uniform, TargetSpec(**spec))
    got = build_target_map(evidence, (220, 350), _explicit(uniform), TargetSpec(**spec))
    assert np.abs(got - want).max() <= 1e-12
    assert np.array_equal(
        evidence_cells(EVIDENCE, (220, 350), _explicit(uniform)), evidence_cells(EVIDENCE, (220, 350), (8, 13))
    )


def test_polyline_on_unequal_cells_with_gaps_matches_dense_sampling():
    """A thick polyline on unequal cells with unseen margins: each cell's mass is the line integral of the brush
    share inside it (mirrored at the borders), here summed over 200k points along the line."""
    from klal.data.targets import polyline_map
    from klal.geometry import AxisCells

    h, w = 100.0, 160.0
    x = AxisCells(4, w, lo=np.array([0.0, 35.0, 70.0, 118.0]), hi=np.array([33.0, 70.0, 110.0, 160.0]))
    y = AxisCells(3, h, lo=np.array([0.0, 20.0, 61.0]), hi=np.array([18.0, 60.0, 95.0]))
    fp = Footprint(h, w, y, x)
    line = np.array([[5.0, 3.0], [150.0, 80.0], [40.0, 97.0]])
    thickness = 0.7  # tokens: 0.7 * 40 px wide, 0.7 * 33.3 px tall
    got = polyline_map([line.tolist()], (h, w), fp, thickness=thickness)
    # Dense reference, in token units (x * 4 / 160, y * 3 / 100).
    pts = line * np.array([4 / w, 3 / h])
    seg = np.diff(pts, axis=0)
    lengths = np.hypot(*seg.T)
    n = 200_000
    t = (np.arange(n) + 0.5) / n * lengths.sum()
    k = np.minimum(np.searchsorted(np.cumsum(lengths), t, side="right"), len(seg) - 1)
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    p = pts[k] + ((t - start[k]) / lengths[k])[:, None] * seg[k]

    def share(c: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_tok: int) -> np.ndarray:
        half = thickness / 2
        a, b = c[:, None] - half, c[:, None] + half

        def cov(u, v):
            return np.clip(np.minimum(v, hi) - np.maximum(u, lo), 0, None)

        return (cov(a, b) + cov(-b, -a) + cov(2 * n_tok - b, 2 * n_tok - a)) / thickness

    sx = share(p[:, 0], x.lo * 4 / w, x.hi * 4 / w, 4)
    sy = share(p[:, 1], y.lo * 3 / h, y.hi * 3 / h, 3)
    want = (sy.T @ sx) * (lengths.sum() / n) * thickness
    assert np.abs(got - want).max() <= 2e-5 * want.max()


def test_llava_base_tokens_see_378_of_384_px(llava_real):
    """Evidence only in the base view's unseen right margin (the last 6 / 384 of the width) gives base tokens no
    mass; the tile tokens, which see it, get it all."""
    family, processor, _ = llava_real
    w, h = 768, 384
    base, tiles = family.footprints(processor, h, w)
    margin = [w * 378 / 384 + 0.5, 100.0, w - 0.5, 200.0]
    maps, _ = grid_target_maps({"boxes": [margin]}, (h, w), [base, tiles])
    assert maps[0] is None and abs(maps[1].sum() - 1.0) < 1e-12
    assert base.boxes()[0, -1, 2] == pytest.approx(w * 378 / 384)


def test_footprint_cell_pixel_round_trip_and_merge_keep_mass(llava_real):
    from klal.grounding.ops import cells_to_pixels, pixels_to_cells

    family, processor, _ = llava_real
    w, h = 640, 480
    fps = family.footprints(processor, h, w)
    tiles = fps[1]
    rows, cols = tiles.shape
    for box in [(0, 0, 1, 1), (3, 5, 9, 17), (rows - 2, cols - 3, rows, cols)]:
        px = cells_to_pixels(box, tiles, (w, h))
        assert pixels_to_cells(px, tiles, (w, h)) == box
    rng = np.random.default_rng(0)
    base_map, tile_map = rng.random(fps[0].shape), rng.random(tiles.shape)
    merged = family.merge_grids([base_map, tile_map], fps)
    assert merged.shape == tiles.shape
    assert merged.sum() == pytest.approx(base_map.sum() + tile_map.sum())


def test_llava_grounding_metrics_lay_the_evidence_through_the_footprints(llava_real):
    """On the map grid (the tile map) the metrics' evidence cells are the tokens whose reference footprint touches
    the box, and a map equal to the reference tile target scores target KL 0 (the equal-cell geometry does not)."""
    from klal.data.targets import evidence_cells
    from klal.eval.metrics import GroundingMetrics

    family, processor, model = llava_real
    w, h = 1000, 300
    box = _box(w, h)
    ref, ys, xs = _llava_reference(processor, model, w, h)
    my = _cover(ys[:, 0], ys[:, 1], box[1], box[3])
    mx = _cover(xs[:, 0], xs[:, 1], box[0], box[2])
    tile_mass = np.array([(wy @ my) * (wx @ mx) for t in ref if t is not None and not t[2] for wy, wx, _ in [t]])
    rows, cols = family.map_grid(family.processor_grids(processor, h, w))
    want = tile_mass.reshape(rows, cols) / tile_mass.sum()
    fp = family.map_footprint(processor, h, w)
    cells = evidence_cells({"boxes": [box]}, (h, w), fp)
    assert np.array_equal(cells, want > 0)
    record = {"id": "x", "task": "t", "answer": "a", "width": w, "height": h, "evidence": {"boxes": [box]}}
    exact = GroundingMetrics(footprint_of=lambda hh, ww: family.map_footprint(processor, hh, ww))
    equal = GroundingMetrics()
    for m in (exact, equal):
        m.update("m", "t", [want], None, None, record)
    assert exact.compute()["m"]["t"]["target_kl"]["value"] <= 1e-9
    assert equal.compute()["m"]["t"]["target_kl"]["value"] > 1e-3


@pytest.mark.parametrize("size", [(1000, 57), (57, 1000)])
def test_tiny_llava_methods_and_metrics_on_long_thin_images(size):
    """The tiny LLaVA-OneVision's tile map of a long thin image is empty (0 rows or 0 columns; transformers' processor
    and model accept it): a method's map is then the base view, and the metrics score it through its footprint."""
    from klal.eval.metrics import GroundingMetrics
    from klal.grounding.registry import build_method
    from klal.session import GroundingModel

    family = family_for_type("llava_onevision")
    gm = GroundingModel(family.build_tiny_model(), family.build_tiny_processor(3136, 200704))
    w, h = size
    grids = family.processor_grids(gm.processor, h, w)
    assert grids[1][0] * grids[1][1] == 0 and family.map_grid(grids) == grids[0]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    row = {
        "id": "thin",
        "task": "t",
        "image": image,
        "question": "Where?",
        "answer": "a",
        "width": w,
        "height": h,
        "evidence": {"boxes": [[0, 0, w / 2, h / 2]]},
    }
    res = build_method("attention_probe").run(gm, row)
    assert [m.shape for m in res.maps] == [grids[0]]
    metrics = GroundingMetrics(footprint_of=lambda hh, ww: family.map_footprint(gm.processor, hh, ww))
    metrics.update_result("attention_probe", res, row)
    assert metrics.compute()["attention_probe"]["t"]["target_kl"]["count"] == 1
