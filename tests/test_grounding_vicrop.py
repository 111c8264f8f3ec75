"""ViCrop (rel-att, grad-att): hand-worked formulas, crop geometry, the grad-att gradient against a finite difference on
the tiny model, and end-to-end runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from klal.grounding import vicrop
from klal.grounding.registry import build_method
from klal.session import GroundingError
from tests.conftest import make_row

pytest_plugins = ["tests.grounding_helpers"]  # the gm and row fixtures


# ----------------------------------------------------------------------------------------------- pure functions


def test_relative_attention_hand_made():
    a_q = torch.tensor([0.5, 0.3, 0.2, 0.1])
    a_g = torch.tensor([0.25, 0.5, 0.25, 0.4])
    # The authors divide as they are (no eps): 0.5 / 0.25, 0.3 / 0.5, 0.2 / 0.25, 0.1 / 0.4.
    assert vicrop.relative_attention(a_q, a_g).tolist() == pytest.approx([2.0, 0.6, 0.8, 0.25], rel=1e-6)
    # eps = 0.05: 0.5 / 0.3, 0.3 / 0.55, 0.2 / 0.3, 0.1 / 0.45.
    assert vicrop.relative_attention(a_q, a_g, eps=0.05).tolist() == pytest.approx(
        [5 / 3, 6 / 11, 2 / 3, 2 / 9], rel=1e-6
    )
    # Where the generic prompt gives no attention the ratio is infinite: an error, unless eps keeps it finite.
    with pytest.raises(ValueError, match=r"1 visual token\(s\) exactly zero attention.*eps > 0"):
        vicrop.relative_attention(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.5]))
    assert vicrop.relative_attention(torch.tensor([0.1]), torch.tensor([0.0]), eps=1e-3).item() == pytest.approx(100)
    with pytest.raises(ValueError, match="same shape"):
        vicrop.relative_attention(a_q, a_g[:3])
    with pytest.raises(ValueError, match="eps"):
        vicrop.relative_attention(a_q, a_g, eps=-1e-3)


def test_grad_attention_hand_worked():
    a = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    g = torch.tensor([[2.0, -1.0, 1.0], [-3.0, 4.0, 0.5]])
    # head 0: [1.0, 0, 0.2]; head 1: [0, 0.4, 0.4]; mean: [0.5, 0.2, 0.3]
    assert torch.allclose(vicrop.grad_attention(a, g), torch.tensor([0.5, 0.2, 0.3]))
    with pytest.raises(ValueError):
        vicrop.grad_attention(a, g[:, :2])


def test_default_layer_authors_for_the_checkpoint_they_name_relative_depth_otherwise():
    # qwen2_5_methods.py: ATT_LAYER = 22 on the one checkpoint the code loads (info.py: Qwen2.5-VL-3B-Instruct, 36
    # layers), under its hub id, its hub-cache snapshot path or a copy's folder name.
    for name in (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "/cache/models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/0123abc",
        "/data/ckpt/Qwen2.5-VL-3B-Instruct",
    ):
        assert vicrop.default_layer(36, name) == (22, "authors")
    # Any other model: round(22 / 36 * L), clamped to the last layer.
    # The Qwen path's ATT_LAYER = 22 is read whatever Qwen2.5-VL it loads: the 7B too, not round(22/36 * 28) = 17.
    assert vicrop.default_layer(28, "Qwen/Qwen2.5-VL-7B-Instruct") == (22, "authors")
    assert vicrop.default_layer(28, "someone/other-28-layer-model") == (17, "relative_depth")  # 17.1
    assert vicrop.default_layer(64, "Qwen/Qwen2.5-VL-32B-Instruct") == (39, "relative_depth")  # 39.1
    assert vicrop.default_layer(4, "tiny") == (2, "relative_depth")  # 2.44
    assert vicrop.default_layer(1) == (0, "relative_depth")
    # The named checkpoint with another depth (the 2-layer offline replica tests use) is not the authors' model.
    assert vicrop.default_layer(2, "Qwen/Qwen2.5-VL-3B-Instruct") == (1, "relative_depth")  # 1.22


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


# ----------------------------------------------------------------------------------------------- options/errors


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


@pytest.mark.parametrize("name", ["vicrop_rel_att", "vicrop_grad_att"])
def test_answers_are_decoded_as_the_authors_decode_them(gm, row, name, monkeypatch):
    # run.py answers with model.generate(**inputs, max_new_tokens=20, do_sample=False): the checkpoint's generation
    # config applies, 20 new tokens at most.
    calls = []
    real_generate = gm.generate

    def spy(inputs, max_new_tokens=16, logits_fn=None, decoding="greedy"):
        calls.append((max_new_tokens, decoding))
        return real_generate(inputs, 1, logits_fn, decoding)  # one token is enough to see it decode

    monkeypatch.setattr(gm, "generate", spy)
    build_method(name).run(gm, row)
    build_method(name, decoding="greedy", max_new_tokens=5).run(gm, row)
    assert calls == [(20, "generation_config"), (5, "greedy")]


METHODS = ("vicrop_rel_att", "vicrop_grad_att", "laser")


@pytest.mark.parametrize("name", METHODS)
def test_image_too_small_names_sample(gm, name):
    small = make_row(7, 80, 120, None)
    before = dict(gm.passes)
    with pytest.raises(GroundingError, match=r"row-7.*min_crop=112"):
        build_method(name, min_crop=112).run(gm, small)
    assert gm.passes == before  # refused before spending passes


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


def test_window_skip_needs_the_whole_grid_on_both_axes():
    """A window that spans the grid's height but not its width is scored, not skipped (the authors skip a window only
    when it covers both axes). Worked by hand: a 1000 x 200 image on a 4 x 20 grid (50 px blocks), attention on
    column 10. Ratio 1: 224 px = 4 x 4 blocks (all 4 rows); the first window holding column 10 starts at x = 7
    (sum 4; neighbours x = 6: 0, x = 8: 4), sharpness (4 - 2) / 16 = 0.125, above ratio 1.2's (4 - 2) / 20 and the
    larger ones'. Centre cx = int(7 * 50 + 50 * 4 / 2) = 450, cy = int(0 + 50 * 4 / 2) = 100 clamped to
    200 - 112 = 88; half = 112: (338, 0, 562, 200). Skipping on either axis would return the whole image."""
    grid = np.zeros((4, 20))
    grid[:, 10] = 1.0
    assert vicrop.crop_box(grid, (1000, 200), 224) == (338, 0, 562, 200)
    assert vicrop.crop_box(grid.T, (200, 1000), 224) == (0, 338, 200, 562)  # the same, transposed
