"""Entropy-Gradient Grounding: where the model's uncertainty about its next token is most sensitive to the image.

**Relevance.** ``H`` is the entropy (natural log, temperature 1) of the next-token distribution at the last prompt
position. One forward and one backward pass give ``dH/de_v`` for every visual token embedding ``e_v`` (the merger
output the language model reads at an ``<|image_pad|>`` position); the relevance of token ``v`` is
``||dH/de_v||_2`` (:meth:`klal.grounding.base.GroundingModel.visual_embeds_grad`).

**Regions.** :func:`klal.grounding.ops.extract_regions` on image 0's relevance grid: Gaussian smoothing
(``sigma`` = 1.5 cells), elbow threshold, ``connectivity``-connected components ranked by raw relevance mass, the
``top_k`` = 2 best boxed and their aspect capped at ``max_aspect`` = 3. Each region box is grown to at least
``min_crop`` px per side (:func:`klal.grounding.ops.expand_box`) and cropped from the original image 0.

**Zoom and re-ground** (:func:`zoom_and_reground`). Round 0 grounds on the sample's images. Round ``t >= 1`` grounds
on the sample's images followed by the crops planned in round ``t - 1``, and re-plans the crops from the new
relevance over the original image 0. The loop stops when the spatial entropy of image 0's map does not fall below the
previous round's (that round is rejected) or after ``max_rounds`` re-grounding rounds (default 2, so at most three
relevance passes). The last round whose entropy fell (round 0 if none did) is *accepted*: its regions are the boxes,
its crops are appended to the sample's images for the answer (``gm.generate`` on ``[images..., crops...]``), and its
relevance grids over the sample's own images are the result maps.

Choices where the method's description leaves details open:

* Crops are always cut from the ORIGINAL image 0 (re-grounding refines where to look; it never crops a crop), and
  each round's crops replace the previous round's rather than accumulating.
* The stopping entropy is :func:`klal.grounding.ops.spatial_entropy` (mean_scale 1, floor 1e-3) of image 0's
  relevance smoothed with the region step's ``sigma`` and normalised to sum 1: smoothing first makes the entropy count
  the blobs the region step sees instead of cell-level gradient noise. A flat map has entropy ``+inf``.
* "Stops falling" means ``H_t >= H_{t-1}``; an equal entropy stops the loop too.
* ``min_crop`` defaults to 112 px (four 28-px tokens; the processor upsamples small crops, which is the zoom).
* Result boxes are the region boxes (before ``min_crop`` growth) in image-0 pixels, best first; the grown crop boxes
  are in ``extras["crop_boxes"]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from klal.grounding.base import (
    GroundingError,
    GroundingModel,
    GroundingResult,
    register_method,
    sample_images,
    timed,
)
from klal.grounding.ops import (
    CropTooSmallError,
    PixelBox,
    Region,
    cells_to_pixels,
    expand_box,
    extract_regions,
    gaussian_smooth,
    normalize,
    spatial_entropy,
)

CropPlan = tuple[list[Region], list[PixelBox], list[PixelBox]]
"""``(regions, region boxes in image-0 pixels, crop boxes in image-0 pixels)``."""


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, temperature 1) of the next-token distribution at the last position of ``logits`` ``(1, S, V)``.

    Half-precision logits are promoted to float32 first so the log-softmax does not lose the tail.
    """
    last = logits[0, -1]
    if last.dtype in (torch.float16, torch.bfloat16):
        last = last.float()
    logp = torch.log_softmax(last, dim=-1)
    return -(logp.exp() * logp).sum()


def entropy_relevance(
    gm: GroundingModel, images: Sequence[Image.Image], question: str
) -> tuple[list[np.ndarray], float]:
    """Relevance grids (one per image) and the next-token entropy, from one forward and one backward pass."""
    inputs = gm.inputs(list(images), question)
    grad, value = gm.visual_embeds_grad(inputs, next_token_entropy)
    return gm.split_grid(grad, inputs["grids"]), float(value)


def map_entropy(grid: np.ndarray, sigma: float) -> float:
    """Stopping criterion: spatial entropy of the ``sigma``-smoothed, normalised grid (``+inf`` for a flat map)."""
    # + 0.0 turns the -0.0 of a single blob into 0.0 for the records.
    return spatial_entropy(normalize(gaussian_smooth(grid, sigma))) + 0.0


