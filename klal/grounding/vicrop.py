"""ViCrop: attention-guided cropping, then answering from the original image(s) plus the crop.

Two relevance maps over the visual tokens, both read at ONE language-model layer from the last prompt token (the
position that predicts the first answer token):

* ``vicrop_rel_att`` (relative attention): the head-mean attention for the question divided elementwise by the
  head-mean attention for the query-free prompt :data:`~klal.grounding.base.GENERIC_PROMPT`
  (:func:`relative_attention`). Regions the model looks at for *any* prompt (attention sinks, salient clutter)
  cancel; regions the question draws attention to stand out. 2 forward passes.
* ``vicrop_grad_att`` (gradient-weighted attention): the attention probabilities ``A`` (per head, the full softmax
  row restricted to visual keys) times ``ReLU(dlog p(top) / dA)``, averaged over heads (:func:`grad_attention`), where
  ``top`` is the most likely next token. Keys whose extra attention would raise the answer's probability count.
  1 forward + 1 backward pass.

The crop is the best *square* window of the relevance grid of image 0 over a few sizes
(:func:`square_window_sizes`, :func:`klal.grounding.ops.best_window`), converted to original pixels and grown to at
least ``min_crop`` px per side. The model then answers (greedy) from ``[*original images, crop]`` with the question.

Choices (DESIGN.md section 4 gives the method; the rest is ours):

* **Layer.** ``layer=None`` picks ``round(0.61 * num_layers)`` (clamped to the last layer): the relative depth of the
  layer the authors' Qwen2.5-VL-3B code uses (22 of 36; 22 / 36 = 0.611). The tiny 4-layer test model gets layer 2.
* **Attention normalisation.** rel-att uses :meth:`GroundingModel.attention` (klal's capture convention: each head's
  row renormalised over the visual tokens, then head-mean) for both prompts, so the ratio compares where each
  prompt's visual attention goes, independent of how much of it goes to text. grad-att uses the raw full-row
  probabilities (``CaptureRequest.full_probs``) because that is the quantity the gradient is taken with respect to.
* **Division.** ``a_q / (a_generic + eps)`` with ``eps=1e-6`` (maps are probabilities of order ``1 / V``), no
  smoothing, so a token the generic prompt ignores can dominate; this matches the method's plain elementwise ratio.
* **Window sizes.** Square windows (in cells; a cell is square in the resized image and the resize is proportional,
  so near-square in original pixels) of side ``round(s * min(gh, gw))`` for ``s`` in ``scales`` (default
  0.25, 0.5, 0.75), at least one cell; :func:`~klal.grounding.ops.best_window` picks the window with the largest
  ``sum / sqrt(area)``.
* **Minimum crop.** ``min_crop=112`` px by default (the original uses the vision encoder's input side, e.g. 224 or
  336 px); 112 fits the small synthetic test images. Set 224 for real benchmarks. An image smaller than ``min_crop``
  on either axis is an error naming the sample (no silent fallback to the whole image).
* **Zoom.** With ``zoom=True`` (default) the crop is upscaled (bicubic, aspect kept) to the original image's area
  before it is given to the model, the analogue of resizing the crop to the encoder's input size: with Qwen2.5-VL's
  dynamic resolution an un-resized crop would get few visual tokens and show no more detail than the original. The
  processor's ``max_pixels`` still caps the tokens. The crop is never downscaled.
* **Multi-image samples.** Maps cover every image; the crop is taken from image 0 (result boxes are in image-0
  pixels) and appended after all original images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from klal.grounding import ops
from klal.grounding.base import (
    GENERIC_PROMPT,
    GroundingError,
    GroundingModel,
    GroundingResult,
    register_method,
    sample_images,
    timed,
)

DEFAULT_RELATIVE_DEPTH = 22 / 36
"""Default layer as a fraction of the depth: Qwen2.5-VL-3B's ViCrop layer 22 of 36."""


# ----------------------------------------------------------------------------------------------- pure functions


