"""LASER: query-contrastive attention picks the layer, crops around the evidence, and drives counterfactual decoding.

LASER (Zhu et al., arXiv 2602.04304) has no released code, and klal worked from the paper's abstract and secondary
summaries only: every step below is klal's reading, and those the sources leave open are listed under "Choices".
docs/grounding.md gives, for each, the sentence of the sources it interprets.

1. **Contrastive attention.** For every layer ``l`` and head ``h``, the last prompt token's attention over the visual
   tokens is read twice, once for the question and once for the query-free prompt
   :data:`~klal.grounding.base.GENERIC_PROMPT`: ``A_con(l, h) = ReLU(A_with(l, h) - A_without(l, h))``.
2. **VAQ (visual activation by query).** ``VAQ(l)`` = mean over the ``top_heads`` heads with the largest
   ``||A_con(l, h)||_2`` of that norm; ``l* = argmax_l VAQ(l)`` (:func:`vaq_scores`).
3. **Con-ViCrop.** The relevance map is the head-mean of ``A_con(l*)``; the crop is the best window of about half
   the image side on image 0's grid (:func:`klal.grounding.ops.best_window`), grown to at least ``min_crop`` px.
4. **Counterfactual decoding.** The negative view is image 0 (every image, for multi-image samples) with the
   ``top-K`` cells of the map greyed out (:func:`grey_out`). At each greedy step, with ``z+`` the next-token logits
   for ``[original images, crop]`` and ``z-`` those for ``[negative views, crop]`` (same question, same tokens so
   far), the step uses ``s = z+ + alpha (z+ - z-)`` (:func:`contrastive_logits`) when the step passes the VAT
   gate, else ``z+``.

Choices:

* **Attention normalisation.** ``A_with`` / ``A_without`` come from :meth:`GroundingModel.attention`: each head's
  row renormalised over the visual tokens. Both are then distributions over the same tokens, so their difference
  says where the question moves attention, not how much attention the image gets overall.
* **Heads.** ``top_heads=4`` by default, clamped to the model's head count (the tiny test model has 4).
* **Map and fallback.** The map is the mean over *all* heads of ``A_con(l*)``. If it is zero everywhere (the question
  moved no attention, e.g. it equals the generic prompt) the map falls back to the head-mean of ``A_with(l*)``
  (``extras["fallback"] = True``) rather than cropping at an arbitrary corner.
* **Crop window.** One window size, ``ceil(crop_frac * gh) x ceil(crop_frac * gw)`` cells with ``crop_frac=0.5``
  ("about half the image"), then grown to ``min_crop`` px per side. ``min_crop=112`` by default so the small
  synthetic test images fit; the source says 224 px, which real benchmarks should set. An image smaller than
  ``min_crop`` is an error naming the sample. The crop is zoomed to the image's area like ViCrop's
  (:func:`klal.grounding.crop.crop_image`).
* **Negative view.** ``K = max(1, round(grey_fraction * V))`` cells with the largest map value (``grey_fraction=0.1``
  of all visual tokens; cells whose value is 0 are never greyed), each filled with mid-grey ``(128, 128, 128)`` over
  its pixel box in the original image (cell ``(r, c)`` of a ``gh x gw`` grid covers ``W / gw x H / gh`` px; edges
  rounded to whole pixels so neighbouring cells partition the image). The crop stays in the negative input, so the
  contrast isolates the evidence patches of the full view.
* **VAT gate (visual activation of tokens).** Our concrete rule: a step is contrasted when the positive view is
  *not* confident, ``max softmax(z+) < vat_threshold`` (default 0.9). Confident steps (formatting tokens,
  continuations the image already settles) keep ``z+`` unchanged and cost no negative pass. ``vat_threshold=0``
  never contrasts; any value above 1 always contrasts. The source's VAT is described as a test of whether the token
  is visually supported; a per-step attention test would need a capture pass per token, which this confidence
  proxy avoids.
* **Plausibility.** After the contrast, tokens with ``p+(t) < plausibility * max p+`` are excluded
  (``plausibility=0.1``, the adaptive plausibility constraint of visual contrastive decoding), so the contrast can
  only reorder tokens the positive view finds plausible; ``plausibility=0`` disables it.
* ``alpha=1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from klal.geometry import Footprint
from klal.grounding import ops
from klal.grounding.base import GENERIC_PROMPT, GroundingMethod, GroundingResult
from klal.grounding.crop import crop_image, whole_pixel_box
from klal.grounding.options import option
from klal.grounding.vicrop import select_crop
from klal.session import GroundingModel

GREY = (128, 128, 128)

# ----------------------------------------------------------------------------------------------- pure functions


def contrastive_attention(a_with: torch.Tensor, a_without: torch.Tensor) -> torch.Tensor:
    """``ReLU(a_with - a_without)`` (shapes must match)."""
    if a_with.shape != a_without.shape:
        raise ValueError(f"a_with {tuple(a_with.shape)} and a_without {tuple(a_without.shape)} must match")
    return (a_with - a_without).clamp(min=0)


def vaq_scores(a_with: torch.Tensor, a_without: torch.Tensor, top_k: int) -> torch.Tensor:
    """Visual activation by query per layer.

    Args:
        a_with: ``(L, H, V)`` attention over visual tokens with the question.
        a_without: ``(L, H, V)`` the same without it (generic prompt).
        top_k: heads averaged per layer (those with the largest contrast norm); clamped to ``H``.

    Returns:
        ``(L,)``: ``mean over the top_k heads of ||ReLU(a_with - a_without)||_2`` per layer.
    """
    if a_with.dim() != 3:
        raise ValueError(f"a_with must be (L, H, V), got shape {tuple(a_with.shape)}")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    norms = contrastive_attention(a_with, a_without).float().norm(dim=-1)  # (L, H)
    k = min(top_k, norms.shape[1])
    return norms.topk(k, dim=1).values.mean(dim=1)


def grey_out(
    image: Image.Image,
    cell_boxes: Sequence[Sequence[int]],
    grid_hw: tuple[int, int] | Footprint,
    value: tuple[int, int, int] = GREY,
) -> Image.Image:
    """A copy of ``image`` with the pixels of the given grid-cell boxes filled with ``value``.

    A cell box ``(r0, c0, r1, c1)`` (end-exclusive) covers the pixels of its tokens' footprints,
    :func:`klal.grounding.ops.cells_to_pixels`, with both edges rounded (with equal cells
    ``[round(c0 * W / gw), round(c1 * W / gw))`` x ``[round(r0 * H / gh), round(r1 * H / gh))`` px): rounding both
    edges the same way makes adjacent cells share no pixel and leave none out.

    Args:
        image: the original image (any mode; the copy is RGB).
        cell_boxes: boxes in ``grid_hw`` cells.
        grid_hw: the image's map-grid footprint (:func:`klal.grounding.ops.footprint_of`), or ``(gh, gw)`` for equal
            cells.
        value: RGB fill.
    """
    out = np.array(image.convert("RGB"))
    h, w = out.shape[:2]
    for box in cell_boxes:
        x0, y0, x1, y1 = ops.cells_to_pixels(tuple(box), grid_hw, (w, h))
        out[round(y0) : round(y1), round(x0) : round(x1)] = value
    return Image.fromarray(out)


def contrastive_logits(
    z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float = 1.0, plausibility: float = 0.0
) -> torch.Tensor:
    """``z+ + alpha (z+ - z-)``, with tokens implausible under the positive view excluded.

    Args:
        z_pos: ``(vocab,)`` logits on the positive input.
        z_neg: ``(vocab,)`` logits on the negative input.
        alpha: contrast strength (0 returns ``z_pos``).
        plausibility: tokens with ``softmax(z_pos) < plausibility * max softmax(z_pos)`` get ``-inf``; 0 keeps all.
    """
    if z_pos.shape != z_neg.shape:
        raise ValueError(f"z_pos {tuple(z_pos.shape)} and z_neg {tuple(z_neg.shape)} must match")
    s = z_pos + alpha * (z_pos - z_neg)
    if plausibility > 0:
        # p(t) < beta * p_max  <=>  z(t) < z_max + log(beta): compare logits, no softmax underflow.
        implausible = z_pos < z_pos.max() + math.log(plausibility)
        s = s.masked_fill(implausible, float("-inf"))
    return s


def top_cells(grid_vec: torch.Tensor | np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest entries that are > 0 (largest first; ties: lower index first)."""
    v = np.asarray(grid_vec.detach().cpu() if torch.is_tensor(grid_vec) else grid_vec, dtype=np.float64).ravel()
    order = np.argsort(-v, kind="stable")[:k]
    return [int(i) for i in order if v[i] > 0]


