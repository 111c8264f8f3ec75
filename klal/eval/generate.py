"""Greedy answers to dataset rows: the prompt as training renders it, left-padded into one batch, decoded with the
one greedy decoder (:func:`klal.decode.greedy_generate`, truly greedy whatever the checkpoint's generation
config says)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from klal.session import GroundingModel, sample_images


def prompt_batch(gm: GroundingModel, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The rows' prompts (chat template up to the assistant header, all of each row's images) as one left-padded
    batch of model inputs on the model's device."""
    images = [sample_images(r) for r in rows]
    prompts = [gm.collator.prompt_text(r["question"], len(ims)) for r, ims in zip(rows, images)]
    tok = gm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = gm.processor(text=prompts, images=[im for ims in images for im in ims], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    out = {k: v.to(gm.device) for k, v in enc.items() if torch.is_tensor(v)}
    out["pixel_values"] = out["pixel_values"].to(gm.model.dtype)
    return out


def greedy_answers(gm: GroundingModel, rows: Sequence[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """Greedy answer text to each row's question, decoded in one batch (special tokens dropped, whitespace
    stripped). Counts ``max_new_tokens`` forward passes at most (one per decoding step) in ``gm.passes``."""
    if not rows:
        return []
    ids = gm.decode_ids(prompt_batch(gm, rows), max_new_tokens)
    tok = gm.processor.tokenizer
    return [tok.decode(t, skip_special_tokens=True).strip() for t in ids]


__all__ = ["greedy_answers", "prompt_batch"]