def default_layer(num_layers: int) -> int:
    """``round(DEFAULT_RELATIVE_DEPTH * num_layers)`` clamped to ``[0, num_layers - 1]`` (36 layers -> 22)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return min(max(round(DEFAULT_RELATIVE_DEPTH * num_layers), 0), num_layers - 1)


def relative_attention(a_q: torch.Tensor, a_generic: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ViCrop rel-att: ``a_q / (a_generic + eps)`` elementwise.

    Args:
        a_q: attention for the question (any shape, non-negative).
        a_generic: the same map for the generic prompt (same shape).
        eps: keeps the ratio finite where the generic prompt gives no attention; > 0.
    """
    if a_q.shape != a_generic.shape:
        raise ValueError(f"a_q {tuple(a_q.shape)} and a_generic {tuple(a_generic.shape)} must have the same shape")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return a_q / (a_generic + eps)


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
) -> tuple[ops.CellBox, ops.PixelBox]:
    """Best window of ``grid`` (over ``sizes``) as a cell box, and as a pixel box grown to ``min_crop`` px per side.

    Raises:
        CropTooSmallError: the image is smaller than ``min_crop`` on some axis.
    """
    cell_box, _ = ops.best_window(grid, sizes)
    box_px = ops.cells_to_pixels(cell_box, grid.shape, image_wh)
    return cell_box, ops.expand_box(box_px, min_crop, image_wh)


def crop_image(image: Image.Image, box_px: Sequence[float], zoom: bool = True) -> tuple[Image.Image, ops.PixelBox]:
    """Crop ``box_px`` (widened to whole pixels) out of ``image``; optionally upscale it to the image's area.

    Returns:
        The crop and the integer pixel box actually cropped, ``(x0, y0, x1, y1)`` as floats.
    """
    x0, y0, x1, y1 = box_px
    box = (
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(image.width, math.ceil(x1)),
        min(image.height, math.ceil(y1)),
    )
    crop = image.crop(box)
    if zoom:
        factor = math.sqrt((image.width * image.height) / (crop.width * crop.height))
        if factor > 1:
            size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
            crop = crop.resize(size, Image.Resampling.BICUBIC)
    return crop, tuple(float(v) for v in box)


# ---------------------------------------------------------------------------------------------------- shared glue


def check_layer(layer: int, gm: GroundingModel, method: str, sample_id: Any) -> int:
    """``layer`` (negative counts from the end) as an index into the model's layers, or GroundingError."""
    n = gm.num_layers
    if not -n <= layer < n:
        raise GroundingError(
            f"{method}: option layer={layer} is out of range for a model with {n} layers (sample {sample_id!r})"
        )
    return layer % n


def check_crop_fits(image: Image.Image, min_crop: float, method: str, sample_id: Any) -> None:
    """GroundingError naming the sample when ``image`` is smaller than ``min_crop`` px on an axis."""
    if image.width < min_crop or image.height < min_crop:
        raise GroundingError(
            f"{method}: sample {sample_id!r} has an image of {image.width} x {image.height} px, smaller than "
            f"option min_crop={min_crop:g} px on at least one axis"
        )


def crop_or_raise(
    grid: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    image: Image.Image,
    min_crop: float,
    method: str,
    sample_id: Any,
) -> tuple[ops.CellBox, ops.PixelBox]:
    """:func:`select_crop`, turning :class:`~klal.grounding.ops.CropTooSmallError` into GroundingError."""
    try:
        return select_crop(grid, sizes, (image.width, image.height), min_crop)
    except ops.CropTooSmallError as e:
        raise GroundingError(f"{method}: sample {sample_id!r}: option min_crop: {e}") from e