# --------------------------------------------------------------------------------------------------------- method


class Laser(GroundingMethod, name="laser"):
    """LASER: VAQ layer choice, Con-ViCrop and VAT-gated counterfactual decoding (see the module docstring)."""

    answers = True

    @dataclass(frozen=True)
    class Options:
        top_heads: int = option(4, ge=1)
        """Heads per layer averaged by VAQ (clamped to the head count)."""
        crop_frac: float = option(0.5, gt=0, le=1)
        """Crop window side as a fraction of each grid side."""
        min_crop: float = option(112.0, ge=0)
        """Minimum crop side in original pixels (an image smaller than this on an axis is refused)."""
        zoom: bool = True
        """Upscale the crop to the original image's area before answering."""
        grey_fraction: float = option(0.1, gt=0, le=1)
        """Fraction of visual tokens greyed out in the negative view."""
        alpha: float = option(1.0, ge=0)
        """Contrast strength."""
        vat_threshold: float = option(0.9, ge=0)
        """Steps whose positive max-probability is below this are contrasted."""
        plausibility: float = option(0.1, ge=0, lt=1)
        """Adaptive plausibility cut-off."""
        max_new_tokens: int = option(16, ge=1)
        """Answer length cap."""

    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Image.Image]) -> GroundingResult:
        """Map, crop and answer one row."""
        opts = self.options
        question = sample["question"]

        # 1-2: contrastive attention and the layer it peaks at.
        inputs = gm.inputs(images, question)
        a_with = gm.attention(inputs, per_head=True).float()  # (L, H, V)
        a_without = gm.attention(gm.inputs(images, GENERIC_PROMPT), per_head=True).float()
        vaq = vaq_scores(a_with, a_without, opts.top_heads)
        layer = int(vaq.argmax())
        rel = contrastive_attention(a_with[layer], a_without[layer]).mean(dim=0)  # (V,)
        fallback = not bool((rel > 0).any())
        if fallback:
            rel = a_with[layer].mean(dim=0)
        grids = inputs["grids"]
        maps = gm.split_grid(rel, inputs["layout"], inputs["image_wh"])

        # 3: Con-ViCrop.
        gh, gw = maps[0].shape
        size = (math.ceil(opts.crop_frac * gh), math.ceil(opts.crop_frac * gw))
        cell_box, box_px = select_crop(
            maps[0], [size], images[0].size, opts.min_crop, ops.footprint_of(gm, images[0].size)
        )
        crop_box = tuple(float(v) for v in whole_pixel_box(images[0], box_px))
        crop = crop_image(images[0], crop_box, opts.zoom)

        # 4: negative views and VAT-gated counterfactual decoding.
        # Cells of the images' maps, in order (on single-grid families exactly the visual tokens of ``rel``).
        cells_vec = np.concatenate([m.ravel() for m in maps])
        k = max(1, round(opts.grey_fraction * cells_vec.size))
        chosen = top_cells(cells_vec, k)
        negatives, offset, greyed = [], 0, []
        for im, (h, w) in zip(images, grids):
            cells = [(i - offset) for i in chosen if offset <= i < offset + h * w]
            boxes = [(c // w, c % w, c // w + 1, c % w + 1) for c in cells]
            negatives.append(grey_out(im, boxes, ops.footprint_of(gm, im.size)) if boxes else im)
            greyed.append(len(boxes))
            offset += h * w
        pos_inputs = gm.inputs([*images, crop], question)
        neg_inputs = gm.inputs([*negatives, crop], question)
        steps = {"contrasted": 0, "plain": 0}

        def logits_fn(z_pos: torch.Tensor, generated: list[int]) -> torch.Tensor:
            if float(torch.softmax(z_pos, dim=-1).max()) >= opts.vat_threshold:
                steps["plain"] += 1
                return z_pos
            steps["contrasted"] += 1
            z_neg = gm.forward(gm.append_tokens(neg_inputs, generated))[0, -1].float()
            return contrastive_logits(z_pos, z_neg, opts.alpha, opts.plausibility)

        answer = gm.generate(pos_inputs, opts.max_new_tokens, logits_fn=logits_fn)
        extras = {
            "layer": layer,
            "vaq": [float(v) for v in vaq],
            "fallback": fallback,
            "window_cells": list(cell_box),
            "crop_box": list(crop_box),
            "crop_size": [crop.width, crop.height],
            "greyed_cells": greyed,
            "steps": steps,
        }
        return GroundingResult(maps=maps, boxes=[crop_box], answer=answer, extras=extras)


__all__ = [
    "GREY",
    "Laser",
    "contrastive_attention",
    "contrastive_logits",
    "grey_out",
    "top_cells",
    "vaq_scores",
]
