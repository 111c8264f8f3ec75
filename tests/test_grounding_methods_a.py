"""Localization heads and Entropy-Gradient Grounding: gradients against finite differences, discovery on planted
attention, the map/box and zoom steps on hand-made grids, and end-to-end runs on the tiny model."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import klal.grounding.egg as egg
import klal.grounding.loc_heads as lh
from klal.capture import CaptureRequest
from klal.grounding.base import GroundingError, GroundingModel, build_method

# ----------------------------------------------------------------------------------------------------- fixtures


def _row(task, seed: int, idx: int) -> dict:
    s = task.sample(seed, idx)
    return {
        "id": f"grid_patch-{seed}-{idx}",
        "task": "grid_patch",
        "image": s.image,
        "question": s.question,
        "answer": s.answer,
        "width": s.image.width,
        "height": s.image.height,
        "evidence": s.evidence.to_dict(),
        "meta": "{}",
    }


@pytest.fixture(scope="module")
def tiny():
    from klal.models.loader import ModelConfig, load_model_and_processor

    model, processor = load_model_and_processor(ModelConfig(max_pixels=224 * 224))
    return model, processor


@pytest.fixture(scope="module")
def gm(tiny):
    return GroundingModel(*tiny)


@pytest.fixture(scope="module")
def gm64(tiny):
    model, processor = tiny
    return GroundingModel(copy.deepcopy(model).to(torch.float64), processor)


@pytest.fixture(scope="module")
def rows():
    from data_gen.tasks import build_task

    task = build_task("grid_patch", "easy", {})
    return [_row(task, 0, i) for i in range(5)]


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    for name, mod in model.named_modules():
        if name.endswith("language_model") and hasattr(mod, "layers"):
            return mod
    raise AssertionError("no language model")


def _entropy_with_embeds(gm: GroundingModel, inputs: dict, edit) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token entropy with ``edit(inputs_embeds)`` applied inside the model; returns (H, the embeds used)."""
    holder = {}

    def pre_hook(_module, args, kwargs):
        kwargs["inputs_embeds"] = edit(kwargs["inputs_embeds"])
        holder["emb"] = kwargs["inputs_embeds"]
        return args, kwargs

    handle = _language_model(gm.model).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        logits = gm.forward(inputs)
    finally:
        handle.remove()
    return egg.next_token_entropy(logits), holder["emb"]


# ------------------------------------------------------------------------------------------------- EGG gradient


def test_entropy_gradient_matches_finite_difference(gm64, rows):
    row = rows[0]
    inputs = gm64.inputs([row["image"]], row["question"])

    # The full gradient dH/d(inputs_embeds), taken independently of visual_embeds_grad.
    with torch.enable_grad():
        h, emb = _entropy_with_embeds(gm64, inputs, lambda e: e.detach().requires_grad_(True))
        h.backward()
    grad = emb.grad[0]  # (S, D)
    vis_pos = torch.nonzero(inputs["visual_mask"][0]).squeeze(-1)

    # The entropy itself, recomputed in numpy from the logits.
    with torch.no_grad():
        logits = gm64.forward(inputs)[0, -1].numpy()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert h.item() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-10)

    # EGG's relevance is the per-token norm of that gradient, split per image.
    grids, value = egg.entropy_relevance(gm64, [row["image"]], row["question"])
    assert value == pytest.approx(h.item(), rel=1e-12)
    rel = np.concatenate([g.ravel() for g in grids])
    np.testing.assert_allclose(rel, grad[vis_pos].norm(dim=-1).numpy(), rtol=1e-6)
    assert rel.max() > 0

    # Central differences along a random direction and along the gradient itself, at the most relevant token. The
    # model runs in float64 but its RMSNorm computes in float32, so H carries ~1e-7 noise: eps = 1e-3 (embeddings
    # have norm ~0.2) keeps that noise and the O(eps^2) truncation error both near 1e-3 of the derivative.
    j = int(vis_pos[int(np.argmax(rel))])
    g_j = grad[j]
    eps = 1e-3
    rng = torch.Generator().manual_seed(0)
    rand = torch.randn(g_j.shape, generator=rng, dtype=torch.float64)
    for u in (rand / rand.norm(), g_j / g_j.norm()):

        def shift(sign: float, u=u):
            def edit(e):
                e = e.clone()
                e[0, j] += sign * eps * u.to(e.dtype)
                return e

            return edit

        with torch.no_grad():
            h_plus, _ = _entropy_with_embeds(gm64, inputs, shift(+1.0))
            h_minus, _ = _entropy_with_embeds(gm64, inputs, shift(-1.0))
        fd = float(h_plus - h_minus) / (2 * eps)
        assert fd == pytest.approx(float(g_j @ u), rel=1e-2)
    # Along the gradient the directional derivative is the token's relevance.
    assert fd == pytest.approx(float(rel.max()), rel=1e-2)


