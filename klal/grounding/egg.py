"""Entropy-Gradient Grounding: where the model's uncertainty about its next token is most sensitive to the image.

**Relevance.** ``H`` is the entropy (natural log, temperature 1) of the next-token distribution at the last prompt
position. One forward and one backward pass give ``dH/de_v`` for every visual token embedding ``e_v`` (the merger
output the language model reads at an ``<|image_pad|>`` position); the relevance of token ``v`` is
``||dH/de_v||_2`` (:meth:`klal.grounding.base.GroundingModel.visual_embeds_grad`).

**Regions** (:func:`find_regions`, :func:`pool_regions`), as the authors' release computes them
(merci00001/entropy-gradient-grounding): Gaussian smoothing (``sigma`` = 1.5 cells, scipy's default boundary mode
``reflect``), the cells strictly above the chord elbow of the smoothed values, 4-connected components ranked by the
sum of their RAW relevance (ties: raster order). The search pools image 0's map with the maps of the round's crops;
a region found on a crop is cut from that crop (zooming into a zoom). The ``top_k`` = 2 best regions are boxed in
their source's pixels, aspect-capped at ``max_aspect`` = 3 (grown about the centre, then clipped at the source's
edge: :func:`klal.grounding.ops.cap_aspect_px`), and are the next round's crops.

**Zoom.** Every crop is upscaled to image 0's area before it is encoded (:func:`klal.grounding.crop.crop_image`),
so it gets the original's token budget, as the authors re-encode every crop at the encoder's input size (LLaVA: 576
tokens, as many as the original). Qwen2.5-VL encodes an image at about its own resolution: without this a 112 x 112
crop would stay 16 visual tokens and show no more detail than the original.

**Stopping** (:func:`zoom_rounds`, :func:`returned_round`). Round 0 grounds on the sample's images; round ``t >= 1``
on the sample's images followed by the crops planned in round ``t - 1`` (each round's crops replace the previous
round's). ``H_t`` is :func:`stopping_entropy` of the map holding round ``t``'s top region. Round ``t`` is returned as
soon as ``H_t > H_{t-1}``, ``H_t == 0`` or ``t == max_rounds`` (15), where ``H_{-1}`` is the release's starting value
1000 (so an infinite ``H_0``, a flat map, stops at once); equal entropies go on.

**Answer.** As in the release, the answer is generated from the sample's images plus the crops planned from the
returned round's map (``answer_crops="replanned"``; a round without any region plans nothing new and keeps its own
crops, as the release's "no boxes" return leaves its input as it was); ``answer_crops="returned"`` answers with the
returned round's own input crops instead. Decoding is ``model.generate(do_sample=False)`` under the checkpoint's
generation config with 100 new tokens (``decoding``, ``max_new_tokens``), as the release runs it. The result maps
are the returned round's relevance over the sample's own images, its boxes the ``top_k`` regions found in that round
(image-0 pixels).

docs/grounding.md lists, with reasons, every place where klal's default or option differs from the release.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from klal.decode import Decoding
from klal.geometry import Footprint
from klal.grounding.base import GroundingMethod, GroundingResult
from klal.grounding.crop import crop_image, whole_pixel_box
from klal.grounding.ops import (
    CropTooSmallError,
    PixelBox,
    Region,
    cap_aspect_px,
    cells_to_pixels,
    elbow_threshold,
    expand_box,
    extract_regions,
    footprint_of,
    gaussian_smooth,
    spatial_entropy,
)
from klal.grounding.options import option
from klal.session import GroundingError, GroundingModel


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
    return gm.split_grid(grad, inputs["layout"], inputs["image_wh"]), float(value)


MAX_ROUNDS = 15
"""The authors' round cap: the loop stops at round 15 at the latest."""

START_ENTROPY = 1000.0
"""The entropy the release's loop starts from (``H_{-1}``): round 0 stops when ``H_0`` exceeds it (an infinite
``H_0``, from a flat map, does)."""


def find_regions(
    relevance_grid: np.ndarray, sigma: float = 1.5, connectivity: int = 4, smooth_mode: str = "reflect"
) -> list[Region]:
    """Every region of a relevance grid, ranked: the authors' region step, neither truncated nor aspect-capped.

    Smoothing (``sigma`` 1.5 cells, scipy's default boundary mode ``reflect``), the cells whose smoothed value is
    strictly greater than the chord elbow of the smoothed values, their 4-connected components, ranked by the sum of
    the RAW relevance of their cells (descending; ties keep the raster order of the components' first cells).
    :func:`klal.grounding.ops.extract_regions` with ``strict=True``.
    """
    return extract_regions(
        relevance_grid,
        sigma=sigma,
        top_k=None,
        connectivity=connectivity,
        max_aspect=None,
        smooth_mode=smooth_mode,
        strict=True,
    )