def _check_common(min_crop: float, max_new_tokens: int, method: str) -> None:
    if not (isinstance(min_crop, (int, float)) and math.isfinite(min_crop) and min_crop >= 0):
        raise GroundingError(f"{method}: option min_crop must be a finite number >= 0, got {min_crop!r}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise GroundingError(f"{method}: option max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


# --------------------------------------------------------------------------------------------------------- methods


class _ViCrop:
    """Shared ViCrop pipeline; subclasses provide the relevance vector over all visual tokens."""

    name: ClassVar[str]
    answers: ClassVar[bool] = True

    def __init__(
        self,
        layer: int | None = None,
        scales: Sequence[float] = (0.25, 0.5, 0.75),
        min_crop: float = 112,
        zoom: bool = True,
        max_new_tokens: int = 16,
    ) -> None:
        """Options.

        Args:
            layer: language-model layer to read (negative counts from the end); None: ``default_layer``.
            scales: square window sides as fractions of the shorter grid side, each in ``(0, 1]``.
            min_crop: minimum crop side in original pixels.
            zoom: upscale the crop to the original image's area before answering.
            max_new_tokens: answer length cap.
        """
        if layer is not None and not isinstance(layer, int):
            raise GroundingError(f"{self.name}: option layer must be an integer or None, got {layer!r}")
        scales = tuple(scales)
        if not scales or not all(isinstance(s, (int, float)) and 0 < s <= 1 for s in scales):
            raise GroundingError(f"{self.name}: option scales must be numbers in (0, 1], got {scales!r}")
        _check_common(min_crop, max_new_tokens, self.name)
        self.layer = layer
        self.scales = scales
        self.min_crop = float(min_crop)
        self.zoom = bool(zoom)
        self.max_new_tokens = max_new_tokens

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

    def run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        """Map, crop and answer one dataset row."""
        return timed(gm, lambda: self._run(gm, sample))

    def _run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        sid = sample.get("id")
        images = sample_images(sample)
        check_crop_fits(images[0], self.min_crop, self.name, sid)
        layer = check_layer(default_layer(gm.num_layers) if self.layer is None else self.layer, gm, self.name, sid)
        inputs = gm.inputs(images, sample["question"])
        rel = self.relevance(gm, images, inputs, layer)
        maps = gm.split_grid(rel, inputs["grids"])
        sizes = square_window_sizes(maps[0].shape, self.scales)
        cell_box, box_px = crop_or_raise(maps[0], sizes, images[0], self.min_crop, self.name, sid)
        crop, crop_box = crop_image(images[0], box_px, self.zoom)
        answer = gm.generate(gm.inputs([*images, crop], sample["question"]), self.max_new_tokens)
        extras = {
            "layer": layer,
            "window_cells": list(cell_box),
            "crop_box": list(crop_box),
            "crop_size": [crop.width, crop.height],
        }
        return GroundingResult(maps=maps, boxes=[crop_box], answer=answer, extras=extras)


@register_method("vicrop_rel_att")
class ViCropRelAtt(_ViCrop):
    """ViCrop with relative attention (question attention / generic-prompt attention at one layer)."""

    def __init__(self, eps: float = 1e-6, **kwargs: Any) -> None:
        """Options: ``eps`` (> 0, added to the generic map before dividing) and those of the shared pipeline."""
        super().__init__(**kwargs)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise GroundingError(f"{self.name}: option eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)

    def relevance(
        self, gm: GroundingModel, images: list[Image.Image], inputs: dict[str, Any], layer: int
    ) -> torch.Tensor:
        """Head-mean visual attention for the question over that for :data:`GENERIC_PROMPT`, at ``layer``."""
        a_q = gm.attention(inputs, layers=[layer], per_head=False)[0]
        a_g = gm.attention(gm.inputs(images, GENERIC_PROMPT), layers=[layer], per_head=False)[0]
        return relative_attention(a_q.float(), a_g.float(), self.eps)


@register_method("vicrop_grad_att")
class ViCropGradAtt(_ViCrop):
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
            probs = req.full_probs[layer]  # (1, H, 1, S)
            if probs.grad is None:
                raise RuntimeError(f"no gradient reached the attention of layer {layer} (differentiable_rows path)")
            vis = inputs["visual_mask"][0].nonzero().squeeze(-1)
            a = probs.detach()[0, :, 0][:, vis].float()  # (H, V)
            g = probs.grad[0, :, 0][:, vis].float()
        finally:
            req.clear()
        return grad_attention(a, g)


__all__ = [
    "DEFAULT_RELATIVE_DEPTH",
    "ViCropGradAtt",
    "ViCropRelAtt",
    "check_crop_fits",
    "check_layer",
    "crop_image",
    "crop_or_raise",
    "default_layer",
    "grad_attention",
    "relative_attention",
    "select_crop",
    "square_window_sizes",
]
