"""Attention probe: where a query token looks, read with the same capture that KLAL trains.

The map is the chosen query token's attention over the visual tokens, renormalised over visual tokens per head,
averaged over heads and over the chosen layers. The query token is:

* ``prompt_last``: the last prompt token (it predicts the first answer token); one forward pass;
* ``answer_last``: the last token of the *gold* answer, teacher-forced: the exact quantity KLAL supervises (the
  answer is known, so this probes where the model looks while it produces the right answer);
* ``generated_last``: the last token of the model's own greedy answer, which is also returned, so the probe answers.

Boxes: the map is smoothed (Gaussian, ``sigma`` tokens), cut at its elbow threshold, and the strongest connected
region (by raw attention mass) is boxed; see :func:`klal.grounding.ops.extract_regions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from klal.capture import parse_layers
from klal.decode import Decoding
from klal.geometry import Footprint
from klal.grounding.base import GroundingMethod, GroundingResult
from klal.grounding.ops import cells_to_pixels, extract_regions, footprint_of
from klal.grounding.options import option
from klal.session import GroundingError, GroundingModel

ProbeQuery = Literal["prompt_last", "answer_last", "generated_last"]


def append_answer(gm: GroundingModel, inputs: dict[str, Any], answer: str) -> tuple[dict[str, Any], int]:
    """``inputs`` with ``answer`` + end-of-turn appended (the tokens the collator appends in training).

    Returns:
        The extended inputs and the sequence position of the answer's last content token.
    """
    ids, n_content = gm.collator.answer_ids(answer)
    if n_content == 0:
        raise GroundingError("cannot probe the answer token of an empty answer")
    return gm.append_tokens(inputs, ids), inputs["input_ids"].shape[1] + n_content - 1


def map_to_box(
    grid: np.ndarray, image_wh: tuple[int, int], sigma: float = 1.0, footprint: Footprint | None = None
) -> list[tuple[float, float, float, float]]:
    """The strongest region of a relevance grid as one box in original pixels (empty list for a flat map); its cells
    are where ``footprint`` says (None: equal cells over the image)."""
    regions = extract_regions(grid, sigma=sigma, top_k=1)
    return [cells_to_pixels(r.box, footprint or grid.shape, image_wh) for r in regions]


class AttentionProbe(GroundingMethod, name="attention_probe"):
    """Head- and layer-averaged attention of one query token over the visual tokens (see the module docstring)."""

    @dataclass(frozen=True)
    class Options:
        layers: str | list[int] = "all"
        """Language layers to average: ``all``, ``"4-11"``, ``"-8:"`` or a list."""
        query: ProbeQuery = "prompt_last"
        """``prompt_last``, ``answer_last`` (gold answer, teacher-forced) or ``generated_last``."""
        sigma: float = option(1.0, ge=0)
        """Smoothing (tokens) before the map is boxed."""
        max_new_tokens: int = option(16, ge=1)
        """Decoding cap for ``generated_last``."""
        decoding: Decoding = "greedy"
        """Decoding for ``generated_last``: ``greedy`` (the argmax of the logits) or ``generation_config``
        (``model.generate(do_sample=False)``, so the checkpoint's repetition penalty applies)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        generated = self.options.query == "generated_last"
        # generated_last answers (the engine reads this per instance) and decodes each row's own answer first, so
        # its rows run one at a time; the other queries share one padded forward pass.
        self.answers = generated
        self.batched = not generated

    def ground_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        """``prompt_last`` / ``answer_last`` on several rows in one padded forward pass."""
        opts = self.options
        layers = parse_layers(opts.layers, gm.num_layers)
        out = []
        for att, layout, sizes in gm.batch_attention(samples, opts.query, layers, per_head=False):  # att: (L, V)
            maps = gm.split_grid(att.mean(0), layout, sizes)
            boxes = map_to_box(maps[0], sizes[0], opts.sigma, footprint_of(gm, sizes[0])) if maps else []
            out.append(GroundingResult(maps=maps, boxes=boxes, extras={"layers": layers, "query": opts.query}))
        return out

    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Image.Image]) -> GroundingResult:
        opts = self.options
        inputs = gm.inputs(images, sample["question"])
        layers = parse_layers(opts.layers, gm.num_layers)
        answer = None
        query_pos = None
        if opts.query == "answer_last":
            inputs, query_pos = append_answer(gm, inputs, str(sample["answer"]))
        elif opts.query == "generated_last":
            answer = gm.generate(inputs, opts.max_new_tokens, decoding=opts.decoding)
            if answer:
                inputs, query_pos = append_answer(gm, inputs, answer)
        att = gm.attention(inputs, query_pos=query_pos, layers=layers, per_head=False)  # (L, V)
        maps = gm.split_grid(att.mean(0), inputs["layout"], inputs["image_wh"])
        wh = inputs["image_wh"][0]
        boxes = map_to_box(maps[0], wh, opts.sigma, footprint_of(gm, wh)) if maps else []
        return GroundingResult(maps=maps, boxes=boxes, answer=answer, extras={"layers": layers, "query": opts.query})


__all__ = ["AttentionProbe", "append_answer", "map_to_box"]