def rank_regions(relevance_grid: np.ndarray) -> list[np.ndarray]:
    """Boolean masks (grid shape) of every region of ``relevance_grid``, best first (:func:`find_regions`)."""
    return [r.mask for r in find_regions(relevance_grid)]


def stopping_entropy(relevance_grid: np.ndarray, sigma: float = 1.5, smooth_mode: str = "reflect") -> float:
    """The authors' stopping statistic, from the raw relevance grid.

    ``S`` is the smoothed grid (as in :func:`find_regions`); ``B = ReLU(S - 2 mean(S))``; the 8-connected components
    of the cells whose ``B`` exceeds the chord elbow of ``S`` get ``p_i = sum_i B / sum_all B`` and the statistic is
    ``-sum p_i log p_i`` (:func:`klal.grounding.ops.spatial_entropy`): ``inf`` when ``B`` sums to 0, ``0`` when no
    cell passes the threshold.
    """
    smooth = gaussian_smooth(relevance_grid, sigma, smooth_mode)
    return spatial_entropy(smooth, mean_scale=2.0, floor=elbow_threshold(smooth))


def _stop_round(entropies: Sequence[float], max_rounds: int) -> int | None:
    """The round the loop returns given ``H_0, ..., H_t`` so far, or None if it goes on to round ``t + 1``."""
    previous = START_ENTROPY
    for t, h in enumerate(entropies):
        if h > previous or h == 0 or t >= max_rounds:
            return t
        previous = h
    return None


def returned_round(entropies: Sequence[float], max_rounds: int = MAX_ROUNDS) -> int:
    """The round the authors' loop returns, given the statistics ``H_0, H_1, ...`` of its rounds.

    Round ``t = 0, 1, ...`` is returned as soon as ``H_t > H_{t-1}``, or ``H_t == 0``, or ``t == max_rounds``, with
    ``H_{-1}`` = :data:`START_ENTROPY` (1000): an infinite ``H_0`` returns round 0; an equal entropy goes on. The
    round returned is the one just computed, even when its entropy rose. The answer sees the crops planned from
    its map (:class:`EggRound`).

    Args:
        entropies: ``H_0, H_1, ...``, long enough for the loop to stop.
        max_rounds: the round cap (the authors' 15); 0 returns round 0.

    Raises:
        ValueError: ``entropies`` ends before the loop stops, or ``max_rounds`` < 0.
    """
    if isinstance(max_rounds, bool) or int(max_rounds) != max_rounds or max_rounds < 0:
        raise ValueError(f"max_rounds must be an integer >= 0, got {max_rounds!r}")
    values = [float(h) for h in entropies]
    if any(math.isnan(h) for h in values):
        raise ValueError(f"entropies contain NaN: {values}")
    t = _stop_round(values, int(max_rounds))
    if t is None:
        raise ValueError(f"the loop has not stopped after the {len(values)} entropies given: {values}")
    return t


@dataclass
class PooledRegion:
    """A region found on image 0 or on one of the round's crops.

    Attributes:
        source: 0 for image 0, ``k`` for the round's ``k``-th crop.
        region: the region on that source's grid (``mass`` is its raw relevance mass).
        box: its box in image-0 pixels, aspect-capped in the source's pixels (before any ``min_crop`` growth).
    """

    source: int
    region: Region
    box: PixelBox


