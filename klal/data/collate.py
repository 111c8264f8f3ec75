"""Collator: schema rows -> Qwen2.5-VL model inputs, answer-only labels, and target maps on each image's token grid.

Each row is rendered with the processor's chat template as ``user: <image> question`` followed by the
assistant answer. The prompt goes through the processor (which expands ``<|image_pad|>`` to the image's token count
and returns ``mm_token_type_ids``, without which the model silently falls back to 1-D positions); the answer is
tokenised separately and appended, so the answer-token positions are exact. Labels are ``-100`` everywhere except the
answer and its end-of-turn token.

Target maps are built per image on the grid the processor actually used (``image_grid_thw`` h/2 x w/2) from the
evidence in original-image pixels, and concatenated in the order the visual tokens appear in the sequence (row-major
per image, images in order), which is the key order of :class:`klal.capture.CaptureRequest`.

Several images in one sample: give the row ``image`` as a list of images and ``evidence`` as a list of evidence dicts,
one per image (an empty dict for an image without evidence). With ``joint`` supervision each image that has a map gets
an equal share of the target mass.

Text-only samples: a row whose ``image`` is None or an empty list renders without an image placeholder, so it has no
``<|image_pad|>`` tokens and its ``mm_token_type_ids`` are all 0 (text). It gets no target map, counted in
:class:`NoMapCounter` with the reason ``no image``, and trains with next-token loss only. Its evidence must be empty.
Text-only and image rows can share a batch (the model's 3-D positions give text rows plain 1-D ones). A batch without
any image has no ``pixel_values`` / ``image_grid_thw``: the model then skips the vision tower and numbers the positions
itself, which for text gives the same attention (the three mrope axes coincide and rotary attention depends only on
position differences, so left padding shifts nothing). Its ``target`` / ``key_image`` are ``(B, 1)`` placeholders
with no valid visual token.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import torch

from klal.data.images import to_rgb
from klal.data.schema import Evidence, is_text_only
from klal.data.targets import TargetMapError, TargetSpec, build_target_map_with_reason
from klal.geometry import MERGE, PATCH_PX

IGNORE_INDEX = -100
NO_IMAGE_REASON = "no image"
"""The :class:`NoMapCounter` reason of text-only samples."""


class _BatchTensors(TypedDict):
    input_ids: torch.Tensor
    """(B, S) long: chat-formatted prompt (with ``<|image_pad|>`` expanded to the image's tokens), answer and
    end-of-turn token ids; padded with the pad id on the right (training) or left (generation)."""
    attention_mask: torch.Tensor
    """(B, S) long: 1 for real tokens, 0 for padding."""
    labels: torch.Tensor
    """(B, S) long: the answer and end-of-turn token ids, :data:`IGNORE_INDEX` (-100) everywhere else (NTP targets;
    the model shifts them)."""
    answer_mask: torch.Tensor
    """(B, S) bool: the answer's content tokens (not the end-of-turn token): where the KLAL queries are chosen."""
    mm_token_type_ids: torch.Tensor
    """(B, S) long: 0 text, 1 image token; the model derives its 3-D mrope positions from it."""
    target: torch.Tensor
    """(B, V) float32: each sample's target distribution over its visual tokens in sequence order (images in order,
    row-major per image), summing to 1 where ``has_target``; V is the batch's largest visual-token count (at least 1),
    zero beyond a sample's own tokens."""
    has_target: torch.Tensor
    """(B,) bool: the sample has a target map (False: text-only, or no evidence mass; see ``no_map_reason``)."""
    key_image: torch.Tensor
    """(B, V) long: index (within the sample) of the image each visual-token slot belongs to, -1 for padding slots."""
    grids: list[list[tuple[int, int]]]
    """Per sample, per image: the visual-token grid ``(gh, gw)`` (``image_grid_thw`` h / 2, w / 2)."""
    no_map_reason: list[str | None]
    """Per sample: why it has no target map (one of :data:`klal.data.targets.NO_MAP_REASONS`, ``no image``, ...),
    or None."""
    ids: list[str]
    """Per sample: the row's ``id`` (named in errors), else its position in the batch."""


class KLALBatch(_BatchTensors, total=False):
    """What :class:`KLALCollator` returns: the model inputs, the NTP labels and the KLAL targets of B samples padded
    to S tokens. The two image keys are present only when the batch holds at least one image (the model runs its
    vision tower only when ``pixel_values`` is given)."""

    pixel_values: torch.Tensor
    """(P, 1176) float32: the processor's patches of every image of the batch, images in order (P = sum of t*h*w of
    ``image_grid_thw``; 1176 = 3 channels x 2 frames x 14 x 14 px)."""
    image_grid_thw: torch.Tensor
    """(N, 3) long: per image, its patch grid (t, h, w) in 14-px patches; visual tokens = t*h*w / 4."""


@dataclass
class PromptSettings:
    """How a schema row becomes a chat."""

    system_prompt: str | None = None
    """System message; None keeps the chat template's default."""
    question_suffix: str = ""
    """Text appended to every question (e.g. an answer-format instruction)."""
    end_of_turn: str = "<|im_end|>"
    """Token that ends the assistant turn; it is appended to the answer and supervised by NTP."""


@dataclass
class NoMapCounter:
    """Counts samples that got no target map, by reason (reported in logs and by the demo)."""

    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        """Count one sample without a map."""
        self.reasons[reason] += 1

    @property
    def total(self) -> int:
        """All samples without a map so far."""
        return sum(self.reasons.values())


class KLALCollator:
    """Turn a list of schema rows into one padded batch.

    Args:
        processor: a Qwen2.5-VL processor (tokenizer + image processor + chat template).
        target: how evidence becomes a target map.
        prompt: chat rendering settings.
        padding_side: ``right`` for training, ``left`` for batched generation.
        max_length: refuse samples longer than this many tokens (None: no limit).
    """

    def __init__(
        self,
        processor: Any,
        target: TargetSpec | None = None,
        prompt: PromptSettings | None = None,
        padding_side: Literal["left", "right"] = "right",
        max_length: int | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.target = target or TargetSpec()
        self.prompt = prompt or PromptSettings()
        self.padding_side = padding_side
        self.max_length = max_length
        self.image_token_id = int(processor.image_token_id)
        self.merge = int(getattr(processor.image_processor, "merge_size", MERGE))
        self.patch = int(getattr(processor.image_processor, "patch_size", PATCH_PX))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self.no_map = NoMapCounter()

    # -- prompt rendering ---------------------------------------------------------------------------------------
    def prompt_text(self, question: str, num_images: int) -> str:
        """The chat-formatted prompt up to and including the assistant header."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question + self.prompt.question_suffix})
        messages: list[dict[str, Any]] = []
        if self.prompt.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.prompt.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer_ids(self, answer: str) -> tuple[list[int], int]:
        """Token ids of ``answer + end_of_turn`` and the count of answer content tokens among them."""
        content = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        end = self.tokenizer(self.prompt.end_of_turn, add_special_tokens=False)["input_ids"]
        return list(content) + list(end), len(content)

    # -- main entry -----------------------------------------------------------------------------------------------
    def __call__(self, rows: list[dict[str, Any]]) -> KLALBatch:
        images_per_row = [
            [to_rgb(im, _sample_id(r, i)) for im in _row_images(r, _sample_id(r, i))] for i, r in enumerate(rows)
        ]
        images = [im for ims in images_per_row for im in ims]
        prompts = [self.prompt_text(r["question"], len(ims)) for r, ims in zip(rows, images_per_row)]
        enc = self.processor(text=prompts, images=images or None, padding=False, return_tensors=None)
        if images:
            grid_thw = torch.as_tensor(np.asarray(enc["image_grid_thw"]), dtype=torch.long).reshape(-1, 3)
        else:
            grid_thw = torch.zeros((0, 3), dtype=torch.long)

        seqs, labels, answer_masks, mm_types = [], [], [], []
        for i, row in enumerate(rows):
            p_ids = list(enc["input_ids"][i])
            mm = list(enc["mm_token_type_ids"][i]) if "mm_token_type_ids" in enc else [0] * len(p_ids)
            a_ids, n_content = self.answer_ids(str(row["answer"]))
            if n_content == 0 or not str(row["answer"]).strip():
                raise ValueError(f"sample {row.get('id', i)!r}: empty answer {row['answer']!r} (nothing to supervise)")
            ids = p_ids + a_ids
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(
                    f"sample {row.get('id', i)!r}: {len(ids)} tokens exceed max_length={self.max_length} "
                    "(lower max_pixels or raise max_length)"
                )
            seqs.append(ids)
            labels.append([IGNORE_INDEX] * len(p_ids) + a_ids)
            answer_masks.append([0] * len(p_ids) + [1] * n_content + [0] * (len(a_ids) - n_content))
            mm_types.append(mm + [0] * len(a_ids))

        batch = self._pad(seqs, labels, answer_masks, mm_types)
        if images:
            # Without any image the keys stay out: the model runs its vision tower only when pixel_values is given,
            # and an empty pixel tensor would still enter it.
            batch["pixel_values"] = torch.as_tensor(np.asarray(enc["pixel_values"]), dtype=torch.float32)
            batch["image_grid_thw"] = grid_thw
        batch.update(self._targets(rows, images_per_row, grid_thw))
        batch["ids"] = [str(r.get("id", i)) for i, r in enumerate(rows)]
        return batch

    def _pad(self, seqs, labels, answer_masks, mm_types) -> dict[str, torch.Tensor]:
        n = max(len(s) for s in seqs)
        b = len(seqs)
        out = {
            "input_ids": torch.full((b, n), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((b, n), dtype=torch.long),
            "labels": torch.full((b, n), IGNORE_INDEX, dtype=torch.long),
            "answer_mask": torch.zeros((b, n), dtype=torch.bool),
            "mm_token_type_ids": torch.zeros((b, n), dtype=torch.long),
        }
        for i, (s, lab, am, mm) in enumerate(zip(seqs, labels, answer_masks, mm_types)):
            sl = slice(n - len(s), n) if self.padding_side == "left" else slice(0, len(s))
            out["input_ids"][i, sl] = torch.tensor(s)
            out["attention_mask"][i, sl] = 1
            out["labels"][i, sl] = torch.tensor(lab)
            out["answer_mask"][i, sl] = torch.tensor(am, dtype=torch.bool)
            out["mm_token_type_ids"][i, sl] = torch.tensor(mm)
        return out

    def _targets(self, rows, images_per_row, grid_thw) -> dict[str, Any]:
        """``target`` (B, V), ``has_target`` (B,), ``key_image`` (B, V), ``grids`` and ``no_map_reason`` per row."""
        per_row_maps: list[list[np.ndarray | None]] = []
        grids: list[list[tuple[int, int]]] = []
        reasons: list[str | None] = []
        k = 0
        for i, (row, ims) in enumerate(zip(rows, images_per_row)):
            evs = row.get("evidence")
            if not ims:
                _check_no_evidence(evs, _sample_id(row, i))
                per_row_maps.append([])
                grids.append([])
                reasons.append(NO_IMAGE_REASON)
                continue
            ev_list = evs if isinstance(evs, list) else [evs] + [None] * (len(ims) - 1)
            if len(ev_list) != len(ims):
                raise ValueError(f"sample {row.get('id', i)!r}: {len(ims)} images but {len(ev_list)} evidence entries")
            maps, g, why = [], [], []
            for im, ev in zip(ims, ev_list):
                _, gh14, gw14 = (int(x) for x in grid_thw[k])
                k += 1
                gh, gw = gh14 // self.merge, gw14 // self.merge
                g.append((gh, gw))
                evidence = ev if isinstance(ev, Evidence) else Evidence.from_dict(ev)
                try:
                    m, reason = build_target_map_with_reason(
                        evidence,
                        orig_hw=(im.height, im.width),
                        processed_hw=(gh14 * self.patch, gw14 * self.patch),
                        spec=self.target,
                    )
                except TargetMapError as e:
                    raise TargetMapError(f"sample {row.get('id', i)!r}: {e}") from e
                if m is not None and m.shape != (gh, gw):
                    raise RuntimeError(f"sample {row.get('id', i)!r}: target map {m.shape} != token grid {(gh, gw)}")
                maps.append(m)
                why.append(reason)
            per_row_maps.append(maps)
            grids.append(g)
            if all(m is None for m in maps):
                reasons.append("; ".join(sorted({r for r in why if r})) or "no evidence")
            else:
                reasons.append(None)
        # Counted only once the whole batch is valid, so a batch that raises leaves no partial counts behind.
        for reason in reasons:
            if reason is not None:
                self.no_map.add(reason)

        n_vis = [sum(h * w for h, w in g) for g in grids]
        v = max(max(n_vis, default=0), 1)
        target = torch.zeros((len(rows), v), dtype=torch.float32)
        key_image = torch.full((len(rows), v), -1, dtype=torch.long)
        for i, (maps, g) in enumerate(zip(per_row_maps, grids)):
            n_with = sum(m is not None for m in maps)
            off = 0
            for j, (m, (gh, gw)) in enumerate(zip(maps, g)):
                key_image[i, off : off + gh * gw] = j
                if m is not None:
                    target[i, off : off + gh * gw] = torch.from_numpy(m.reshape(-1) / n_with).float()
                off += gh * gw
        return {
            "target": target,
            "has_target": torch.tensor([r is None for r in reasons], dtype=torch.bool),
            "key_image": key_image,
            "grids": grids,
            "no_map_reason": reasons,
        }


def _sample_id(row: dict[str, Any], index: int) -> str:
    """The id errors name: the row's ``id``, else its position in the batch."""
    return str(row.get("id", index))


def _row_images(row: dict[str, Any], sample_id: str) -> list[Any]:
    """The row's images as a list: empty for a text-only sample (``image`` None or an empty list).

    Raises:
        ValueError: the row has no ``image`` field at all (a text-only sample says so with ``image: None``).
    """
    if "image" not in row:
        raise ValueError(
            f"sample {sample_id!r}: no 'image' field; give an image, a list of images, or None for a text-only sample"
        )
    image = row["image"]
    if is_text_only(image):
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _check_no_evidence(evidence: Any, sample_id: str) -> None:
    """Refuse evidence on a text-only sample: there is no image for it to point into.

    Accepts None, an empty list, or evidence dicts / :class:`Evidence` without geometry (the schema column always
    holds a dict, with empty lists for a text-only row).
    """
    entries = evidence if isinstance(evidence, list) else [evidence]
    for ev in entries:
        if ev is None:
            continue
        if not isinstance(ev, (dict, Evidence)):
            raise TypeError(f"sample {sample_id!r}: evidence must be a dict, got {type(ev).__name__}")
        if not (ev if isinstance(ev, Evidence) else Evidence.from_dict(ev)).is_empty():
            raise ValueError(f"sample {sample_id!r}: has evidence but no image; a text-only sample has empty evidence")
