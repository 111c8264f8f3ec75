"""Entropy-Gradient Grounding: the gradient against finite differences and end-to-end runs on the tiny model (the
region step and the zoom loop, as the authors define them, are tested in test_grounding_authors.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import klal.grounding.egg as egg
from klal.grounding.registry import build_method
from klal.session import GroundingError, GroundingModel
from tests.grounding_helpers import inside, tiny_model

pytest_plugins = ["tests.grounding_helpers"]  # the gm and rows fixtures


@pytest.fixture(scope="module")
def gm64() -> GroundingModel:
    model, processor = tiny_model()
    return GroundingModel(copy.deepcopy(model).to(torch.float64), processor)


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


# --------------------------------------------------------------------------------------------------- EGG pieces


# ---------------------------------------------------------------------------------------------------- end to end


def test_egg_end_to_end(gm, rows, monkeypatch):
    row = rows[1]
    grids = gm.inputs([row["image"]], row["question"])["grids"]
    generated_with = []
    real_generate = gm.generate

    def spy(inputs, max_new_tokens=16, logits_fn=None, decoding="greedy"):
        generated_with.append((len(inputs["grids"]), max_new_tokens, decoding))
        return real_generate(inputs, max_new_tokens, logits_fn, decoding)

    monkeypatch.setattr(gm, "generate", spy)
    res = build_method("entropy_gradient", max_rounds=1, max_new_tokens=3).run(gm, row)
    assert [m.shape for m in res.maps] == grids
    assert all((m >= 0).all() and m.max() > 0 for m in res.maps)
    rounds = res.extras["rounds"]
    assert 1 <= len(rounds) <= 2 and rounds[0]["crops"] == []
    assert res.passes["backward"] == len(rounds)
    assert res.passes["forward"] >= len(rounds) + 1
    assert isinstance(res.answer, str)
    assert len(res.boxes) <= 2 and all(inside(b, row["width"], row["height"]) for b in res.boxes)
    # Answered from [original, crops], decoded as the release decodes (model.generate under the generation config).
    assert generated_with == [(1 + len(res.extras["crop_boxes"]), 3, "generation_config")]
    build_method("entropy_gradient", max_rounds=0, decoding="greedy").run(gm, row)
    assert generated_with[-1][1:] == (100, "greedy")  # the release's cap, 100 new tokens
    assert [r["num_images"] for r in rounds] == [1 + len(r["crops"]) for r in rounds]
    if len(rounds) == 2:
        assert len(rounds[1]["crops"]) == len(rounds[0]["boxes"])  # round 1 carries round 0's planned crops


def test_egg_refuses_an_image_smaller_than_min_crop(gm):
    row = {"id": "tiny-image-7", "image": Image.new("RGB", (60, 60), "white"), "question": "What is shown?"}
    with pytest.raises(GroundingError, match="tiny-image-7.*min_crop"):
        build_method("entropy_gradient", min_crop=112, max_new_tokens=1).run(gm, row)


def test_bad_options_are_named():
    with pytest.raises(GroundingError, match="max_rounds"):
        egg.EntropyGradientGrounding(max_rounds=-1)


# -------------------------------------------------------------------------------------- the returned round's plumbing


def _blobs(shape: tuple[int, int], *blobs: tuple[str, float]) -> np.ndarray:
    """A relevance grid: small noise plus 2 x 2 blobs at the named corners ("tl", "br") with the given value."""
    h, w = shape
    grid = np.full((h, w), 1e-3)
    for corner, value in blobs:
        rows, cols = (slice(0, 2), slice(0, 2)) if corner == "tl" else (slice(h - 2, h), slice(w - 2, w))
        grid[rows, cols] = value
    return grid


def test_egg_returns_the_returned_rounds_maps_and_the_top_regions_statistic(gm, rows, monkeypatch):
    """Scripted relevance (the model's own passes are checked elsewhere), max_rounds 1, top_k 1:

    * round 0, image 0: two blobs (top-left 1.0, bottom-right 0.6), so H_0 > 0 and the loop goes on with one crop;
    * round 1, image 0: one faint blob (bottom-right, 0.1); the crop: two strong blobs (5.0 and 3.0). The top region
      is on the crop, so H_1 is the crop map's statistic (> 0), not image 0's (one blob: 0), as the authors index
      ``ents[stack_idx]``; round 1 is returned (the cap), so the result's map is round 1's image-0 map, not round 0's.
    """
    row = rows[1]
    calls = []

    def scripted(gm_, images, question):
        shapes = gm_.inputs(images, question)["grids"]
        shapes = [s[0] if isinstance(s, list) else s for s in shapes]
        if len(images) == 1:
            grids = [_blobs(shapes[0], ("tl", 1.0), ("br", 0.6))]
        else:
            grids = [_blobs(shapes[0], ("br", 0.1)), _blobs(shapes[1], ("tl", 5.0), ("br", 3.0))]
        calls.append(grids)
        return grids, 1.0

    monkeypatch.setattr(egg, "entropy_relevance", scripted)
    res = build_method("entropy_gradient", max_rounds=1, top_k=1, max_new_tokens=1).run(gm, row)
    assert len(calls) == 2 and res.extras["returned_round"] == 1
    round0, round1 = res.extras["rounds"]
    assert round0["sources"] == [0] and round1["sources"] == [1]  # round 1's top region lies on the crop
    h0 = egg.stopping_entropy(calls[0][0])
    crop_h, image0_h = egg.stopping_entropy(calls[1][1]), egg.stopping_entropy(calls[1][0])
    assert 0 < h0 < egg.START_ENTROPY and image0_h == 0 < crop_h
    assert round0["stop_entropy"] == pytest.approx(h0) and round1["stop_entropy"] == pytest.approx(crop_h)
    (got,) = res.maps
    want = calls[1][0]
    np.testing.assert_allclose(got / got.sum(), want / want.sum(), rtol=1e-6)