def pool_regions(
    maps: Sequence[np.ndarray],
    sources: Sequence[PixelBox],
    sigma: float = 1.5,
    connectivity: int = 4,
    smooth_mode: str = "reflect",
    max_aspect: float | None = 3.0,
    footprints: Sequence[Footprint | None] | None = None,
) -> list[PooledRegion]:
    """The regions of several maps ranked together by raw relevance mass (the authors' pooled region search).

    ``maps[k]`` covers the part of image 0 in ``sources[k]`` (image-0 pixels; image 0 itself is ``(0, 0, W, H)``),
    its cells where ``footprints[k]`` says (in the source's pixels; None: equal cells over the source).
    A region's cell box becomes pixels of its source (:func:`klal.grounding.ops.cells_to_pixels`), gets the aspect
    cap there (:func:`klal.grounding.ops.cap_aspect_px`: grown about its centre, clipped at the source's edge) and is
    shifted into image-0 pixels, so a region found on a crop is cut from that crop (zooming into a zoom). Ties in mass
    keep the order of the sources, then the raster order of the components.
    """
    if len(maps) != len(sources):
        raise ValueError(f"{len(maps)} maps but {len(sources)} sources")
    found: list[PooledRegion] = []
    for k, (grid, (sx0, sy0, sx1, sy1)) in enumerate(zip(maps, sources)):
        size = (sx1 - sx0, sy1 - sy0)
        cells = footprints[k] if footprints is not None and footprints[k] is not None else grid.shape
        for reg in find_regions(grid, sigma, connectivity, smooth_mode):
            box = cells_to_pixels(reg.box, cells, size)
            if max_aspect is not None:
                box = cap_aspect_px(box, max_aspect, size)
            x0, y0, x1, y1 = box
            found.append(PooledRegion(k, reg, (x0 + sx0, y0 + sy0, x1 + sx0, y1 + sy0)))
    # sorted() is stable: equal masses keep the order they were found in.
    return sorted(found, key=lambda p: -p.region.mass)


@dataclass
class EggRound:
    """One grounding pass of the authors' zoom loop.

    Attributes:
        crops: crop boxes (image-0 pixels, whole pixels) this round's input carried after the sample's images; round
            0 has none.
        maps: relevance grid per input image (the sample's images, then the crops).
        regions: every region of the pooled maps (image 0 and the crops), best first.
        entropy: the stopping statistic ``H_t`` (:func:`stopping_entropy` of the map holding the top region; 0 when
            no map has a region).
        planned: the crops planned from this round's top regions (image-0 pixels): the next round's crops, and the
            answer's when this round is returned. A round without any region keeps its own ``crops`` (the release's
            "no boxes" return leaves the input as it was).
    """

    crops: list[PixelBox]
    maps: list[np.ndarray]
    regions: list[PooledRegion]
    entropy: float
    planned: list[PixelBox]


