"""What a fine-tuned model attends to where KLAL supervises it, and how well it answers, from one teacher-forced pass.

The quantity KLAL trains is the attention of the answer's query tokens over the visual tokens, on the prompt + gold
answer rendered as in training (:class:`klal.data.collate.KLALCollator`). This module is its one implementation:

* :func:`query_grids`: per-sample ``(gh, gw)`` grids of a capture's maps, averaged over the valid query tokens and the
  captured layers (the capture renormalises over visual tokens per head, then averages the heads);
* :func:`teacher_forced_exact`, :func:`token_accuracy`, :func:`answer_nll`: per-sample scores of the same pass's
  logits against the gold answer (token accuracy is dominated by format tokens such as ``(``, ``,`` and the
  end-of-turn token; exact match needs every answer token right, see :func:`teacher_forced_exact`);
* :class:`TeacherForcedAttention`: both as a grounding method, so the engine (:mod:`klal.eval.engine`) runs it like any
  other: the study's evaluation and learning curves and the demo use it, with greedy answers (:mod:`klal.eval.generate`)
  when asked.

Exact match in one teacher-forced pass: greedy decoding produces the gold answer token sequence followed by the
end-of-turn token exactly when, with the gold prefix fed in, every gold answer token and the closing end-of-turn token
is the argmax at its position (each greedy step then reproduces the next gold token, and the first wrong argmax is where
greedy decoding would leave the gold sequence). It is token-exact (another tokenisation of the same string counts as
wrong), which is why real greedy generation scored by the normalised match is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from klal.capture import CaptureRequest, QueryMode, parse_layers, select_queries
from klal.data.collate import IGNORE_INDEX
from klal.grounding.base import GroundingMethod, GroundingResult
from klal.models.family import nest_grids
from klal.session import GroundingModel


def query_grids(
    gm: GroundingModel,
    request: CaptureRequest,
    grids: list[list[tuple[int, int]]],
    grid_image: list[list[int]],
    image_wh: list[list[tuple[int, int]]] | None = None,
) -> list[list[np.ndarray]]:
    """Captured attention per sample and image, on each image's token grid.

    Args:
        request: a request a forward pass filled (head-mean maps, ``per_head`` off).
        gm: the model session (its family merges an image's grids into one map).
        grids: per sample, its visual-token grids (the collator's ``grids``).
        grid_image: per sample, the image of each grid (the collator's ``grid_image``).
        image_wh: per sample, its images' ``(W, H)`` (the collator's ``image_wh``), so that an image's several grids
            merge through their footprints; None merges them as equal cells (a tile-major family refuses that).

    Returns:
        ``maps[b][j]``: ``(gh, gw)`` float64 attention of sample ``b`` over image ``j``: the mean over the captured
        layers and the sample's valid queries (a sample's maps sum to 1 over all its images).
    """
    q = request.stacked().exp()  # (L, B, A, V)
    qv = request.query_valid.to(q.dtype)  # (B, A)
    q = (q * qv[None, :, :, None]).sum(2) / qv.sum(-1).clamp_min(1)[None, :, None]  # (L, B, V)
    q = q.mean(0).double().cpu()  # (B, V)
    out = []
    for b, layout in enumerate(nest_grids(grids, grid_image)):
        n = sum(h * w for g in layout for h, w in g)
        out.append(gm.split_grid(q[b, :n], layout, None if image_wh is None else image_wh[b]))
    return out


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(B, S-1, vocab)`` predicting labels ``(B, S-1)`` and the supervised-label mask."""
    lab = labels[:, 1:].to(logits.device)
    return logits[:, :-1], lab, lab != IGNORE_INDEX


def teacher_forced_exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: every supervised label (answer tokens and the end-of-turn token) is the argmax at its position.

    Equals greedy-decoding exact match on the token sequence (module docstring). A sample without a supervised label
    is never right.
    """
    lg, lab, mask = _shifted(logits, labels)
    ok = (lg.argmax(-1) == lab) | ~mask
    return ok.all(-1) & mask.any(-1)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` share of each sample's supervised tokens whose teacher-forced argmax is right (0 without any)."""
    lg, lab, mask = _shifted(logits, labels)
    return ((lg.argmax(-1) == lab) & mask).sum(-1).float() / mask.sum(-1).clamp_min(1)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean next-token loss (nats) over each sample's supervised tokens (0 without any)."""
    lg, lab, mask = _shifted(logits, labels)
    nll = torch.nn.functional.cross_entropy(lg.float().transpose(1, 2), lab.clamp_min(0), reduction="none")  # (B, S-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)


class TeacherForcedAttention(GroundingMethod):
    """The attention KLAL supervises, read back: one teacher-forced pass over prompt + gold answer per batch.

    Maps: the captured attention of the ``query`` tokens (:func:`klal.capture.select_queries`) over the visual tokens,
    averaged over the ``layers``. Each result's ``extras`` hold the pass's ``exact_tf`` (bool), ``token_acc`` and
    ``answer_nll`` (module docstring); with ``max_new_tokens`` > 0 the result's answer is the greedy answer to the
    question (:func:`klal.eval.generate.greedy_answers`), which the metrics score with the normalised match. Boxes:
    none (the box metrics skip these rows). Not registered: a way to measure a model being trained, not a
    training-free baseline.
    """

    name = "teacher_forced_attention"
    batched = True
    predicts_boxes = False

    @dataclass(frozen=True)
    class Options:
        """Options of :class:`TeacherForcedAttention`."""

        query: QueryMode = "last"
        """Query tokens: ``last``, ``first`` or ``all`` answer tokens, ``prompt_last`` (the token before them), or
        ``word`` (the question word the sample's meta names as ``query_word``)."""
        layers: str | list[int] = "all"
        """Language layers to average (``klal.capture.parse_layers`` syntax)."""
        max_new_tokens: int = 0
        """Also answer by greedy decoding with at most this many tokens (0: no answer)."""

    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Any]) -> GroundingResult:
        return self.ground_batch(gm, [sample])[0]

    def ground_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        opts = self.options
        layers = gm.layer_ids(parse_layers(opts.layers, gm.num_layers))
        batch = gm.collator(samples)
        kw = {k: batch[k].to(gm.device) for k in gm.family.input_keys if k in batch}
        kw["pixel_values"] = kw["pixel_values"].to(gm.model.dtype)
        word = batch.get("word_mask")
        queries = select_queries(
            batch["answer_mask"].to(gm.device), opts.query, None if word is None else word.to(gm.device)
        )
        visual = gm.family.visual_token_mask(
            kw["input_ids"], gm.image_token_id, nest_grids(batch["grids"], batch["grid_image"])
        )
        req = CaptureRequest.from_masks(queries, visual, layers)
        gm.passes["forward"] += 1
        with torch.no_grad():
            logits = gm.model(**kw, klal_capture=req, use_cache=False).logits
        maps = query_grids(gm, req, batch["grids"], batch["grid_image"], batch["image_wh"])
        req.clear()
        labels = batch["labels"]
        exact = teacher_forced_exact(logits, labels).tolist()
        tok = token_accuracy(logits, labels).tolist()
        nll = answer_nll(logits, labels).tolist()
        answers: list[str | None] = [None] * len(samples)
        if opts.max_new_tokens > 0:
            from klal.eval.generate import greedy_answers

            answers = list(greedy_answers(gm, samples, opts.max_new_tokens))
        extras = {"query": opts.query, "layers": layers}
        return [
            GroundingResult(
                maps=m, answer=a, extras={**extras, "exact_tf": bool(e), "token_acc": float(t), "answer_nll": float(n)}
            )
            for m, a, e, t, n in zip(maps, answers, exact, tok, nll)
        ]


__all__ = ["TeacherForcedAttention", "answer_nll", "query_grids", "teacher_forced_exact", "token_accuracy"]
