"""The KL attention loss (KLAL) and the attention-mass metric.

For a sample with target distribution ``P`` over its visual tokens and captured attention ``Q_l`` (head-mean,
renormalised over visual tokens) of each selected query at layer ``l``::

    KLAL = mean_l mean_queries KL(P_eps || Q_l),     P_eps = (1 - eps) * P + eps / V

averaged over the samples of the batch that have a map. Forward KL, as in the KLAL paper (arXiv 2511.12738). Samples
without a map contribute nothing and are counted; so do samples without any visual token (text-only samples), even if
``has_target`` claims a map. A batch without any map, or without any visual token, gives a KLAL of exactly 0 that
still depends on ``log_q``, so every data-parallel rank back-propagates through the same parameters.

Several images in one sample:

* ``joint`` (default): ``P`` and ``Q`` are distributions over the concatenation of all the sample's visual tokens;
  the collator gives each image that has evidence an equal share of the target mass.
* ``per_image``: each image with target mass gets its own KL between ``P`` and ``Q`` both renormalised over that
  image's tokens; the sample's KLAL is the mean over those images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class KLALResult:
    """Loss parts of one batch.

    Attributes:
        klal: scalar KLAL averaged over samples with a map (a zero that still depends on ``log_q`` when none has one,
            so every rank of a DDP run sees the same autograd graph).
        per_sample: ``(B,)`` KLAL of each sample (0 where it has no map).
        has_map: ``(B,)`` bool, samples that contributed.
        target_mass: scalar mean share of attention inside the evidence (cells where ``P > 0``), over samples with a
            map, selected queries and layers; NaN-free (0 when no sample has a map).
        target_mass_per_sample: ``(B,)`` that share per sample.
    """

    klal: torch.Tensor
    per_sample: torch.Tensor
    has_map: torch.Tensor
    target_mass: torch.Tensor
    target_mass_per_sample: torch.Tensor

    @property
    def num_with_map(self) -> int:
        """Samples that had a target map."""
        return int(self.has_map.sum().item())


def klal_loss(
    log_q: torch.Tensor,
    target: torch.Tensor,
    has_target: torch.Tensor,
    query_valid: torch.Tensor,
    key_valid: torch.Tensor,
    epsilon: float = 1e-4,
    key_image: torch.Tensor | None = None,
    image_mode: Literal["joint", "per_image"] = "joint",
) -> KLALResult:
    """KLAL between target maps and captured attention.

    Args:
        log_q: ``(L, B, A, V)`` log attention over visual keys from :class:`klal.capture.CaptureRequest`.
        target: ``(B, V)`` target distribution over each sample's visual tokens (zeros on padding); rows with a map
            sum to 1.
        has_target: ``(B,)`` bool, which samples have a map.
        query_valid: ``(B, A)`` bool, real selected queries.
        key_valid: ``(B, V)`` bool, real visual tokens.
        epsilon: label-smoothing weight mixed into ``P`` (uniform over the sample's visual tokens).
        key_image: ``(B, V)`` image index of each visual token within its sample (needed for ``per_image``).
        image_mode: ``joint`` or ``per_image`` (see module docstring).
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"klal epsilon must be in [0, 1), got {epsilon}")
    if log_q.dtype not in (torch.float32, torch.float64):
        log_q = log_q.float()
    target = target.to(device=log_q.device, dtype=log_q.dtype)
    key_valid = key_valid.to(log_q.device)
    query_valid = query_valid.to(log_q.device)
    has_target = has_target.to(log_q.device).bool() & key_valid.any(-1) & query_valid.any(-1)
    kv = key_valid.to(log_q.dtype)  # (B, V)
    qv = query_valid.to(log_q.dtype)  # (B, A)
    inside = ((target > 0) & key_valid).to(log_q.dtype)  # (B, V)

    if image_mode == "joint":
        n_keys = kv.sum(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
        p = ((1.0 - epsilon) * target + epsilon / n_keys) * kv  # (B, V)
        neg_entropy = torch.xlogy(p, p).sum(-1)  # (B,)
        cross = -(p[None, :, None, :] * log_q.masked_fill(~key_valid[None, :, None, :], 0.0)).sum(-1)  # (L, B, A)
        kl = neg_entropy[None, :, None] + cross  # (L, B, A)
        q_in = (log_q.exp() * inside[None, :, None, :]).sum(-1)  # (L, B, A)
    elif image_mode == "per_image":
        if key_image is None:
            raise ValueError("image_mode='per_image' needs key_image (the image index of each visual token)")
        kl, q_in = _per_image_kl(log_q, target, key_valid, key_image.to(log_q.device), epsilon, inside)
    else:
        raise ValueError(f"unknown image_mode {image_mode!r}; choose 'joint' or 'per_image'")

    n_q = qv.sum(-1).clamp_min(1.0)  # (B,)
    per_sample = ((kl * qv[None]).sum(-1) / n_q).mean(0)  # (B,)
    mass = ((q_in * qv[None]).sum(-1) / n_q).mean(0)  # (B,)
    w = has_target.to(log_q.dtype)
    n_maps = w.sum()
    # `* 0` keeps the graph attached when no sample has a map, so DDP's reducer sees the same parameters on all ranks.
    klal = (per_sample * w).sum() / n_maps.clamp_min(1.0) + 0.0 * log_q.sum().clamp(-1.0, 1.0)
    target_mass = (mass * w).sum() / n_maps.clamp_min(1.0)
    return KLALResult(
        klal=klal,
        per_sample=per_sample * w,
        has_map=has_target,
        target_mass=target_mass.detach(),
        target_mass_per_sample=(mass * w).detach(),
    )


def _per_image_kl(
    log_q: torch.Tensor,
    target: torch.Tensor,
    key_valid: torch.Tensor,
    key_image: torch.Tensor,
    epsilon: float,
    inside: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL and inside-mass per image, averaged over the images that carry target mass. Shapes as in klal_loss."""
    n_img = int(key_image[key_valid].max().item()) + 1 if key_valid.any() else 1
    onehot = torch.nn.functional.one_hot(key_image.clamp_min(0), n_img).to(log_q.dtype) * key_valid[..., None]
    # (B, V, K): membership of each visual token in image k.
    member = onehot.bool()
    lq = log_q[..., None].masked_fill(~member[None, :, None], float("-inf"))  # (L, B, A, V, K)
    log_norm = torch.logsumexp(lq, dim=3, keepdim=True)  # (L, B, A, 1, K)
    log_q_img = (lq - log_norm).masked_fill(~member[None, :, None], 0.0)  # (L, B, A, V, K)
    p_mass = (target[..., None] * onehot).sum(1)  # (B, K) target mass in each image
    has_img = p_mass > 0  # (B, K)
    n_keys = onehot.sum(1).clamp_min(1.0)  # (B, K)
    p_img = target[..., None] * onehot / p_mass.clamp_min(1e-30)[:, None, :]
    p_img = ((1.0 - epsilon) * p_img + epsilon / n_keys[:, None, :]) * onehot  # (B, V, K)
    neg_entropy = torch.xlogy(p_img, p_img).sum(1)  # (B, K)
    cross = -(p_img[None, :, None] * log_q_img).sum(3)  # (L, B, A, K)
    kl_img = neg_entropy[None, :, None] + cross  # (L, B, A, K)
    q_in_img = (log_q_img.exp() * member[None, :, None] * inside[None, :, None, :, None]).sum(3)  # (L, B, A, K)
    w = has_img.to(log_q.dtype)[None, :, None]  # (1, B, 1, K)
    n = w.sum(-1).clamp_min(1.0)
    return (kl_img * w).sum(-1) / n, (q_in_img * w).sum(-1) / n
