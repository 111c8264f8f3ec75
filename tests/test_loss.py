"""KLAL against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from klal.loss import klal_loss


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_klal_matches_hand_computation_two_layers():
    # One sample, 3 visual tokens, one query, two layers.
    p = [0.5, 0.5, 0.0]
    q1 = [0.2, 0.3, 0.5]
    q2 = [0.6, 0.3, 0.1]
    log_q = torch.log(torch.tensor([[[q1]], [[q2]]]))  # (L=2, B=1, A=1, V=3)
    res = klal_loss(
        log_q, torch.tensor([p]), torch.tensor([True]), torch.tensor([[True]]), torch.ones(1, 3).bool(), epsilon=0.0
    )
    expected = 0.5 * (_kl(p, q1) + _kl(p, q2))
    assert res.klal.item() == pytest.approx(expected, rel=1e-6)
    # Mass inside the evidence (cells with p > 0): mean over layers of q[0] + q[1].
    assert res.target_mass.item() == pytest.approx(0.5 * (0.5 + 0.9), rel=1e-6)


def test_epsilon_smoothing_is_uniform_mix():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    q = [0.4, 0.3, 0.2, 0.1]
    eps = 0.1
    res = klal_loss(
        torch.log(torch.tensor([[[q]]])),
        p,
        torch.tensor([True]),
        torch.tensor([[True]]),
        torch.ones(1, 4).bool(),
        epsilon=eps,
    )
    ps = [(1 - eps) * 1.0 + eps / 4, eps / 4, eps / 4, eps / 4]
    assert res.klal.item() == pytest.approx(_kl(ps, q), rel=1e-6)


def test_padding_queries_keys_and_samples_without_map_are_ignored():
    # Sample 0: 2 visual tokens (third is padding), 2 queries of which the second is padding.
    # Sample 1: no map -> excluded from the mean.
    p0 = [0.25, 0.75]
    q0 = [0.6, 0.4]
    log_q = torch.full((1, 2, 2, 3), -1e9)
    log_q[0, 0, 0, :2] = torch.log(torch.tensor(q0))
    log_q[0, 0, 1, :] = math.log(1 / 3)  # padded query row: would change the result if used
    log_q[0, 1] = math.log(1 / 3)
    target = torch.tensor([[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    res = klal_loss(
        log_q,
        target,
        torch.tensor([True, False]),
        torch.tensor([[True, False], [True, True]]),
        torch.tensor([[True, True, False], [True, True, True]]),
        epsilon=0.0,
    )
    assert res.klal.item() == pytest.approx(_kl(p0, q0), rel=1e-6)
    assert res.has_map.tolist() == [True, False]
    assert res.per_sample[1].item() == 0.0


def test_mean_over_queries_then_samples():
    p = [[1.0, 0.0], [0.0, 1.0]]
    qa, qb, qc = [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]
    log_q = torch.log(torch.tensor([[[qa, qb], [qc, qc]]]))  # (1, B=2, A=2, V=2)
    res = klal_loss(
        log_q,
        torch.tensor(p),
        torch.tensor([True, True]),
        torch.tensor([[True, True], [True, False]]),
        torch.ones(2, 2).bool(),
        epsilon=0.0,
    )
    s0 = 0.5 * (_kl(p[0], qa) + _kl(p[0], qb))
    s1 = _kl(p[1], qc)
    assert res.klal.item() == pytest.approx(0.5 * (s0 + s1), rel=1e-6)


def test_no_map_anywhere_gives_zero_loss_with_graph_and_no_nan():
    log_q = torch.log_softmax(torch.randn(2, 2, 1, 4), -1).requires_grad_()
    res = klal_loss(
        log_q, torch.zeros(2, 4), torch.tensor([False, False]), torch.ones(2, 1).bool(), torch.ones(2, 4).bool()
    )
    assert res.klal.item() == 0.0
    res.klal.backward()
    assert log_q.grad is not None and torch.isfinite(log_q.grad).all()


@pytest.mark.parametrize("image_mode", ["joint", "per_image"])
def test_rows_without_visual_tokens_are_excluded_and_an_all_text_batch_gives_zero(image_mode):
    # The capture's placeholder for a row without visual tokens: one invalid key, log q = 0 (uniform over it).
    q = [0.2, 0.3, 0.5]
    p = [0.5, 0.5, 0.0]
    log_q = torch.zeros(2, 2, 1, 3)
    log_q[:, 0, 0] = torch.log(torch.tensor(q))
    log_q.requires_grad_()
    key_image = torch.tensor([[0, 0, 0], [-1, -1, -1]])
    # Row 1 claims a map but has no visual token (a text-only row); it must not count, nor turn anything into NaN.
    res = klal_loss(
        log_q,
        torch.tensor([p, [0.0, 0.0, 0.0]]),
        torch.tensor([True, True]),
        torch.ones(2, 1).bool(),
        torch.tensor([[True, True, True], [False, False, False]]),
        epsilon=0.0,
        key_image=key_image,
        image_mode=image_mode,
    )
    assert res.has_map.tolist() == [True, False]
    assert res.klal.item() == pytest.approx(_kl(p, q), rel=1e-6)
    res.klal.backward()
    assert torch.isfinite(log_q.grad).all()
    # Every row text-only: a zero that still depends on log_q, with a finite gradient.
    log_q0 = torch.zeros(1, 2, 1, 1, requires_grad=True)
    res0 = klal_loss(
        log_q0,
        torch.zeros(2, 1),
        torch.tensor([False, False]),
        torch.ones(2, 1).bool(),
        torch.zeros(2, 1).bool(),
        key_image=torch.full((2, 1), -1),
        image_mode=image_mode,
    )
    assert res0.klal.item() == 0.0 and res0.klal.requires_grad and res0.target_mass.item() == 0.0
    res0.klal.backward()
    assert log_q0.grad is not None and torch.isfinite(log_q0.grad).all()


def test_one_hot_target_and_extreme_attention_stay_finite():
    q = torch.tensor([1.0 - 1e-30, 1e-30, 0.0])
    log_q = torch.log(q.clamp_min(1e-45))[None, None, None].requires_grad_()
    res = klal_loss(
        log_q,
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([True]),
        torch.ones(1, 1).bool(),
        torch.ones(1, 3).bool(),
        epsilon=1e-4,
    )
    assert torch.isfinite(res.klal)
    res.klal.backward()
    assert torch.isfinite(log_q.grad).all()


def test_per_image_mode_renormalises_each_image():
    # Two images of 2 tokens each; evidence only in image 1.
    q = [0.1, 0.3, 0.2, 0.4]
    p = [0.0, 0.0, 0.25, 0.75]
    res = klal_loss(
        torch.log(torch.tensor([[[q]]])),
        torch.tensor([p]),
        torch.tensor([True]),
        torch.ones(1, 1).bool(),
        torch.ones(1, 4).bool(),
        epsilon=0.0,
        key_image=torch.tensor([[0, 0, 1, 1]]),
        image_mode="per_image",
    )
    q_img = [0.2 / 0.6, 0.4 / 0.6]
    assert res.klal.item() == pytest.approx(_kl([0.25, 0.75], q_img), rel=1e-5)
    joint = klal_loss(
        torch.log(torch.tensor([[[q]]])),
        torch.tensor([p]),
        torch.tensor([True]),
        torch.ones(1, 1).bool(),
        torch.ones(1, 4).bool(),
        epsilon=0.0,
    )
    assert joint.klal.item() == pytest.approx(_kl(p, q), rel=1e-5)


def test_gradient_matches_finite_difference():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 2, 5, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(1, 5, dtype=torch.float64), -1)

    def f(x):
        return klal_loss(
            torch.log_softmax(x, -1),
            target,
            torch.tensor([True]),
            torch.ones(1, 2).bool(),
            torch.ones(1, 5).bool(),
            epsilon=1e-3,
        ).klal

    f(logits).backward()
    h = 1e-6
    x = logits.detach().clone()
    for idx in [(0, 0, 0, 1), (1, 0, 1, 4)]:
        xp, xm = x.clone(), x.clone()
        xp[idx] += h
        xm[idx] -= h
        fd = (f(xp) - f(xm)).item() / (2 * h)
        assert logits.grad[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_bad_options():
    with pytest.raises(ValueError, match="epsilon"):
        klal_loss(
            torch.zeros(1, 1, 1, 1),
            torch.ones(1, 1),
            torch.tensor([True]),
            torch.ones(1, 1).bool(),
            torch.ones(1, 1).bool(),
            epsilon=1.0,
        )
    with pytest.raises(ValueError, match="image_mode"):
        klal_loss(
            torch.zeros(1, 1, 1, 1),
            torch.ones(1, 1),
            torch.tensor([True]),
            torch.ones(1, 1).bool(),
            torch.ones(1, 1).bool(),
            image_mode="nope",
        )
