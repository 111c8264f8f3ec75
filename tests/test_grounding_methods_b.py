"""ViCrop (rel-att, grad-att) and LASER: hand-worked formulas, crop geometry, the grad-att gradient against a finite
difference on the tiny model, and end-to-end runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from klal.grounding import laser, vicrop
from klal.grounding.base import GENERIC_PROMPT, GroundingError, GroundingModel, available_methods, build_method
from tests.conftest import make_row

METHODS = ("vicrop_rel_att", "vicrop_grad_att", "laser")


@pytest.fixture(scope="module")
def gm() -> GroundingModel:
    from klal.models.loader import ModelConfig, load_model_and_processor

    model, processor = load_model_and_processor(ModelConfig(max_pixels=224 * 224))
    return GroundingModel(model, processor)


@pytest.fixture(scope="module")
def row() -> dict:
    from data_gen.tasks import build_task

    s = build_task("grid_patch", "easy", {}).sample(3, 0)
    im = s.image.resize((224, 224))  # small, so the tiny model's passes stay fast
    return {
        "id": "gp-3-0",
        "task": "grid_patch",
        "image": im,
        "question": s.question,
        "answer": s.answer,
        "width": im.width,
        "height": im.height,
        "evidence": s.evidence.to_dict(),
        "meta": s.meta,
    }


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


def test_relative_attention_hand_made():
    a_q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    a_g = torch.tensor([0.25, 0.5, 0.25, 0.0])
    out = vicrop.relative_attention(a_q, a_g, eps=1e-6)
    assert torch.allclose(out, torch.tensor([2.0, 0.6, 0.8, 0.0]), atol=1e-4)
    # Where the generic prompt gives no attention the ratio is a_q / eps: finite and large.
    assert vicrop.relative_attention(torch.tensor([0.1]), torch.tensor([0.0]), eps=1e-3).item() == pytest.approx(100)
    with pytest.raises(ValueError, match="same shape"):
        vicrop.relative_attention(a_q, a_g[:3])
    with pytest.raises(ValueError, match="eps"):
        vicrop.relative_attention(a_q, a_g, eps=0.0)


def test_grad_attention_hand_worked():
    a = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    g = torch.tensor([[2.0, -1.0, 1.0], [-3.0, 4.0, 0.5]])
    # head 0: [1.0, 0, 0.2]; head 1: [0, 0.4, 0.4]; mean: [0.5, 0.2, 0.3]
    assert torch.allclose(vicrop.grad_attention(a, g), torch.tensor([0.5, 0.2, 0.3]))
    with pytest.raises(ValueError):
        vicrop.grad_attention(a, g[:, :2])


def test_default_layer_relative_depth():
    assert vicrop.default_layer(36) == 22
    assert vicrop.default_layer(28) == 17  # 0.611 * 28 = 17.1
    assert vicrop.default_layer(4) == 2
    assert vicrop.default_layer(1) == 0


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


def test_crop_selection_on_planted_map():
    grid = np.zeros((8, 8))
    grid[5:7, 1:3] = 1.0
    sizes = vicrop.square_window_sizes((8, 8), (0.25, 0.5, 0.75))
    assert sizes == [(2, 2), (4, 4), (6, 6)]
    # 448 px image, 56 px cells. The 2x2 window holds all mass: score 4/2 beats 4/4 and 4/6.
    cells, box = vicrop.select_crop(grid, sizes, (448, 448), min_crop=112)
    assert cells == (5, 1, 7, 3)
    assert box == pytest.approx((56, 280, 168, 392))
    # Grown to 200 px around the centre (112, 336).
    _, box = vicrop.select_crop(grid, sizes, (448, 448), min_crop=200)
    assert box == pytest.approx((12, 236, 212, 436))
    # Near a border the grown box is shifted back inside.
    grid2 = np.zeros((8, 8))
    grid2[7, 7] = 1.0
    _, box = vicrop.select_crop(grid2, [(1, 1)], (448, 448), min_crop=200)
    assert box == pytest.approx((248, 248, 448, 448))
    assert vicrop.square_window_sizes((3, 5), (0.1, 0.25, 0.5)) == [(1, 1), (2, 2)]


def test_crop_image_zoom():
    image = Image.fromarray(np.arange(100 * 80 * 3, dtype=np.uint32).reshape(80, 100, 3).astype(np.uint8))
    crop, box = vicrop.crop_image(image, (10.4, 20.0, 59.6, 60.0), zoom=False)
    assert box == (10.0, 20.0, 60.0, 60.0)
    assert crop.size == (50, 40)
    assert np.array_equal(np.array(crop), np.array(image)[20:60, 10:60])
    zoomed, _ = vicrop.crop_image(image, (10.0, 20.0, 60.0, 60.0), zoom=True)
    assert zoomed.size == (100, 80)  # area of the original, aspect of the crop
    whole, _ = vicrop.crop_image(image, (0, 0, 100, 80), zoom=True)
    assert whole.size == (100, 80)  # never downscaled


# ----------------------------------------------------------------------------------------------- options/errors


def test_registered_and_bad_options():
    for name in METHODS:
        assert name in available_methods()
    with pytest.raises(GroundingError, match="min_crop"):
        build_method("vicrop_rel_att", min_crop=-1)
    with pytest.raises(GroundingError, match="scales"):
        build_method("vicrop_grad_att", scales=(0.5, 1.5))
    with pytest.raises(GroundingError, match="eps"):
        build_method("vicrop_rel_att", eps=0)
    with pytest.raises(GroundingError, match="plausibility"):
        build_method("laser", plausibility=1.0)
    with pytest.raises(GroundingError, match="top_heads"):
        build_method("laser", top_heads=0)


@pytest.mark.parametrize("name", METHODS)
def test_image_too_small_names_sample(gm, name):
    small = make_row(7, 80, 120, None)
    before = dict(gm.passes)
    with pytest.raises(GroundingError, match=r"row-7.*min_crop=112"):
        build_method(name).run(gm, small)
    assert gm.passes == before  # refused before spending passes


def test_layer_out_of_range(gm, row):
    with pytest.raises(GroundingError, match=r"layer=9.*4 layers.*gp-3-0"):
        build_method("vicrop_rel_att", layer=9).run(gm, row)


# ------------------------------------------------------------------------------------------ grad-att gradient


def test_grad_att_gradient_matches_finite_difference(gm, row):
    """d log p(top) / dA from the differentiable_rows path equals a central difference of the real model.

    Perturbing the attention probabilities of the last prompt row at one layer by ``eps * delta`` changes that row's
    attention output, per head, by ``eps * sum_k delta[h, k] v[h, k]``; that change is injected at the input of the
    layer's ``o_proj`` in plain forward passes (no capture), and the log-prob of the same token is differenced.
    """
    layer = 1
    inputs = gm.inputs([row["image"]], row["question"])
    req = gm.request(inputs, layers=[layer], per_head=True, differentiable_rows=True)
    with torch.enable_grad():
        logp = torch.log_softmax(gm.forward(inputs, req)[0, -1].float(), dim=-1)
        top = int(logp.argmax())
        gm.backward(logp[top])
    grad = req.full_probs[layer].grad[0, :, 0].double()  # (H, S)
    req.clear()

    attn = gm.model.model.language_model.layers[layer].self_attn
    n_heads, s = grad.shape
    n_kv = gm.text_config.num_key_value_heads
    values: dict[str, torch.Tensor] = {}
    shift: dict[str, torch.Tensor | None] = {"dv": None}

    def v_hook(_mod, _args, out):
        values["v"] = out[0].detach().view(s, n_kv, -1).repeat_interleave(n_heads // n_kv, dim=1)  # (S, H, D)

    def o_pre_hook(_mod, args):
        if shift["dv"] is None:
            return None
        x = args[0].clone()
        x[0, -1] += shift["dv"].to(x.dtype)
        return (x, *args[1:])

    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in inputs}
    if "mm_token_type_ids" in inputs:
        kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]

    def logp_top() -> float:
        with torch.no_grad():
            return float(torch.log_softmax(gm.model(**kw, use_cache=False).logits[0, -1].double(), -1)[top])

    handles = [attn.v_proj.register_forward_hook(v_hook), attn.o_proj.register_forward_pre_hook(o_pre_hook)]
    try:
        base = logp_top()  # also records the layer's value vectors
        v = values["v"].double()  # (S, H, D)
        delta = torch.randn(n_heads, s, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        eps = 1e-3
        shift["dv"] = (eps * torch.einsum("hs,shd->hd", delta, v)).flatten()
        plus = logp_top()
        shift["dv"] = -shift["dv"]
        minus = logp_top()
    finally:
        for h in handles:
            h.remove()
    fd = (plus - minus) / (2 * eps)
    analytic = float((grad * delta).sum())
    assert math.isfinite(base) and base == pytest.approx(float(logp[top].detach()), abs=1e-4)  # same model, same token
    assert abs(analytic) > 1e-4  # the check is not vacuous
    assert fd == pytest.approx(analytic, rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", METHODS)
def test_end_to_end(gm, row, name):
    method = build_method(name, max_new_tokens=2)
    res = method.run(gm, row)
    grids = gm.inputs([row["image"]], row["question"])["grids"]
    assert [m.shape for m in res.maps] == grids
    assert all(np.all(np.isfinite(m)) and np.all(m >= 0) for m in res.maps)
    assert len(res.boxes) == 1
    x0, y0, x1, y1 = res.boxes[0]
    assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
    assert x1 - x0 >= 112 and y1 - y0 >= 112
    assert isinstance(res.answer, str)
    assert res.seconds > 0
    if name == "vicrop_rel_att":
        assert res.passes["backward"] == 0
        assert 3 <= res.passes["forward"] <= 4  # question + generic prompt + 1..2 decoding steps
    elif name == "vicrop_grad_att":
        assert res.passes["backward"] == 1
        assert 2 <= res.passes["forward"] <= 3
        assert float(sum(m.sum() for m in res.maps)) > 0
    else:
        steps = res.extras["steps"]
        assert 1 <= steps["plain"] + steps["contrasted"] <= 2
        assert res.passes == {"forward": 2 + steps["plain"] + 2 * steps["contrasted"], "backward": 0}
        assert 0 <= res.extras["layer"] < gm.num_layers
        assert int(np.argmax(res.extras["vaq"])) == res.extras["layer"]
        assert sum(res.extras["greyed_cells"]) == max(1, round(0.1 * grids[0][0] * grids[0][1]))


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
    crop, _ = vicrop.crop_image(row["image"], plain.boxes[0], zoom=True)
    assert plain.answer == gm.generate(gm.inputs([row["image"], crop], row["question"]), 2)
    # Threshold above 1: every step contrasted, each with one extra (negative) forward pass.
    always = build_method("laser", max_new_tokens=2, vat_threshold=1.5).run(gm, row)
    steps = always.extras["steps"]
    assert steps["plain"] == 0 and steps["contrasted"] >= 1
    assert always.passes["forward"] == 2 + 2 * steps["contrasted"]


def test_extend_matches_generate_step_inputs(gm, row):
    """The negative pass re-builds generate()'s step input: its logits at step 2 equal generate()'s own."""
    inputs = gm.inputs([row["image"]], row["question"])
    seen: list[tuple[torch.Tensor, list[int]]] = []

    def record(z: torch.Tensor, generated: list[int]) -> torch.Tensor:
        seen.append((z.clone(), list(generated)))
        # Never pick a stop token, so there is a second step.
        return z.index_fill(0, torch.tensor([gm.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]), -1e9)

    gm.generate(inputs, 2, logits_fn=record)
    assert len(seen) == 2 and len(seen[1][1]) == 1
    with torch.no_grad():
        z = gm.forward(laser._extend(inputs, seen[1][1]))[0, -1].float()
    torch.testing.assert_close(z, seen[1][0], rtol=1e-4, atol=1e-4)
