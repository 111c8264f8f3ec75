"""ViCrop: attention-guided cropping, then answering from the original image(s) plus the crop.

Two relevance maps over the visual tokens, both read at ONE language-model layer from the last prompt token (the
position that predicts the first answer token):

* ``vicrop_rel_att`` (relative attention): the head mean of the RAW attention (each head's full softmax row over
  the image tokens, not renormalised) for the question, divided elementwise by the same map for the query-free prompt
  :data:`~klal.grounding.base.GENERIC_PROMPT` (:func:`raw_attention`, :func:`relative_attention`). Regions the model
  looks at for *any* prompt (attention sinks, salient clutter) cancel; regions the question draws attention to stand
  out. 2 forward passes.
* ``vicrop_grad_att`` (gradient-weighted attention): the attention probabilities ``A`` (per head, the full softmax
  row restricted to visual keys) times ``ReLU(dlog p(top) / dA)``, averaged over heads (:func:`grad_attention`), where
  ``top`` is the most likely next token. Keys whose extra attention would raise the answer's probability count.
  1 forward + 1 backward pass.

Both prompts end with :data:`ANSWER_SUFFIX` (" Answer the question using a single word or phrase."), as the authors'
do (option ``prompt_suffix``); the answer prompt carries it too. The crop is the authors' adaptive box
(:func:`crop_box`: six window sizes from ``box_size`` = 224 px to twice that, the sharpest attention peak wins),
cut from image 0 and appended at its own size: the model answers from ``[*original images, crop]``.
``crop="square"`` selects klal's earlier best square window (:func:`square_window_sizes`,
:func:`klal.grounding.ops.best_window`).

Defaults follow the authors' Qwen2.5-VL path (saccharomycetes/mllms_know ``run.py`` and ``qwen2_5_methods.py``;
docs/grounding.md has the table with the source lines):

* **Layer.** ``layer=None`` reads the authors' layer for the checkpoints their code runs on
  (:data:`AUTHORS_LAYERS`: 22 on Qwen2.5-VL-3B-Instruct's 36 layers and on the 7B's 28) and, on any other model, the
  same relative depth ``round(22 / 36 * num_layers)`` (clamped to the last layer; the tiny 4-layer test model gets
  layer 2). The result says which (``extras["layer_source"]``: ``authors``, ``relative_depth`` or ``option``).
* **Division.** ``a_q / a_generic`` as the authors divide (``eps=0``); a generic attention of exactly 0 is then an
  error naming the sample, and a positive ``eps`` (``a_q / (a_generic + eps)``) keeps such a ratio finite.
* **Zoom.** The crop goes to the processor at its own size, as in the authors' Qwen path (with their
  ``max_pixels`` of 256 x 28 x 28, klal's default too, a 224 px crop is 64 visual tokens). ``zoom=True`` upscales it
  (bicubic, aspect kept) to the original image's area first, so it gets up to the original's token budget.
* **Decoding.** ``model.generate(do_sample=False)`` under the checkpoint's generation config with 20 new tokens, as
  the authors answer (``decoding``, ``max_new_tokens``); ``decoding="greedy"`` is klal's argmax loop.
* **Minimum crop.** ``min_crop=0`` by default (the adaptive box is already ``box_size`` px or the whole image); a
  positive value grows the crop and refuses smaller images, naming the sample.
* **Multi-image samples.** Maps cover every image; the crop is taken from image 0 (result boxes are in image-0
  pixels) and appended after all original images.
* **grad-att.** The authors' Qwen path runs rel-att only; grad-att is their LLaVA function
  (``llava_methods.gradient_attention_llava``) read at the same layer, box and prompts as rel-att here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from klal.decode import Decoding
from klal.geometry import Footprint
from klal.grounding import ops
from klal.grounding.base import GENERIC_PROMPT, GroundingMethod, GroundingResult
from klal.grounding.crop import crop_image, whole_pixel_box
from klal.grounding.options import option
from klal.models.identity import model_name, same_name
from klal.session import GroundingError, GroundingModel

AUTHORS_LAYERS: dict[str, tuple[int, int]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": (36, 22),
    "Qwen/Qwen2.5-VL-7B-Instruct": (28, 22),
}
"""The checkpoints the authors' Qwen2.5-VL code runs on, with their layer count and the layer it reads
(``qwen2_5_methods.py``: ``ATT_LAYER = 22``, a constant of the Qwen path whatever Qwen2.5-VL it loads; ``info.py``
names Qwen2.5-VL-3B-Instruct, and the 7B is the same code path, so it reads layer 22 too, not the 3B's relative
depth, which would give 17)."""

DEFAULT_RELATIVE_DEPTH = 22 / 36
"""The layer of any other model as a fraction of its depth: the authors' 22 of Qwen2.5-VL-3B's 36."""


# ----------------------------------------------------------------------------------------------- pure functions


def default_layer(num_layers: int, name: str | None = None) -> tuple[int, str]:
    """The layer ``layer=None`` reads, and where it comes from.

    Args:
        num_layers: the model's language layers (>= 1).
        name: the checkpoint's name or path (a hub id, its snapshot path or a copy's folder name match).

    Returns:
        ``(layer, "authors")`` for a checkpoint of :data:`AUTHORS_LAYERS` with its layer count, else
        ``(round(DEFAULT_RELATIVE_DEPTH * num_layers) clamped to [0, num_layers - 1], "relative_depth")``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    for checkpoint, (depth, layer) in AUTHORS_LAYERS.items():
        if name is not None and depth == num_layers and same_name(checkpoint, name):
            return layer, "authors"
    return min(max(round(DEFAULT_RELATIVE_DEPTH * num_layers), 0), num_layers - 1), "relative_depth"