def plan_crops(
    grid: np.ndarray,
    image_wh: tuple[float, float],
    sigma: float = 1.5,
    top_k: int = 2,
    connectivity: int = 4,
    max_aspect: float | None = 3.0,
    min_crop: float = 112.0,
) -> CropPlan:
    """Regions of a relevance grid and the crops that show them.

    Args:
        grid: relevance over image 0's token grid.
        image_wh: image 0's original ``(W, H)``.
        sigma, top_k, connectivity, max_aspect: the region step (:func:`klal.grounding.ops.extract_regions`).
        min_crop: minimum crop side in pixels.

    Raises:
        CropTooSmallError: the image is smaller than ``min_crop`` on an axis.
    """
    regions = extract_regions(grid, sigma=sigma, top_k=top_k, connectivity=connectivity, max_aspect=max_aspect)
    boxes = [cells_to_pixels(r.box, grid.shape, image_wh) for r in regions]
    crops = [expand_box(b, min_crop, image_wh) for b in boxes]
    return regions, boxes, crops


def crop_image(image: Image.Image, box_px: PixelBox) -> Image.Image:
    """Crop a pixel box (outward-rounded to whole pixels, clipped to the image, at least 1 px per side)."""
    x0, y0, x1, y1 = box_px
    left = min(max(math.floor(x0), 0), image.width - 1)
    top = min(max(math.floor(y0), 0), image.height - 1)
    right = max(min(math.ceil(x1), image.width), left + 1)
    bottom = max(min(math.ceil(y1), image.height), top + 1)
    return image.crop((left, top, right, bottom))


@dataclass
class ZoomRound:
    """One grounding pass of the zoom loop.

    Attributes:
        maps: relevance grid per image of this round's input (the sample's images, then the crops).
        entropy: stopping entropy of ``maps[0]`` (:func:`map_entropy`).
        accepted: whether the entropy fell (round 0 is always accepted); a rejected round plans no crops.
        regions: regions of ``maps[0]`` (accepted rounds).
        boxes: region boxes in image-0 pixels (accepted rounds).
        crops: crop boxes in image-0 pixels appended in the next round / for the answer (accepted rounds).
    """

    maps: list[np.ndarray]
    entropy: float
    accepted: bool
    regions: list[Region]
    boxes: list[PixelBox]
    crops: list[PixelBox]