# ----------------------------------------------------------------------------------------- planted head discovery

L, H, GH, GW = 3, 4, 4, 4
N_TEXT_BEFORE, N_TEXT_AFTER = 4, 3
TARGET, DISTRACTOR, SHARP_LIGHT = (1, 2), (2, 0), (0, 3)


class FakeGM:
    """Stands in for GroundingModel: every forward 'captures' planted full attention rows."""

    def __init__(self, s_img: list[np.ndarray], maps: list[np.ndarray], name: str = "fake/model", layers: int = L):
        self.s_img, self.maps = s_img, maps
        self.num_layers, self.num_heads = layers, H
        self.model = type("M", (), {"config": type("C", (), {"_name_or_path": name})()})()
        self.passes = {"forward": 0, "backward": 0}
        self.calls = 0

    def inputs(self, images, question):
        v = GH * GW
        ids = torch.zeros(1, N_TEXT_BEFORE + v + N_TEXT_AFTER, dtype=torch.long)
        vis = torch.zeros_like(ids, dtype=torch.bool)
        vis[0, N_TEXT_BEFORE : N_TEXT_BEFORE + v] = True
        return {"input_ids": ids, "visual_mask": vis, "grids": [(GH, GW)], "image_sizes": [images[0].size]}

    def request(self, inputs, query_pos=None, layers=None, per_head=True, differentiable_rows=False):
        s = inputs["input_ids"].shape[1]
        q = torch.zeros(1, s, dtype=torch.bool)
        q[0, -1] = True
        return CaptureRequest.from_masks(q, inputs["visual_mask"], layers)

    def forward(self, inputs, request):
        i = self.calls
        self.calls += 1
        self.passes["forward"] += 1
        s = inputs["input_ids"].shape[1]
        n_text = s - GH * GW
        for layer in range(self.num_layers):
            rows = torch.zeros(H, s, dtype=torch.float64)
            for head in range(H):
                mass = self.s_img[i][layer, head]
                rows[head, N_TEXT_BEFORE : N_TEXT_BEFORE + GH * GW] = torch.from_numpy(
                    mass * self.maps[i][layer, head].ravel()
                )
                text = torch.ones(s, dtype=torch.bool)
                text[N_TEXT_BEFORE : N_TEXT_BEFORE + GH * GW] = False
                rows[head, text] = (1 - mass) / n_text
            request.full_probs[layer] = rows[None, :, None, :]
        return torch.zeros(1, s, 8)


def _peak(cells: list[tuple[int, int]]) -> np.ndarray:
    """A map with equal peaks on ``cells`` and a faint floor elsewhere (sums to 1)."""
    m = np.full((GH, GW), 1e-4)
    for r, c in cells:
        m[r, c] = 1.0
    return m / m.sum()