def relative_attention(a_q: torch.Tensor, a_generic: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """ViCrop rel-att: ``a_q / (a_generic + eps)`` elementwise (the authors: ``eps`` 0).

    Args:
        a_q: attention for the question (any shape, non-negative).
        a_generic: the same map for the generic prompt (same shape).
        eps: added to ``a_generic``; >= 0. A positive value keeps the ratio finite where the generic prompt gives
            no attention.

    Raises:
        ValueError: shapes differ, ``eps`` < 0, or a zero in ``a_generic + eps`` (the ratio would be infinite).
    """
    if a_q.shape != a_generic.shape:
        raise ValueError(f"a_q {tuple(a_q.shape)} and a_generic {tuple(a_generic.shape)} must have the same shape")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    denominator = a_generic + eps
    if bool((denominator == 0).any()):
        raise ValueError(
            f"the generic prompt gives {int((denominator == 0).sum())} visual token(s) exactly zero attention, so "
            "the ratio is infinite there; set option eps > 0"
        )
    return a_q / denominator


def grad_attention(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ViCrop grad-att: ``mean_h(a * ReLU(grad))``.

    Args:
        a: ``(H, V)`` attention probabilities of one query row over the visual keys, per head.
        grad: ``(H, V)`` gradient of the objective (the top token's log-prob) with respect to ``a``.

    Returns:
        ``(V,)`` non-negative relevance.
    """
    if a.shape != grad.shape or a.dim() != 2:
        raise ValueError(f"a {tuple(a.shape)} and grad {tuple(grad.shape)} must both be (H, V)")
    return (a * grad.clamp(min=0)).mean(dim=0)


def square_window_sizes(grid_hw: tuple[int, int], scales: Sequence[float]) -> list[tuple[int, int]]:
    """Square window sizes ``(s, s)`` in cells, ``s = max(1, round(scale * min(gh, gw)))``, duplicates dropped.

    Args:
        grid_hw: ``(gh, gw)`` of the grid the window slides over.
        scales: fractions of the shorter grid side, each in ``(0, 1]``.
    """
    side = min(grid_hw)
    out: list[tuple[int, int]] = []
    for s in scales:
        n = max(1, round(float(s) * side))
        if (n, n) not in out:
            out.append((n, n))
    return out


def select_crop(
    grid: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    image_wh: tuple[float, float],
    min_crop: float,
    footprint: Footprint | None = None,
) -> tuple[ops.CellBox, ops.PixelBox]:
    """Best window of ``grid`` (over ``sizes``) as a cell box, and as a pixel box grown to ``min_crop`` px per side
    (the window's tokens' footprints; None: equal cells over the image).

    Raises:
        CropTooSmallError: the image is smaller than ``min_crop`` on some axis.
    """
    cell_box, _ = ops.best_window(grid, sizes)
    box_px = ops.cells_to_pixels(cell_box, footprint or grid.shape, image_wh)
    return cell_box, ops.expand_box(box_px, min_crop, image_wh)


ADAPTIVE_RATIOS = (1, 1.2, 1.4, 1.6, 1.8, 2)
"""Window sides tried by :func:`crop_box`, as multiples of ``box_size`` (the authors' ratios)."""

ANSWER_SUFFIX = " Answer the question using a single word or phrase."
"""Appended to the question and to the generic prompt by default, as the authors' prompts do."""


def crop_box(attention_grid: np.ndarray, image_size: tuple[int, int], box_size: int = 224) -> tuple[int, int, int, int]:
    """The authors' adaptive ViCrop box: the sharpest of six window sizes around the attention peak.

    A cell of the ``(gh, gw)`` grid is a block of ``bw = W / gw`` x ``bh = H / gh`` original pixels. For each ratio
    ``r`` of :data:`ADAPTIVE_RATIOS`, a window of ``box_size * r`` px is ``nx = min(int(box_size * r / bw), gw)`` x
    ``ny = min(int(box_size * r / bh), gh)`` blocks (at least 1 each; the authors' code would divide by 0 there). A
    window covering the whole grid on both axes is skipped, and if even ratio 1 covers it the crop is the whole
    image. The window with the largest attention sum wins for its ratio (scanning ``x`` in the outer loop and ``y``
    in the inner one, the first maximum found); its sharpness is that sum minus the mean of the sums of the (up to
    four) windows one block left, right, up and down, divided by ``nx * ny``. The sharpest ratio wins (the first on
    ties). Its centre ``cx = int(x * bw + bw * nx / 2)`` (likewise ``cy``) is clamped to ``[half, W - half]`` with
    ``half = floor(box_size * r / 2)``, and the crop is ``(max(0, cx - half), max(0, cy - half), min(W, cx + half),
    min(H, cy + half))``.

    Args:
        attention_grid: finite 2-D attention (relevance) grid over the image's tokens.
        image_size: ``(W, H)`` of the original image in pixels.
        box_size: the base crop side in pixels (the authors' encoder input side: 224 for BLIP, 336 for LLaVA).

    Returns:
        ``(x0, y0, x1, y1)`` in original pixels.
    """
    att = ops._as_grid(attention_grid, "attention_grid")
    gh, gw = att.shape
    if len(image_size) != 2 or any(int(v) != v or v <= 0 for v in image_size):
        raise ValueError(f"image_size must be two positive integers (W, H), got {tuple(image_size)}")
    width, height = int(image_size[0]), int(image_size[1])
    if isinstance(box_size, bool) or not isinstance(box_size, (int, np.integer)) or box_size < 1:
        raise ValueError(f"box_size must be a positive integer of pixels, got {box_size!r}")
    bw, bh = width / gw, height / gh
    best: tuple[float, float, int, int, int, int] | None = None  # (sharpness, ratio, x, y, nx, ny)
    for ratio in ADAPTIVE_RATIOS:
        side = box_size * ratio
        nx = max(1, min(int(side / bw), gw))
        ny = max(1, min(int(side / bh), gh))
        if gw - nx < 1 and gh - ny < 1:
            if ratio == 1:
                return 0, 0, width, height
            continue
        # sums[y, x]: attention inside the window whose top-left block is (x, y). Every window is summed the same
        # way (no integral image), so windows over equal values tie exactly and the scan order decides.
        sums = np.lib.stride_tricks.sliding_window_view(att, (ny, nx)).sum(axis=(-2, -1))
        # First maximum with x in the outer loop: argmax over the transposed (x-major) array.
        x, y = np.unravel_index(int(np.argmax(sums.T)), sums.T.shape)
        peak = float(sums[y, x])
        around = [float(sums[y, x + dx]) for dx in (-1, 1) if 0 <= x + dx < sums.shape[1]]
        around += [float(sums[y + dy, x]) for dy in (-1, 1) if 0 <= y + dy < sums.shape[0]]
        sharpness = (peak - float(np.mean(around))) / (nx * ny)
        if best is None or sharpness > best[0]:
            best = (sharpness, ratio, int(x), int(y), nx, ny)
    assert best is not None  # ratio 1 either returned or was scored
    _, ratio, x, y, nx, ny = best
    half = (box_size * ratio) // 2
    cx = int(x * bw + bw * nx / 2)
    cy = int(y * bh + bh * ny / 2)
    cx = min(max(cx, half), width - half)
    cy = min(max(cy, half), height - half)
    return int(max(0, cx - half)), int(max(0, cy - half)), int(min(width, cx + half)), int(min(height, cy + half))


def raw_attention(gm: GroundingModel, inputs: dict[str, Any], layer: int) -> torch.Tensor:
    """``(V,)`` head mean of the last prompt token's RAW attention over the visual tokens at ``layer``.

    Raw: each head's full softmax row (over all keys) restricted to the visual tokens, not renormalised, as the
    authors read ``outputs.attentions[layer][0, :, -1, image tokens].mean(0)``. One forward pass.
    """
    req = gm.request(inputs, layers=[layer], per_head=True, differentiable_rows=True)
    try:
        with torch.no_grad():
            gm.forward(inputs, req)
        probs = req.full_probs[gm.attention_layers[layer]]  # (1, H, 1, S)
        vis = inputs["visual_mask"][0].nonzero().squeeze(-1).to(probs.device)
        return probs[0, :, 0][:, vis].float().mean(dim=0)  # (V,)
    finally:
        req.clear()


# --------------------------------------------------------------------------------------------------------- methods


class _ViCrop(GroundingMethod):
    """Shared ViCrop pipeline; subclasses provide the relevance vector over all visual tokens."""

    answers = True

    @dataclass(frozen=True)
    class Options:
        layer: int | None = None
        """Language-model layer to read (negative counts from the end); None: the authors' layer where they name the
        checkpoint, else the same relative depth (:func:`default_layer`)."""
        crop: Literal["adaptive", "square"] = "adaptive"
        """Crop selection: the authors' adaptive box (:func:`crop_box`, ``box_size``) or klal's earlier best square
        window (:func:`square_window_sizes`, ``scales``)."""
        box_size: int = option(224, ge=1)
        """Base side in pixels of the adaptive box (the authors': the encoder input, 224 for BLIP, 336 for LLaVA)."""
        scales: tuple[float, ...] = option((0.25, 0.5, 0.75), gt=0, le=1)
        """Square window sides as fractions of the shorter grid side (``crop="square"``)."""
        min_crop: float = option(0.0, ge=0)
        """Minimum crop side in original pixels (0: none, the authors; an image smaller than this is refused)."""
        prompt_suffix: str = ANSWER_SUFFIX
        """Appended to the question (attention and answer) and to the generic prompt; "" for the bare question."""
        zoom: bool = False
        """Upscale the crop to the original image's area before answering (False: the crop at its own size, as the
        authors' Qwen path gives it to the processor)."""
        max_new_tokens: int = option(20, ge=1)
        """Answer length cap (the authors' 20)."""
        decoding: Decoding = "generation_config"
        """Answer decoding: ``generation_config`` (``model.generate(do_sample=False)``, as the authors) or ``greedy``
        (klal's argmax loop)."""

    def relevance(
        self, gm: GroundingModel, images: list[Image.Image], inputs: dict[str, Any], layer: int
    ) -> torch.Tensor:
        """``(V,)`` non-negative relevance of every visual token (all images, sequence order).

        Args:
            gm: the model.
            images: the sample's images.
            inputs: ``gm.inputs(images, question)``.
            layer: the (validated, non-negative) layer to read.
        """
        raise NotImplementedError

    def layer_index(self, gm: GroundingModel, sample_id: Any) -> tuple[int, str]:
        """Option ``layer`` (default :func:`default_layer`) as an index into the model's layers, and its source
        (``authors``, ``relative_depth`` or ``option``), or GroundingError."""
        n = gm.num_layers
        if self.options.layer is None:
            return default_layer(n, model_name(gm.model))
        layer = self.options.layer
        if not -n <= layer < n:
            raise GroundingError(
                f"{self.name}: option layer={layer} is out of range for a model with {n} layers (sample {sample_id!r})"
            )
        return layer % n, "option"

    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Image.Image]) -> GroundingResult:
        """Map, crop and answer one row."""
        opts = self.options
        layer, layer_source = self.layer_index(gm, sample.get("id"))
        question = sample["question"] + opts.prompt_suffix
        inputs = gm.inputs(images, question)
        try:
            rel = self.relevance(gm, images, inputs, layer)
        except GroundingError:
            raise
        except ValueError as e:  # the ratio's zero denominator: name the sample and the option
            raise GroundingError(f"{self.name}: sample {sample.get('id')!r}: {e}") from e
        maps = gm.split_grid(rel, inputs["layout"], inputs["image_wh"])
        if opts.crop == "adaptive":
            box_px = ops.expand_box(crop_box(maps[0], images[0].size, opts.box_size), opts.min_crop, images[0].size)
            cell_box = ops.pixels_to_cells(box_px, ops.footprint_of(gm, images[0].size), images[0].size)
        else:
            sizes = square_window_sizes(maps[0].shape, opts.scales)
            fp = ops.footprint_of(gm, images[0].size)
            cell_box, box_px = select_crop(maps[0], sizes, images[0].size, opts.min_crop, fp)
        cut = tuple(float(v) for v in whole_pixel_box(images[0], box_px))
        crop = crop_image(images[0], cut, opts.zoom)
        answer = gm.generate(gm.inputs([*images, crop], question), opts.max_new_tokens, decoding=opts.decoding)
        extras = {
            "layer": layer,
            "layer_source": layer_source,
            "window_cells": list(cell_box),
            "crop_box": list(cut),
            "crop_size": [crop.width, crop.height],
        }
        return GroundingResult(maps=maps, boxes=[cut], answer=answer, extras=extras)


class ViCropRelAtt(_ViCrop, name="vicrop_rel_att"):
    """ViCrop with relative attention (question attention / generic-prompt attention at one layer)."""

    @dataclass(frozen=True)
    class Options(_ViCrop.Options):
        eps: float = option(0.0, ge=0)
        """Added to the generic-prompt map before dividing (the authors: none; a zero generic attention is then an
        error naming the sample)."""
        attention: Literal["raw", "renormalised"] = "raw"
        """Map of each prompt: the head mean of the raw attention over the image tokens (the authors), or of each
        head's attention renormalised over them (klal's earlier choice, :meth:`GroundingModel.attention`)."""

    def relevance(
        self, gm: GroundingModel, images: list[Image.Image], inputs: dict[str, Any], layer: int
    ) -> torch.Tensor:
        """Head-mean visual attention for the question over that for :data:`GENERIC_PROMPT`, at ``layer``."""
        opts = self.options
        generic = gm.inputs(images, GENERIC_PROMPT + opts.prompt_suffix)
        if opts.attention == "raw":
            a_q, a_g = raw_attention(gm, inputs, layer), raw_attention(gm, generic, layer)
        else:
            a_q = gm.attention(inputs, layers=[layer], per_head=False)[0]
            a_g = gm.attention(generic, layers=[layer], per_head=False)[0]
        return relative_attention(a_q.float(), a_g.float(), opts.eps)


class ViCropGradAtt(_ViCrop, name="vicrop_grad_att"):
    """ViCrop with gradient-weighted attention (attention x ReLU of d log p(top token) / d attention)."""

    def relevance(
        self, gm: GroundingModel, images: list[Image.Image], inputs: dict[str, Any], layer: int
    ) -> torch.Tensor:
        """``mean_h(A * ReLU(dlog p(top) / dA))`` over the visual keys of the last prompt token at ``layer``."""
        req = gm.request(inputs, layers=[layer], per_head=True, differentiable_rows=True)
        try:
            with torch.enable_grad():
                logits = gm.forward(inputs, req)
                logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
                top = int(logp.argmax())
                gm.backward(logp[top])
            probs = req.full_probs[gm.attention_layers[layer]]  # (1, H, 1, S)
            if probs.grad is None:
                raise RuntimeError(f"no gradient reached the attention of layer {layer} (differentiable_rows path)")
            vis = inputs["visual_mask"][0].nonzero().squeeze(-1)
            a = probs.detach()[0, :, 0][:, vis].float()  # (H, V)
            g = probs.grad[0, :, 0][:, vis].float()
        finally:
            req.clear()
        return grad_attention(a, g)


__all__ = [
    "ADAPTIVE_RATIOS",
    "ANSWER_SUFFIX",
    "AUTHORS_LAYERS",
    "DEFAULT_RELATIVE_DEPTH",
    "ViCropGradAtt",
    "ViCropRelAtt",
    "crop_box",
    "default_layer",
    "grad_attention",
    "raw_attention",
    "relative_attention",
    "select_crop",
    "square_window_sizes",
]
