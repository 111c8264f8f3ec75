"""Localization heads: discovery on planted attention, the heads file, the map/box step on hand-made grids, the
end-to-end method on the tiny model, and the discovery command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import klal.grounding.loc_heads as lh
from klal.capture import CaptureRequest
from klal.grounding.registry import build_method
from klal.models.family import split_grids
from klal.session import GroundingError
from tests.grounding_helpers import inside, text_row

pytest_plugins = ["tests.grounding_helpers"]  # the gm and rows fixtures

# ----------------------------------------------------------------------------------------- planted head discovery


L, H, GH, GW = 3, 4, 4, 4
N_TEXT_BEFORE, N_TEXT_AFTER = 4, 3
TARGET, DISTRACTOR, SHARP_LIGHT = (1, 2), (2, 0), (0, 3)


class FakeGM:
    """Stands in for GroundingModel: every forward 'captures' planted full attention rows."""

    def __init__(self, s_img: list[np.ndarray], maps: list[np.ndarray], name: str = "fake/model", layers: int = L):
        self.s_img, self.maps = s_img, maps
        self.num_layers, self.num_heads = layers, H
        self.attention_layers = list(range(layers))
        self.model = type("M", (), {"config": type("C", (), {"_name_or_path": name})()})()
        self.passes = {"forward": 0, "backward": 0}
        self.calls = 0

    def inputs(self, images, question):
        v = GH * GW
        ids = torch.zeros(1, N_TEXT_BEFORE + v + N_TEXT_AFTER, dtype=torch.long)
        vis = torch.zeros_like(ids, dtype=torch.bool)
        vis[0, N_TEXT_BEFORE : N_TEXT_BEFORE + v] = True
        return {
            "input_ids": ids,
            "visual_mask": vis,
            "grids": [(GH, GW)],
            "layout": [[(GH, GW)]],
            "image_wh": [images[0].size],
        }

    @staticmethod
    def split_grid(vec, layout, image_wh=None):
        return split_grids(np.asarray(vec), [g for grids in layout for g in grids])

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
    # Raw maps: each head's attention over the image tokens, summing to its S_img.
    np.testing.assert_allclose(got_maps, s_img[0][..., None, None] * maps[0], rtol=1e-5, atol=1e-9)
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


# ---------------------------------------------------------------------------------------------------- end to end


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
    assert res.boxes and all(inside(b, row["width"], row["height"]) for b in res.boxes)
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
    # klal discover-heads dispatches to the same command.
    from klal.__main__ import main as klal_main

    assert klal_main(["discover-heads", *argv[:-1], str(tmp_path / "again.json")]) == 0  # the exit status
    assert lh.HeadSelection.load(str(tmp_path / "again.json")).heads == sel.heads
    # prepare() also takes a datasets.Dataset (rows, not a column slice).
    method = lh.LocalizationHeads(discover_samples=1, floor=0.0)
    method.prepare(gm, datasets.load_from_disk(str(data))["train"])
    assert method.selection.num_samples == 1


def test_head_discovery_uses_image_rows_only(gm, rows, tmp_path, capsys):
    import datasets

    from klal.data.schema import FEATURES

    mixed = [text_row(0), text_row(1), rows[0], text_row(2), rows[1], rows[2]]
    plain = lh.LocalizationHeads(top_k=2, discover_samples=2, floor=0.0)
    plain.prepare(gm, rows[:2])
    method = lh.LocalizationHeads(top_k=2, discover_samples=2, floor=0.0)
    method.prepare(gm, mixed)
    assert method.selection == plain.selection and method.selection.num_samples == 2
    with pytest.raises(GroundingError, match=r"no image rows to discover heads on \(2 text-only row\(s\) passed over"):
        lh.LocalizationHeads(floor=0.0).prepare(gm, [text_row(0), text_row(1)])

    # The CLI: --num counts image-text pairs, and the text rows it leaves out are reported.
    data = tmp_path / "data"
    split = datasets.Dataset.from_list([{k: r[k] for k in FEATURES} for r in mixed], features=FEATURES)
    datasets.DatasetDict({"train": split}).save_to_disk(str(data))
    argv = ["--data", str(data), "--num", "2", "--top-k", "2", "--floor", "0", "--max-pixels", "50176"]
    sel = lh.main([*argv, "--out", str(tmp_path / "heads.json")])
    assert "skipping 3 text-only row(s)" in capsys.readouterr().err
    assert sel.num_samples == 2 and sel.counts == plain.selection.counts
    text = tmp_path / "text"
    split = datasets.Dataset.from_list([text_row(0), text_row(1)], features=FEATURES)
    datasets.DatasetDict({"train": split}).save_to_disk(str(text))
    capsys.readouterr()  # drop the progress bars of save_to_disk
    with pytest.raises(SystemExit) as exit_info:
        lh.main(["--data", str(text), "--out", str(tmp_path / "none.json")], prog="klal discover-heads")
    assert exit_info.value.code == 2
    skipped, error = capsys.readouterr().err.strip().splitlines()  # one line each, no traceback
    assert skipped.endswith("skipping 2 text-only row(s) (no image)")
    assert error.startswith("klal discover-heads: error: the 'train' split of")
    assert error.endswith("has no rows with an image")


def test_bad_options_are_named():
    with pytest.raises(GroundingError, match="top_k"):
        lh.LocalizationHeads(top_k=0)
    with pytest.raises(GroundingError, match="save_heads"):
        lh.LocalizationHeads(heads_file="x.json", save_heads="y.json")