def zoom_and_reground(
    relevance_fn: Callable[[list[Image.Image]], list[np.ndarray]],
    images: Sequence[Image.Image],
    plan: Callable[[np.ndarray], CropPlan],
    max_rounds: int = 2,
    sigma: float = 1.5,
) -> tuple[list[ZoomRound], int]:
    """The zoom-and-re-ground loop, independent of any model.

    Args:
        relevance_fn: input images -> one relevance grid per image (for EGG: :func:`entropy_relevance`).
        images: the sample's images (crops come from image 0).
        plan: image 0's grid -> ``(regions, boxes, crop boxes)`` (for EGG: :func:`plan_crops`).
        max_rounds: re-grounding rounds after round 0 (>= 0).
        sigma: smoothing of the stopping entropy (:func:`map_entropy`).

    Returns:
        Every round run (the last may be rejected) and the index of the accepted round.
    """
    originals = list(images)
    rounds: list[ZoomRound] = []
    current = originals
    for t in range(max_rounds + 1):
        maps = relevance_fn(current)
        ent = map_entropy(maps[0], sigma)
        # `not <` also stops on NaN; an unchanged entropy counts as "stopped falling".
        if rounds and not ent < rounds[-1].entropy:
            rounds.append(ZoomRound(maps, ent, False, [], [], []))
            break
        regions, boxes, crops = plan(maps[0])
        rounds.append(ZoomRound(maps, ent, True, regions, boxes, crops))
        if t < max_rounds:
            current = originals + [crop_image(originals[0], c) for c in crops]
    accepted = max(i for i, r in enumerate(rounds) if r.accepted)
    return rounds, accepted


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@register_method("entropy_gradient")
class EntropyGradientGrounding:
    """Entropy-Gradient Grounding with zoom-and-re-ground; answers from the original images plus the crops.

    Args:
        sigma: region smoothing in cells (also used by the stopping entropy).
        top_k: regions (crops) per round.
        connectivity: 4 or 8 for the region components.
        max_aspect: region aspect cap (None disables it).
        min_crop: minimum crop side in original pixels.
        max_rounds: re-grounding rounds after the first grounding (0 = ground once, crop, answer).
        max_new_tokens: answer decoding cap.

    Raises:
        GroundingError: naming the bad option.
    """

    answers = True

    def __init__(
        self,
        sigma: float = 1.5,
        top_k: int = 2,
        connectivity: int = 4,
        max_aspect: float | None = 3.0,
        min_crop: float = 112.0,
        max_rounds: int = 2,
        max_new_tokens: int = 16,
    ) -> None:
        def bad(option: str, need: str, value: Any) -> GroundingError:
            return GroundingError(f"entropy_gradient: {option} must be {need}, got {value!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        if not (is_num(sigma) and sigma >= 0):
            raise bad("sigma", "a finite number >= 0", sigma)
        if not (is_int(top_k) and top_k >= 1):
            raise bad("top_k", "a positive integer", top_k)
        if connectivity not in (4, 8):
            raise bad("connectivity", "4 or 8", connectivity)
        if max_aspect is not None and not (is_num(max_aspect) and max_aspect >= 1):
            raise bad("max_aspect", "None or a finite number >= 1", max_aspect)
        if not (is_num(min_crop) and min_crop >= 1):
            raise bad("min_crop", "a number of pixels >= 1", min_crop)
        if not (is_int(max_rounds) and max_rounds >= 0):
            raise bad("max_rounds", "an integer >= 0", max_rounds)
        if not (is_int(max_new_tokens) and max_new_tokens >= 1):
            raise bad("max_new_tokens", "a positive integer", max_new_tokens)
        self.sigma = float(sigma)
        self.top_k = int(top_k)
        self.connectivity = int(connectivity)
        self.max_aspect = None if max_aspect is None else float(max_aspect)
        self.min_crop = float(min_crop)
        self.max_rounds = int(max_rounds)
        self.max_new_tokens = int(max_new_tokens)

    def run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        """Ground, zoom, re-ground and answer one row."""
        return timed(gm, lambda: self._run(gm, sample))

    def _run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        sid = sample.get("id")
        images = sample_images(sample)
        question = sample["question"]
        token_entropies: list[float] = []

        def relevance(imgs: list[Image.Image]) -> list[np.ndarray]:
            grids, h = entropy_relevance(gm, imgs, question)
            token_entropies.append(h)
            return grids

        def plan(grid: np.ndarray) -> CropPlan:
            try:
                return plan_crops(
                    grid,
                    images[0].size,
                    self.sigma,
                    self.top_k,
                    self.connectivity,
                    self.max_aspect,
                    self.min_crop,
                )
            except CropTooSmallError as e:
                raise GroundingError(f"sample {sid!r}: cannot crop with min_crop={self.min_crop:g}: {e}") from e

        rounds, best = zoom_and_reground(relevance, images, plan, self.max_rounds, self.sigma)
        acc = rounds[best]
        crops = [crop_image(images[0], c) for c in acc.crops]
        answer = gm.generate(gm.inputs(images + crops, question), self.max_new_tokens)
        extras = {
            "accepted_round": best,
            "crop_boxes": [list(c) for c in acc.crops],
            "rounds": [
                {
                    "num_images": len(r.maps),
                    "map_entropy": _finite_or_none(r.entropy),
                    "next_token_entropy": h,
                    "accepted": r.accepted,
                    "boxes": [list(b) for b in r.boxes],
                    "masses": [reg.mass for reg in r.regions],
                }
                for r, h in zip(rounds, token_entropies)
            ],
        }
        return GroundingResult(maps=acc.maps[: len(images)], boxes=list(acc.boxes), answer=answer, extras=extras)


__all__ = [
    "EntropyGradientGrounding",
    "ZoomRound",
    "crop_image",
    "entropy_relevance",
    "map_entropy",
    "next_token_entropy",
    "plan_crops",
    "zoom_and_reground",
]
