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

from typing import Any, Literal

import numpy as np
import torch

from klal.capture import parse_layers
from klal.grounding.base import (
    GroundingError,
    GroundingModel,
    GroundingResult,
    register_method,
    sample_images,
    timed,
    timed_batch,
)
from klal.grounding.ops import cells_to_pixels, extract_regions

ProbeQuery = Literal["prompt_last", "answer_last", "generated_last"]


def append_answer(gm: GroundingModel, inputs: dict[str, Any], answer: str) -> tuple[dict[str, Any], int]:
    """``inputs`` with ``answer`` + end-of-turn appended (as the collator does in training).

    Returns:
        The extended inputs and the sequence position of the answer's last content token.
    """
    ids, n_content = gm.collator.answer_ids(answer)
    if n_content == 0:
        raise GroundingError("cannot probe the answer token of an empty answer")
    extra = torch.tensor([ids], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(ids)))
    out["visual_mask"] = out["input_ids"] == gm.image_token_id
    return out, inputs["input_ids"].shape[1] + n_content - 1


def map_to_box(
    grid: np.ndarray, image_wh: tuple[int, int], sigma: float = 1.0
) -> list[tuple[float, float, float, float]]:
    """The strongest region of a relevance grid as one box in original pixels (empty list for a flat map)."""
    regions = extract_regions(grid, sigma=sigma, top_k=1)
    return [cells_to_pixels(r.box, grid.shape, image_wh) for r in regions]


@register_method("attention_probe")
class AttentionProbe:
    """Head- and layer-averaged attention of one query token over the visual tokens.

    Args:
        layers: language layers to average: ``all``, ``"4-11"``, ``"-8:"`` or a list.
        query: ``prompt_last``, ``answer_last`` (gold answer, teacher-forced) or ``generated_last``.
        sigma: smoothing (tokens) before the map is boxed.
        max_new_tokens: decoding cap for ``generated_last``.
    """

    answers = False

    def __init__(
        self,
        layers: str | list[int] = "all",
        query: ProbeQuery = "prompt_last",
        sigma: float = 1.0,
        max_new_tokens: int = 16,
    ) -> None:
        if query not in ("prompt_last", "answer_last", "generated_last"):
            raise GroundingError(
                f"attention_probe: query must be prompt_last, answer_last or generated_last, not {query!r}"
            )
        self.layers = layers
        self.query: ProbeQuery = query
        self.sigma = sigma
        self.max_new_tokens = max_new_tokens
        # An instance answers only in generated_last mode; evaluate.py reads this per instance.
        self.answers = query == "generated_last"

    def run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        return timed(gm, lambda: self._run(gm, sample))

    def run_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        """Probe several rows; ``prompt_last`` and ``answer_last`` share one padded forward pass.

        ``generated_last`` decodes each row's own answer first, so its rows run one at a time. A batched result
        reports the batch's passes and an even share of its seconds (:func:`klal.grounding.base.timed_batch`).
        """
        if self.query == "generated_last":
            return [self.run(gm, s) for s in samples]
        return timed_batch(gm, lambda: self._run_batch(gm, samples))

    def _run_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        layers = parse_layers(self.layers, gm.num_layers)
        out = []
        for att, grids, sizes in gm.batch_attention(samples, self.query, layers, per_head=False):  # att: (L, V)
            maps = gm.split_grid(att.mean(0), grids)
            boxes = map_to_box(maps[0], sizes[0], self.sigma) if maps else []
            out.append(GroundingResult(maps=maps, boxes=boxes, extras={"layers": layers, "query": self.query}))
        return out

    def _run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        images = sample_images(sample)
        inputs = gm.inputs(images, sample["question"])
        layers = parse_layers(self.layers, gm.num_layers)
        answer = None
        query_pos = None
        if self.query == "answer_last":
            inputs, query_pos = append_answer(gm, inputs, str(sample["answer"]))
        elif self.query == "generated_last":
            answer = gm.generate(inputs, self.max_new_tokens)
            if answer:
                inputs, query_pos = append_answer(gm, inputs, answer)
        att = gm.attention(inputs, query_pos=query_pos, layers=layers, per_head=False)  # (L, V)
        maps = gm.split_grid(att.mean(0), inputs["grids"])
        boxes = map_to_box(maps[0], inputs["image_sizes"][0], self.sigma) if maps else []
        return GroundingResult(maps=maps, boxes=boxes, answer=answer, extras={"layers": layers, "query": self.query})


__all__ = ["AttentionProbe", "append_answer", "map_to_box"]