def _planted(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per sample: TARGET one sharp peak (mass 0.8), DISTRACTOR two peaks (mass 0.9, the largest), SHARP_LIGHT one
    sharp peak with little image mass (0.05), every other head flat with mass in [0.06, 0.1]."""
    rng = np.random.default_rng(seed)
    s_all, m_all = [], []
    for _ in range(n):
        s_img = rng.uniform(0.06, 0.1, (L, H))
        maps = np.full((L, H, GH, GW), 1.0 / (GH * GW)) + rng.uniform(0, 1e-6, (L, H, GH, GW))
        r, c = rng.integers(0, GH), rng.integers(0, GW)
        s_img[TARGET], maps[TARGET] = 0.8, _peak([(r, c)])
        s_img[DISTRACTOR], maps[DISTRACTOR] = 0.9, _peak([(0, 0), (3, 3)])
        s_img[SHARP_LIGHT], maps[SHARP_LIGHT] = 0.05, _peak([(r, c)])
        maps /= maps.sum(axis=(2, 3), keepdims=True)
        s_all.append(s_img)
        m_all.append(maps)
    return s_all, m_all


def _fake_rows(n: int) -> list[dict]:
    img = Image.new("RGB", (64, 64))
    return [{"id": f"fake-{i}", "image": img, "question": "where?"} for i in range(n)]


def test_head_statistics_reads_mass_and_maps_from_full_rows():
    s_img, maps = _planted(1)
    fake = FakeGM(s_img, maps)
    got_s, got_maps = lh.head_statistics(fake, _fake_rows(1)[0])
    np.testing.assert_allclose(got_s, s_img[0], rtol=1e-6)
    np.testing.assert_allclose(got_maps, maps[0], rtol=1e-5, atol=1e-9)
    assert fake.passes["forward"] == 1


def test_discovery_picks_the_sharp_mass_heavy_head():
    n = 6
    s_img, maps = _planted(n)
    # top_k=1: the distractor has more image mass but two blobs; the target's single blob wins every time.
    sel = lh.discover_heads(FakeGM(s_img, maps), _fake_rows(n), top_k=1)
    assert sel.heads == [TARGET]
    assert sel.frequencies == [n]
    assert sel.num_samples == n
    # top_k=2: the sharp but image-light head is below the S_img elbow, so the distractor is second.
    sel2 = lh.discover_heads(FakeGM(s_img, maps), _fake_rows(n), top_k=2)
    assert sel2.heads == [TARGET, DISTRACTOR]
    assert sel2.frequencies == [n, n]
    assert sel2.counts[SHARP_LIGHT[0]][SHARP_LIGHT[1]] == 0
    assert sum(map(sum, sel2.counts)) == 2 * n  # flat heads (infinite entropy) never vote
    assert (sel2.name_or_path, sel2.num_layers, sel2.num_heads) == ("fake/model", L, H)


def test_select_heads_for_sample_orders_by_entropy_then_mass():
    s_img = np.array([[0.9, 0.85, 0.12, 0.05, 0.04, 0.03]])
    flat = np.full((GH, GW), 1.0 / (GH * GW))
    maps = np.stack([_peak([(0, 0), (2, 2)]), _peak([(1, 1)]), _peak([(3, 0)]), _peak([(0, 3)]), flat, flat])[None]
    # Normalised curve: x = i / 5, y = (v - 0.03) / 0.87; |x + y - 1| peaks at i = 2 (0.50 vs 0.14 and 0.38), so the
    # elbow keeps heads 0-2 and drops head 3 although its map is a single blob. Single blobs (entropy 0) rank first,
    # the larger S_img first among them; the two-blob head (log 2) comes last.
    assert lh.select_heads_for_sample(s_img, maps, top_k=3) == [(0, 1), (0, 2), (0, 0)]


def test_heads_json_round_trip_and_identity(tmp_path):
    s_img, maps = _planted(3)
    fake = FakeGM(s_img, maps)
    sel = lh.discover_heads(fake, _fake_rows(3), top_k=2)
    path = str(tmp_path / "heads.json")
    sel.save(path)
    back = lh.HeadSelection.load(path, gm=fake)
    assert back == sel
    with open(path) as f:
        assert json.load(f)["heads"] == [[1, 2], [2, 0]]

    # Another model name, or another layer count: refused, naming the file.
    for other in (FakeGM(s_img, maps, name="other/other-model"), FakeGM(s_img, maps, layers=L + 1)):
        with pytest.raises(GroundingError, match="heads.json"):
            lh.HeadSelection.load(path, gm=other)
        method = lh.LocalizationHeads(heads_file=path)
        with pytest.raises(GroundingError, match="heads.json"):
            method.prepare(other, _fake_rows(1))
    # A local copy of the same checkpoint (same last path component) is accepted.
    lh.HeadSelection.load(path, gm=FakeGM(s_img, maps, name="/models/fake/model"))

    # Heads outside the recorded model, or a file that is not a heads file.
    d = sel.to_dict()
    d["heads"] = [[L, 0], [0, 0]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(GroundingError, match="bad.json.*outside"):
        lh.HeadSelection.load(str(bad))
    bad.write_text("{}")
    with pytest.raises(GroundingError, match="bad.json"):
        lh.LocalizationHeads(heads_file=str(bad))
    with pytest.raises(GroundingError, match="missing.json"):
        lh.LocalizationHeads(heads_file=str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------------- map -> box


def test_heads_map_and_boxes_by_hand():
    a = np.zeros((6, 6))
    a[1:3, 1:3] = 1.0  # normalised: 0.25 per cell
    b = np.zeros((6, 6))
    b[1, 1] = b[4, 4] = 3.0  # normalised: 0.5 per cell
    grid = lh.heads_map(np.stack([a, b]), sigma=0.0)
    expected = np.zeros((6, 6))
    expected[1:3, 1:3] = 0.25
    expected[1, 1] += 0.5
    expected[4, 4] = 0.5
    np.testing.assert_allclose(grid, expected)
    mask, ranked = lh.map_boxes(grid)
    assert mask.sum() == 5  # mean = 2 / 36; the five non-zero cells are above it
    assert [box for box, _ in ranked] == [(1, 1, 3, 3), (4, 4, 5, 5)]
    assert [mass for _, mass in ranked] == pytest.approx([1.5, 0.5])

    # With 8-connectivity a diagonal neighbour joins the blob: one box around both.
    b2 = np.zeros((6, 6))
    b2[1, 1] = b2[3, 3] = 1.0
    _, ranked = lh.map_boxes(lh.heads_map(np.stack([a, b2]), sigma=0.0))
    assert [box for box, _ in ranked] == [(1, 1, 4, 4)]

    # sigma = 1: each head's normalised grid is smoothed (edges replicated) before the sum.
    smooth = lh.heads_map(np.stack([a, b]), sigma=1.0)
    ref = ndimage.gaussian_filter(a / a.sum(), 1.0, mode="nearest") + ndimage.gaussian_filter(
        b / b.sum(), 1.0, mode="nearest"
    )
    np.testing.assert_allclose(smooth, ref)

    # A flat map has nothing above its mean: no box.
    mask, ranked = lh.map_boxes(np.ones((4, 4)))
    assert not mask.any() and ranked == []


# --------------------------------------------------------------------------------------------------- EGG pieces


def test_plan_crops_ranks_regions_by_raw_mass_and_grows_crops():
    grid = np.zeros((8, 8))
    grid[1, 1] = 10.0  # strong point
    grid[5:8, 4:8] = 0.6  # broad, weaker in total (7.2)
    regions, boxes, crops = egg.plan_crops(grid, (800, 400), sigma=1.5, top_k=2, min_crop=150)
    assert len(regions) == 2
    assert regions[0].mass > regions[1].mass
    assert regions[0].mask[1, 1] and regions[1].mask[6, 5]
    assert regions[0].mass == pytest.approx(grid[regions[0].mask].sum())
    # cell (r0, c0, r1, c1) -> pixels: a cell is 100 px wide and 50 px tall.
    for reg, box in zip(regions, boxes):
        r0, c0, r1, c1 = reg.box
        assert box == pytest.approx((c0 * 100, r0 * 50, c1 * 100, r1 * 50))
    for box, crop in zip(boxes, crops):
        assert crop[2] - crop[0] >= 150 - 1e-9 and crop[3] - crop[1] >= 150 - 1e-9
        assert crop[0] >= 0 and crop[1] >= 0 and crop[2] <= 800 and crop[3] <= 400
        assert crop[0] <= box[0] and crop[2] >= box[2]  # grown around the box


def _blobs(k: int) -> np.ndarray:
    """k separated single-cell blobs of equal height: spatial entropy log k (0 = flat map, entropy inf)."""
    g = np.zeros((8, 8))
    for i in range(k):
        g[(i // 2) * 4 + 1, (i % 2) * 4 + 1] = 1.0
    return g


@pytest.mark.parametrize(
    ("blob_counts", "max_rounds", "calls", "accepted"),
    [
        ([4, 2, 3, 1], 5, 3, 1),  # falls, then rises: stop, keep round 1
        ([4, 2, 1], 2, 3, 2),  # keeps falling: the round cap stops it
        ([4, 2, 1], 0, 1, 0),  # no re-grounding
        ([2, 2, 1], 3, 2, 0),  # equal entropy counts as not falling
        ([0, 1, 3], 4, 3, 1),  # a flat first map (infinite entropy) is beaten by any blob
    ],
)
def test_zoom_loop_stopping_rule(blob_counts, max_rounds, calls, accepted):
    seen = []

    def relevance(images):
        seen.append(len(images))
        return [_blobs(blob_counts[len(seen) - 1])] + [np.ones((2, 2))] * (len(images) - 1)

    def plan(grid):
        assert grid.shape == (8, 8)  # plans from image 0's map
        return [], [(0.0, 0.0, 10.0, 10.0)], [(0.0, 0.0, 20.0, 30.0)]

    img = Image.new("RGB", (100, 80))
    rounds, best = egg.zoom_and_reground(relevance, [img], plan, max_rounds=max_rounds, sigma=0.0)
    assert len(seen) == calls
    assert seen == [1] + [2] * (calls - 1)  # original, then original + one crop
    assert best == accepted
    ents = [r.entropy for r in rounds]
    assert ents == pytest.approx([math.log(k) if k else math.inf for k in blob_counts[:calls]])
    assert [r.accepted for r in rounds] == [i <= accepted for i in range(calls)]


def test_crop_image_rounds_outward_and_clips():
    img = Image.new("RGB", (100, 80))
    assert egg.crop_image(img, (10.4, 5.6, 20.2, 30.0)).size == (11, 25)
    assert egg.crop_image(img, (-5.0, 70.0, 120.0, 90.0)).size == (100, 10)


# ---------------------------------------------------------------------------------------------------- end to end


def _inside(box, w, h) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_localization_heads_end_to_end(gm, rows, tmp_path):
    row = rows[0]
    grids = gm.inputs([row["image"]], row["question"])["grids"]
    # floor 0 so the random tiny model's near-uniform heads vote regardless of float round-off near the floor.
    method = build_method(
        "localization_heads", top_k=3, discover_samples=4, floor=0.0, save_heads=str(tmp_path / "h.json")
    )
    with pytest.raises(GroundingError, match="no heads"):
        method.run(gm, row)
    method.prepare(gm, rows)
    sel = lh.HeadSelection.load(str(tmp_path / "h.json"), gm=gm)
    assert sel == method.selection and sel.num_samples == 4 and len(sel.heads) == 3
    assert sel.name_or_path == "tiny" and (sel.num_layers, sel.num_heads) == (gm.num_layers, gm.num_heads)

    res = method.run(gm, row)
    assert [m.shape for m in res.maps] == grids
    assert res.passes == {"forward": 1, "backward": 0}
    assert res.answer is None
    assert res.boxes and all(_inside(b, row["width"], row["height"]) for b in res.boxes)
    assert np.array(res.extras["mask"]).shape == grids[0]

    # Given heads: the map is the sum of those heads' smoothed, normalised grids.
    fixed = lh.HeadSelection([(0, 1), (3, 2)], [1, 1], 1, "tiny", gm.num_layers, gm.num_heads)
    fixed.save(str(tmp_path / "fixed.json"))
    res = build_method("localization_heads", heads_file=str(tmp_path / "fixed.json")).run(gm, row)
    att = gm.attention(gm.inputs([row["image"]], row["question"]), per_head=True)
    ref = sum(
        ndimage.gaussian_filter((a / a.sum()).reshape(grids[0]), 1.0, mode="nearest")
        for a in (att[0, 1].numpy().astype(np.float64), att[3, 2].numpy().astype(np.float64))
    )
    np.testing.assert_allclose(res.maps[0], ref, rtol=1e-5)


def test_batched_probe_and_heads_equal_single_sample_runs(gm, rows, tmp_path):
    """One right-padded forward pass over samples with different token grids gives each sample's own maps."""
    sizes = [(224, 224), (280, 168), (168, 112)]  # grids (8, 8), (6, 10), (4, 6): different V, so padding is real
    batch = [dict(r, image=r["image"].resize(wh), width=wh[0], height=wh[1]) for r, wh in zip(rows, sizes)]
    for row, (w, h) in zip(batch, sizes):
        assert gm.inputs([row["image"]], row["question"])["grids"] == [(h // 28, w // 28)]
    heads = lh.HeadSelection([(0, 1), (2, 3), (3, 0)], [1, 1, 1], 1, "tiny", gm.num_layers, gm.num_heads)
    heads.save(str(tmp_path / "heads.json"))
    methods = [
        build_method("attention_probe", query="prompt_last"),
        build_method("attention_probe", query="answer_last", layers="1-2"),
        build_method("localization_heads", heads_file=str(tmp_path / "heads.json")),
    ]
    for method in methods:
        before = gm.passes["forward"]
        batched = method.run_batch(gm, batch)
        assert gm.passes["forward"] - before == 1  # the whole batch in one forward pass
        for row, (w, h), got in zip(batch, sizes, batched):
            want = method.run(gm, row)
            assert [m.shape for m in got.maps] == [(h // 28, w // 28)]
            np.testing.assert_allclose(got.maps[0], want.maps[0], rtol=1e-5, atol=1e-9)
            assert got.boxes == want.boxes
            assert got.passes == {"forward": 1, "backward": 0} and got.seconds > 0
    # generated_last decodes per sample, so it falls back to single runs.
    gen = build_method("attention_probe", query="generated_last", max_new_tokens=1)
    assert [r.answer for r in gen.run_batch(gm, batch[:2])] == [gen.run(gm, r).answer for r in batch[:2]]
    with pytest.raises(GroundingError, match="query must be prompt_last or answer_last"):
        gm.batch_attention(batch, "generated_last")


def test_loc_heads_cli(tmp_path, rows, gm):
    import datasets

    from klal.data.schema import FEATURES

    data = tmp_path / "data"
    keep = [{k: r[k] for k in FEATURES} for r in rows[:2]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(keep, features=FEATURES)}).save_to_disk(str(data))
    out = tmp_path / "heads.json"
    # floor 0: any above-mean cell forms a blob, so the random tiny model's near-uniform heads can vote.
    argv = [
        "--data",
        str(data),
        "--num",
        "2",
        "--top-k",
        "2",
        "--floor",
        "0",
        "--max-pixels",
        "50176",
        "--out",
        str(out),
    ]
    sel = lh.main(argv)
    assert out.is_file() and lh.HeadSelection.load(str(out)) == sel
    assert sel.num_samples == 2 and sel.name_or_path == "tiny" and len(sel.heads) == 2
    assert sel.frequencies == sorted(sel.frequencies, reverse=True) and sum(map(sum, sel.counts)) == 4
    with pytest.raises(SystemExit):
        lh.main(["--data", str(data), "--split", "test", "--out", str(out)])
    # prepare() also takes a datasets.Dataset (rows, not a column slice).
    method = lh.LocalizationHeads(discover_samples=1, floor=0.0)
    method.prepare(gm, datasets.load_from_disk(str(data))["train"])
    assert method.selection.num_samples == 1


def test_egg_end_to_end(gm, rows, monkeypatch):
    row = rows[1]
    grids = gm.inputs([row["image"]], row["question"])["grids"]
    generated_with = []
    real_generate = gm.generate

    def spy(inputs, max_new_tokens=16, logits_fn=None):
        generated_with.append(len(inputs["grids"]))
        return real_generate(inputs, max_new_tokens, logits_fn)

    monkeypatch.setattr(gm, "generate", spy)
    res = build_method("entropy_gradient", max_rounds=1, max_new_tokens=3).run(gm, row)
    assert [m.shape for m in res.maps] == grids
    assert all((m >= 0).all() and m.max() > 0 for m in res.maps)
    rounds = res.extras["rounds"]
    assert 1 <= len(rounds) <= 2 and rounds[0]["accepted"]
    assert res.passes["backward"] == len(rounds)
    assert res.passes["forward"] >= len(rounds) + 1
    assert isinstance(res.answer, str)
    assert 1 <= len(res.boxes) <= 2 and all(_inside(b, row["width"], row["height"]) for b in res.boxes)
    assert generated_with == [1 + len(res.extras["crop_boxes"])]  # answered from [original, crops]
    if len(rounds) == 2:
        assert rounds[1]["num_images"] == 1 + len(rounds[0]["boxes"])


def test_egg_refuses_an_image_smaller_than_min_crop(gm):
    row = {"id": "tiny-image-7", "image": Image.new("RGB", (60, 60), "white"), "question": "What is shown?"}
    with pytest.raises(GroundingError, match="tiny-image-7.*min_crop"):
        build_method("entropy_gradient", min_crop=112, max_new_tokens=1).run(gm, row)


def test_bad_options_are_named():
    with pytest.raises(GroundingError, match="max_rounds"):
        egg.EntropyGradientGrounding(max_rounds=-1)
    with pytest.raises(GroundingError, match="top_k"):
        lh.LocalizationHeads(top_k=0)
    with pytest.raises(GroundingError, match="save_heads"):
        lh.LocalizationHeads(heads_file="x.json", save_heads="y.json")


def _text_row(k: int) -> dict:
    from klal.data.schema import Evidence, make_record

    return make_record(
        id=f"text-{k}", task="grid_patch", image=None, question="What is 2 + 3?", answer="5", evidence=Evidence()
    )


def test_image_rows_pass_over_text_only_rows(rows):
    import datasets

    from klal.data.schema import FEATURES
    from klal.grounding.base import image_rows, text_only_mask

    mixed = [_text_row(0), rows[0], _text_row(1), _text_row(2), rows[1], _text_row(3)]
    assert text_only_mask(mixed) == [True, False, True, True, False, True]
    ds = datasets.Dataset.from_list([{k: r[k] for k in FEATURES} for r in mixed], features=FEATURES)
    # On a Dataset the image column is read as Arrow (honouring select() indices); nothing is decoded.
    assert text_only_mask(ds.select([4, 5, 0])) == [False, True, True]
    kept, skipped = image_rows(ds)
    assert isinstance(kept, datasets.Dataset) and kept["id"][:] == [rows[0]["id"], rows[1]["id"]] and skipped == 4
    # With a limit only the text rows before the last kept image row count: they were passed over.
    kept, skipped = image_rows(mixed, 1)
    assert [r["id"] for r in kept] == [rows[0]["id"]] and skipped == 1
    # A multi-image column: an empty list is a text-only row as well.
    multi = datasets.Dataset.from_dict({"image": [[], None, [rows[0]["image"]]]})
    assert text_only_mask(multi) == [True, True, False]


def test_head_discovery_uses_image_rows_only(gm, rows, tmp_path, capsys):
    import datasets

    from klal.data.schema import FEATURES

    mixed = [_text_row(0), _text_row(1), rows[0], _text_row(2), rows[1], rows[2]]
    plain = lh.LocalizationHeads(top_k=2, discover_samples=2, floor=0.0)
    plain.prepare(gm, rows[:2])
    method = lh.LocalizationHeads(top_k=2, discover_samples=2, floor=0.0)
    method.prepare(gm, mixed)
    assert method.selection == plain.selection and method.selection.num_samples == 2
    with pytest.raises(GroundingError, match=r"no image rows to discover heads on \(2 text-only row\(s\) passed over"):
        lh.LocalizationHeads(floor=0.0).prepare(gm, [_text_row(0), _text_row(1)])

    # The CLI: --num counts image-text pairs, and the text rows it leaves out are reported.
    data = tmp_path / "data"
    split = datasets.Dataset.from_list([{k: r[k] for k in FEATURES} for r in mixed], features=FEATURES)
    datasets.DatasetDict({"train": split}).save_to_disk(str(data))
    argv = ["--data", str(data), "--num", "2", "--top-k", "2", "--floor", "0", "--max-pixels", "50176"]
    sel = lh.main([*argv, "--out", str(tmp_path / "heads.json")])
    assert "skipping 3 text-only row(s)" in capsys.readouterr().err
    assert sel.num_samples == 2 and sel.counts == plain.selection.counts
    text = tmp_path / "text"
    split = datasets.Dataset.from_list([_text_row(0), _text_row(1)], features=FEATURES)
    datasets.DatasetDict({"train": split}).save_to_disk(str(text))
    with pytest.raises(SystemExit, match="has no rows with an image"):
        lh.main(["--data", str(text), "--out", str(tmp_path / "none.json")])