def zoom_rounds(
    relevance_fn: Callable[[list[Image.Image]], list[np.ndarray]],
    images: Sequence[Image.Image],
    search: Callable[[list[np.ndarray], list[PixelBox]], tuple[list[PooledRegion], float, list[PixelBox]]],
    max_rounds: int = MAX_ROUNDS,
    zoom: bool = True,
) -> tuple[list[EggRound], int]:
    """The authors' zoom-and-re-ground loop, independent of any model.

    Round 0 grounds on the sample's images. Round ``t >= 1`` grounds on the sample's images followed by the crops
    planned in round ``t - 1`` (cut from image 0 at whole pixels and, with ``zoom``, upscaled to its area:
    :func:`crop_image`); each round's crops replace the previous round's. A round whose search finds no region plans
    its own crops again. The loop stops at the round :func:`returned_round` returns.

    Args:
        relevance_fn: input images -> one relevance grid per image (for EGG: :func:`entropy_relevance`).
        images: the sample's images (crops come from image 0).
        search: ``(pooled maps, their sources in image-0 pixels) -> (ranked regions, H_t, planned crops)``; the pooled
            maps are image 0's and the crops'.
        max_rounds: the round cap (>= 0).
        zoom: upscale each crop to image 0's area before it is encoded.

    Returns:
        Every round run and the index of the returned one (the last).
    """
    originals = list(images)
    image0 = originals[0]
    whole = (0.0, 0.0, float(image0.width), float(image0.height))
    rounds: list[EggRound] = []
    crops: list[PixelBox] = []
    while True:
        maps = relevance_fn(originals + [crop_image(image0, c, zoom) for c in crops])
        regions, entropy, planned = search([maps[0], *maps[len(originals) :]], [whole, *crops])
        planned = [tuple(float(v) for v in whole_pixel_box(image0, c)) for c in planned] if regions else crops
        rounds.append(EggRound(crops, maps, regions, entropy, planned))
        t = _stop_round([r.entropy for r in rounds], max_rounds)
        if t is not None:
            return rounds, t
        crops = planned


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class EntropyGradientGrounding(GroundingMethod, name="entropy_gradient"):
    """Entropy-Gradient Grounding with zoom-and-re-ground; answers from the original images plus the crops."""

    answers = True

    @dataclass(frozen=True)
    class Options:
        sigma: float = option(1.5, ge=0)
        """Region smoothing in cells (also used by the stopping statistic)."""
        smooth_mode: Literal["reflect", "nearest"] = "reflect"
        """Boundary mode of the smoothing: scipy's default ``reflect`` (the authors) or ``nearest`` (klal's earlier
        choice, which does not dim border evidence)."""
        top_k: int = option(2, ge=1)
        """Regions (crops) per round."""
        connectivity: Literal[4, 8] = 4
        """Neighbourhood of the region components."""
        max_aspect: float | None = option(3.0, ge=1)
        """Aspect cap of a region's box in pixels, grown about its centre then clipped (None disables it)."""
        min_crop: float = option(0.0, ge=0)
        """Minimum crop side in original pixels (0: none, the authors; an image smaller than this is refused)."""
        max_rounds: int = option(MAX_ROUNDS, ge=0)
        """Round cap of the zoom loop (the authors' 15; 0 = ground once and answer without crops)."""
        zoom: bool = True
        """Upscale each crop to image 0's area before it is encoded, so it gets the original's token budget (as the
        release's LLaVA encodes every crop at its full input size)."""
        answer_crops: Literal["replanned", "returned"] = "replanned"
        """Crops the answer sees: those planned from the returned round's map (the release), or the returned round's
        own input crops (one round behind; issue 12's reading)."""
        max_new_tokens: int = option(100, ge=1)
        """Answer decoding cap (the release's 100)."""
        decoding: Decoding = "generation_config"
        """Answer decoding: ``generation_config`` (``model.generate(do_sample=False)``, as the release) or
        ``greedy`` (klal's argmax loop)."""

    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Image.Image]) -> GroundingResult:
        """Ground, zoom, re-ground and answer one row."""
        opts = self.options
        question = sample["question"]
        image0 = images[0]
        token_entropies: list[float] = []

        def relevance(imgs: list[Image.Image]) -> list[np.ndarray]:
            grids, h = entropy_relevance(gm, imgs, question)
            token_entropies.append(h)
            return grids

        def search(maps: list[np.ndarray], sources: list[PixelBox]) -> tuple[list[PooledRegion], float, list[PixelBox]]:
            # Each map's cells where its tokens looked: image 0's footprint, a zoomed crop's brought back to the crop.
            fps = [footprint_of(gm, image0.size)]
            for sx0, sy0, sx1, sy1 in sources[1:]:
                zoomed = crop_image(image0, (sx0, sy0, sx1, sy1), opts.zoom)
                fps.append(footprint_of(gm, zoomed.size).scaled(sy1 - sy0, sx1 - sx0))
            found = pool_regions(
                maps, sources, opts.sigma, opts.connectivity, opts.smooth_mode, opts.max_aspect, footprints=fps
            )
            # The statistic of the map holding the top region; no region anywhere counts as 0 (the release's
            # "no boxes" return), which stops the loop.
            entropy = stopping_entropy(maps[found[0].source], opts.sigma, opts.smooth_mode) if found else 0.0
            try:
                planned = [expand_box(p.box, opts.min_crop, image0.size) for p in found[: opts.top_k]]
            except CropTooSmallError as e:
                raise GroundingError(f"{self.name}: sample {sample.get('id')!r}: option min_crop: {e}") from e
            return found, entropy, planned

        rounds, t = zoom_rounds(relevance, images, search, opts.max_rounds, opts.zoom)
        last = rounds[t]
        crops = last.planned if opts.answer_crops == "replanned" else last.crops
        answer = gm.generate(
            gm.inputs(images + [crop_image(image0, c, opts.zoom) for c in crops], question),
            opts.max_new_tokens,
            decoding=opts.decoding,
        )
        extras = {
            "returned_round": t,
            "crop_boxes": [list(c) for c in crops],
            "rounds": [
                {
                    "num_images": len(r.maps),
                    "stop_entropy": _finite_or_none(r.entropy),
                    "next_token_entropy": h,
                    "crops": [list(c) for c in r.crops],
                    "planned": [list(c) for c in r.planned],
                    "boxes": [list(p.box) for p in r.regions[: opts.top_k]],
                    "sources": [p.source for p in r.regions[: opts.top_k]],
                    "masses": [p.region.mass for p in r.regions[: opts.top_k]],
                }
                for r, h in zip(rounds, token_entropies)
            ],
        }
        boxes = [p.box for p in last.regions[: opts.top_k]]
        return GroundingResult(maps=last.maps[: len(images)], boxes=boxes, answer=answer, extras=extras)


__all__ = [
    "MAX_ROUNDS",
    "START_ENTROPY",
    "EggRound",
    "EntropyGradientGrounding",
    "PooledRegion",
    "entropy_relevance",
    "find_regions",
    "next_token_entropy",
    "pool_regions",
    "rank_regions",
    "returned_round",
    "stopping_entropy",
    "zoom_rounds",
]
