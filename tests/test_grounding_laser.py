"""LASER: VAQ, grey-out, the contrastive logits on hand-worked numbers, and end-to-end runs on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klal.grounding import laser
from klal.grounding.base import GENERIC_PROMPT
from klal.grounding.crop import crop_image
from klal.grounding.registry import build_method

pytest_plugins = ["tests.grounding_helpers"]  # the gm and row fixtures


# ----------------------------------------------------------------------------------------------- pure functions


def test_vaq_picks_planted_layer_and_relu_removes_distractor():
    n_layers, n_heads, v = 4, 4, 16
    a_without = torch.full((n_layers, n_heads, v), 1.0 / v)
    a_with = a_without.clone()
    # Layer 2, heads 0 and 1: the question moves 0.2 of attention onto token 5 (taken evenly from the others).
    for h in (0, 1):
        a_with[2, h] -= 0.2 / (v - 1)
        a_with[2, h, 5] += 0.2 + 0.2 / (v - 1)
    # Layer 1 (distractor): strong attention on token 3 with the question, but even stronger without it. A plain
    # |difference| (0.4) or the raw map would win here; ReLU of the difference is 0.
    a_with[1, :, 3] = 0.5
    a_without[1, :, 3] = 0.9
    assert (a_with - a_without).norm(dim=-1).mean(-1).argmax() == 1  # the distractor is real
    scores = laser.vaq_scores(a_with, a_without, top_k=2)
    assert scores.shape == (n_layers,)
    assert int(scores.argmax()) == 2
    # Only token 5 is positive, by exactly 0.2, in heads 0 and 1: the top-2 mean is 0.2, the top-4 mean 0.1.
    assert scores[2].item() == pytest.approx(0.2, abs=1e-6)
    assert laser.vaq_scores(a_with, a_without, top_k=4)[2].item() == pytest.approx(0.1, abs=1e-6)
    # top_k above the head count is clamped to it.
    assert torch.allclose(laser.vaq_scores(a_with, a_without, top_k=99), laser.vaq_scores(a_with, a_without, 4))
    assert scores[0].item() == 0 and scores[1].item() == 0 and scores[3].item() == 0


def test_grey_out_changes_only_chosen_cells():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 100, (48, 64, 3), dtype=np.uint8)  # never 128, so greyed pixels are identifiable
    image = Image.fromarray(arr)
    out = np.array(laser.grey_out(image, [(1, 2, 2, 3), (3, 0, 4, 2)], (4, 4)))
    # 4 x 4 grid on 64 x 48 px: cells are 16 px wide and 12 px tall.
    expect = arr.copy()
    expect[12:24, 32:48] = 128
    expect[36:48, 0:32] = 128
    assert np.array_equal(out, expect)
    assert np.array_equal(np.array(image), arr)  # the input is untouched


def test_grey_out_cells_partition_the_image_with_fractional_cells():
    arr = np.zeros((31, 50, 3), dtype=np.uint8)
    image = Image.fromarray(arr)
    grid = (3, 4)  # 12.5 x 10.33 px cells
    covered = np.zeros((31, 50), dtype=int)
    for r in range(3):
        for c in range(4):
            covered += (np.array(laser.grey_out(image, [(r, c, r + 1, c + 1)], grid))[..., 0] == 128).astype(int)
    assert np.all(covered == 1)  # every pixel belongs to exactly one cell


def test_contrastive_logits_formula():
    zp = torch.tensor([2.0, 1.0, 0.0])
    zn = torch.tensor([1.0, 1.0, 1.0])
    assert torch.allclose(laser.contrastive_logits(zp, zn, alpha=1.0), torch.tensor([3.0, 1.0, -1.0]))
    assert torch.allclose(laser.contrastive_logits(zp, zn, alpha=0.5), torch.tensor([2.5, 1.0, -0.5]))
    assert torch.equal(laser.contrastive_logits(zp, zn, alpha=0.0), zp)
    # p+/p+max = [1, e^-1, e^-2]; a 0.3 cut-off keeps tokens 0 and 1 (e^-1 = 0.37), drops token 2.
    s = laser.contrastive_logits(zp, zn, alpha=1.0, plausibility=0.3)
    assert s[0].item() == 3.0 and s[1].item() == 1.0 and s[2].item() == float("-inf")
    # The contrast can change the greedy choice: token 0 is likely with or without the evidence, token 1 only with.
    zp2, zn2 = torch.tensor([2.0, 1.9]), torch.tensor([2.5, 1.0])
    assert int(zp2.argmax()) == 0
    assert int(laser.contrastive_logits(zp2, zn2, alpha=1.0).argmax()) == 1


def test_top_cells_skips_zero_cells():
    assert laser.top_cells(np.array([0.0, 0.3, 0.1, 0.3, 0.0]), 3) == [1, 3, 2]
    assert laser.top_cells(np.array([0.0, 0.2, 0.0]), 3) == [1]


# ------------------------------------------------------------------------------------------------- end to end


def test_laser_map_is_head_mean_contrast_at_vaq_layer(gm, row):
    res = build_method("laser", max_new_tokens=1).run(gm, row)
    a_with = gm.attention(gm.inputs([row["image"]], row["question"])).float()
    a_without = gm.attention(gm.inputs([row["image"]], GENERIC_PROMPT)).float()
    norms = (a_with - a_without).clamp(min=0).norm(dim=-1)  # (L, H)
    layer = int(norms.topk(4, dim=1).values.mean(1).argmax())
    assert res.extras["layer"] == layer
    expect = (a_with[layer] - a_without[layer]).clamp(min=0).mean(0).numpy().reshape(res.maps[0].shape)
    np.testing.assert_allclose(res.maps[0], expect, rtol=1e-5, atol=1e-8)


def test_laser_falls_back_to_plain_attention_without_contrast(gm, row):
    # The generic prompt as the question: A_with == A_without, so A_con is zero everywhere and VAQ is flat.
    res = build_method("laser", max_new_tokens=1).run(gm, dict(row, question=GENERIC_PROMPT))
    assert res.extras["fallback"] is True
    assert res.extras["layer"] == 0 and res.extras["vaq"] == [0.0] * gm.num_layers
    a_with = gm.attention(gm.inputs([row["image"]], GENERIC_PROMPT)).float()
    np.testing.assert_allclose(res.maps[0], a_with[0].mean(0).numpy().reshape(res.maps[0].shape), rtol=1e-5)


def test_laser_vat_gate(gm, row):
    # Threshold 0: never contrasted, so the answer is plain greedy decoding on [original, crop].
    plain = build_method("laser", max_new_tokens=2, vat_threshold=0.0).run(gm, row)
    assert plain.extras["steps"]["contrasted"] == 0
    crop = crop_image(row["image"], plain.boxes[0], zoom=True)
    assert plain.answer == gm.generate(gm.inputs([row["image"], crop], row["question"]), 2)
    # Threshold above 1: every step contrasted, each with one extra (negative) forward pass.
    always = build_method("laser", max_new_tokens=2, vat_threshold=1.5).run(gm, row)
    steps = always.extras["steps"]
    assert steps["plain"] == 0 and steps["contrasted"] >= 1
    assert always.passes["forward"] == 2 + 2 * steps["contrasted"]
