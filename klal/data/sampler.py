"""Samplers that cut padding and keep every data-parallel rank in step.

Both samplers plan the whole epoch from ``(seed, epoch)`` alone, so every rank computes the same plan and takes its
own share of each step; no communication is needed and every rank gets the same number of batches (a rank that ran
out of batches before the others would leave them waiting in a collective forever).

* :class:`LengthGroupedSampler` yields sample indices for a ``DataLoader(batch_size=...)``. It shuffles, cuts the
  permutation into megabatches of ``megabatch_mult`` global batches, sorts each megabatch by length, and cuts it into
  global batches (``batch_size x num_replicas`` samples); rank ``r`` gets the ``r``-th slice of each global batch. The
  global batches of a step are therefore the same for any ``num_replicas`` with the same global batch size.
* :class:`TokenBudgetBatchSampler` yields whole batches (lists of indices): each batch's padded size
  (``longest sample x samples``) stays within ``max_tokens``, so short samples travel in big batches and long ones in
  small batches. Batches differ in sample count, within and across ranks.

Both subclass :class:`torch.utils.data.DistributedSampler` (constructed with explicit ``num_replicas``/``rank``, so no
process group is needed) because Lightning replaces any other sampler of a distributed run with its own, which would
undo the grouping; Lightning calls ``set_epoch`` on them at the start of every epoch.

Lengths come from :func:`estimate_lengths`, which reads only the ``width``, ``height``, ``question`` and ``answer``
columns (images are not decoded): visual tokens from the processor's resize rule, text tokens from the tokenizer. A
text-only sample (``width = height = 0``, see :mod:`klal.data.schema`) has no visual tokens and no image placeholder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from klal.data.collate import KLALCollator, PromptSettings

__all__ = ["LengthGroupedSampler", "TokenBudgetBatchSampler", "estimate_lengths", "padding_fraction"]

_LENGTH_COLUMNS = ("width", "height", "question", "answer")


def _sample_name(dataset: Any, index: int) -> str:
    """``sample 'ID' (row N)`` for row ``index`` of a dataset or a list of rows (``row N`` without an id column)."""
    if hasattr(dataset, "select_columns") and hasattr(dataset, "column_names"):
        sample = dataset.select_columns(["id"])[index]["id"] if "id" in dataset.column_names else None
    else:
        sample = dataset[index].get("id")
    return f"sample {sample!r} (row {index})" if sample is not None else f"row {index}"


def _columns(dataset: Any) -> dict[str, list[Any]]:
    """The length-relevant columns of a ``datasets.Dataset`` (without decoding images) or a list of row dicts."""
    if hasattr(dataset, "select_columns") and hasattr(dataset, "column_names"):
        missing = [c for c in _LENGTH_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"estimate_lengths: dataset lacks column(s) {missing} (the klal schema has them)")
        return dataset.select_columns(list(_LENGTH_COLUMNS))[:]
    rows = list(dataset)
    out: dict[str, list[Any]] = {c: [] for c in _LENGTH_COLUMNS}
    for i, row in enumerate(rows):
        missing = [c for c in _LENGTH_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"estimate_lengths: row {row.get('id', i)!r} lacks {missing}")
        for c in _LENGTH_COLUMNS:
            out[c].append(row[c])
    return out


def estimate_lengths(dataset: Any, processor: Any, prompt: PromptSettings | None = None) -> list[int]:
    """Token length of every sample as the collator will build it, without running the image processor.

    Exact for one image per row (the klal schema) up to tokenizer merges across the question/template boundary: chat
    template tokens + the image's tokens (from ``width``/``height`` and the processor's pixel bounds, by the model
    family: :meth:`klal.models.family.VLMFamily.image_token_count`, ``h/28 x w/28`` on Qwen2.5-VL) +
    question + answer + end-of-turn tokens. A text-only row (``width`` and ``height`` both 0 or None) counts the
    template without the image placeholder and no visual tokens.

    Args:
        dataset: a ``datasets.Dataset`` in the klal schema, or a sequence of row dicts with the same columns.
        processor: the processor the collator uses (its tokenizer, chat template and pixel bounds).
        prompt: the collator's prompt settings (system prompt and question suffix change the length).
    """
    prompt = prompt or PromptSettings()
    cols = _columns(dataset)
    # The collator's own rendering of an empty question: its length minus the one image placeholder is the template
    # overhead shared by every image sample (system prompt and question suffix included); text-only samples render
    # without the image block (<|vision_start|><|image_pad|><|vision_end|> on Qwen), so they get the zero-image
    # template's length.
    collator = KLALCollator(processor, prompt=prompt)
    family = collator.family
    tok = processor.tokenizer
    n_end = len(tok(collator.end_of_turn, add_special_tokens=False)["input_ids"])
    overhead = len(tok(collator.prompt_text("", 1), add_special_tokens=False)["input_ids"]) - 1 + n_end
    overhead_text = len(tok(collator.prompt_text("", 0), add_special_tokens=False)["input_ids"]) + n_end
    questions = [str(q) for q in cols["question"]]
    n_question = [len(ids) for ids in tok(questions, add_special_tokens=False)["input_ids"]] if questions else []
    n_answer = [len(ids) for ids in tok([str(a) for a in cols["answer"]], add_special_tokens=False)["input_ids"]]
    lengths = []
    for i, (w, h) in enumerate(zip(cols["width"], cols["height"])):
        if not w and not h:  # both 0 or None: a text-only sample
            lengths.append(overhead_text + n_question[i] + n_answer[i])
            continue
        try:
            n_image = family.image_token_count(processor, int(h or 0), int(w or 0))
        except ValueError as e:
            where = f"{_sample_name(dataset, i)}, image {int(w or 0)} x {int(h or 0)}"
            raise ValueError(f"estimate_lengths: {where}: {e}") from e
        lengths.append(overhead + n_image + n_question[i] + n_answer[i])
    return lengths


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded token slots of ``batches`` (right padding to each batch's longest sample) that is padding."""
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - real / slots if slots else 0.0


def _check_common(lengths: Sequence[int], num_replicas: int, rank: int, name: str) -> list[int]:
    if num_replicas < 1:
        raise ValueError(f"{name}: num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"{name}: rank {rank} is outside [0, {num_replicas})")
    lengths = [int(x) for x in lengths]
    if not lengths:
        raise ValueError(f"{name}: the dataset is empty")
    bad = next((i for i, x in enumerate(lengths) if x < 1), None)
    if bad is not None:
        raise ValueError(f"{name}: sample {bad} has length {lengths[bad]}; lengths must be >= 1")
    return lengths


def _longest_first(groups: list[Any], cost: list[int]) -> list[Any]:
    """Move the most expensive group to the front, so a batch that does not fit in memory fails at step 0."""
    top = max(range(len(groups)), key=cost.__getitem__)
    return [groups[top], *groups[:top], *groups[top + 1 :]]


class LengthGroupedSampler(DistributedSampler):
    """Shuffled sample indices for this rank, grouped so that each batch holds samples of similar length.

    Args:
        lengths: token length of every sample (see :func:`estimate_lengths`).
        batch_size: samples per rank per step (the DataLoader's ``batch_size``).
        num_replicas: data-parallel ranks (``trainer.world_size``).
        rank: this rank (``trainer.global_rank``).
        seed: shuffling seed; the plan depends on ``(seed, epoch)`` only.
        shuffle: shuffle before grouping; False groups in dataset order (evaluation).
        drop_last: drop the last incomplete global batch instead of filling it with samples from the start of the
            epoch's order.
        megabatch_mult: global batches per sorting window; larger groups lengths more tightly but makes batch
            composition less random.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        megabatch_mult: int = 50,
    ) -> None:
        lengths = _check_common(lengths, num_replicas, rank, "LengthGroupedSampler")
        if batch_size < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size must be >= 1, got {batch_size}")
        if megabatch_mult < 1:
            raise ValueError(f"LengthGroupedSampler: megabatch_mult must be >= 1, got {megabatch_mult}")
        global_batch = batch_size * num_replicas
        if drop_last and len(lengths) < global_batch:
            raise ValueError(
                f"LengthGroupedSampler: {len(lengths)} samples make no full global batch of {global_batch} "
                "(batch_size x num_replicas) with drop_last"
            )
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.lengths = lengths
        self.batch_size = batch_size
        self.global_batch = global_batch
        self.megabatch_mult = megabatch_mult
        n = len(lengths)
        steps = n // global_batch if drop_last else -(-n // global_batch)
        self.num_samples = steps * batch_size
        self.total_size = steps * global_batch

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (``batch_size x num_replicas`` indices each, longest sample first)."""
        n = len(self.lengths)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            # Fill the last global batch from the start of the order (cyclically when the dataset is tiny).
            order += [order[i % n] for i in range(self.total_size - n)]
        window = self.global_batch * self.megabatch_mult
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[j : j + self.global_batch] for j in range(0, len(chunk), self.global_batch)]
        if self.shuffle:
            # Shuffle whole batches so the epoch does not run from long to short within each window.
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return _longest_first(batches, [self.lengths[b[0]] * len(b) for b in batches])

    def __iter__(self) -> Iterator[int]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches():
            yield from batch[lo:hi]

    def __len__(self) -> int:
        return self.num_samples


class TokenBudgetBatchSampler(DistributedSampler):
    """Batches of indices for this rank whose padded token count (longest x samples) stays within ``max_tokens``.

    Samples are sorted by length with random tie-breaking (fairseq-style bucketing), packed greedily into batches,
    the batches are grouped ``num_replicas`` at a time into steps (neighbours in length, so ranks finish a step at about
    the same time) and the steps are shuffled. Since the packing follows the sorted lengths, the number of batches is
    the same every epoch; the randomness is in which equal-length samples share a batch and in the step order.

    Use it as a DataLoader ``sampler`` with ``batch_size=None`` over a dataset whose items are lists of rows (see
    :class:`klal.datamodule.RowBatches`), or as a ``batch_sampler`` when no distributed wrapping is involved.

    Args:
        lengths: token length of every sample (see :func:`estimate_lengths`).
        max_tokens: padded tokens per batch on one rank.
        num_replicas: data-parallel ranks.
        rank: this rank.
        seed: shuffling seed; the plan depends on ``(seed, epoch)`` only.
        shuffle: randomise tie-breaking and step order; False keeps a fixed order (evaluation).
        drop_last: drop the last steps when the number of batches does not divide by ``num_replicas``, instead of
            repeating batches from the start of the plan.
        max_batch_size: at most this many samples per batch (None: no cap).

    Raises:
        ValueError: a sample longer than ``max_tokens`` (named by index), or bad arguments.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        max_batch_size: int | None = None,
    ) -> None:
        lengths = _check_common(lengths, num_replicas, rank, "TokenBudgetBatchSampler")
        if max_tokens < 1:
            raise ValueError(f"TokenBudgetBatchSampler: max_tokens must be >= 1, got {max_tokens}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"TokenBudgetBatchSampler: max_batch_size must be >= 1 or None, got {max_batch_size}")
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > max_tokens:
            raise ValueError(
                f"TokenBudgetBatchSampler: sample {longest} has {lengths[longest]} tokens, more than the token budget "
                f"max_tokens={max_tokens}; raise the budget or lower max_pixels"
            )
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.lengths = lengths
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        n_batches = len(self._pack(sorted(range(len(lengths)), key=lambda i: -lengths[i])))
        if drop_last and n_batches < num_replicas:
            raise ValueError(
                f"TokenBudgetBatchSampler: {n_batches} batches cannot give each of {num_replicas} ranks one with "
                "drop_last"
            )
        self.num_steps = n_batches // num_replicas if drop_last else -(-n_batches // num_replicas)
        # DistributedSampler's per-rank item count; this sampler's items are batches.
        self.num_samples = self.num_steps

    def _pack(self, order: list[int]) -> list[list[int]]:
        """Greedy packing of indices sorted longest first: a batch closes when the next sample would break a cap."""
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            # Sorted longest first, so the batch's padded length is that of its first sample.
            width = self.lengths[cur[0]] if cur else self.lengths[i]
            full = self.max_batch_size is not None and len(cur) >= self.max_batch_size
            if cur and (width * (len(cur) + 1) > self.max_tokens or full):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def steps(self) -> list[list[list[int]]]:
        """This epoch's plan: one list of ``num_replicas`` batches per step (rank ``r`` takes entry ``r``)."""
        n = len(self.lengths)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        tie = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        order = sorted(range(n), key=lambda i: (-self.lengths[i], tie[i]))
        batches = self._pack(order)
        w = self.num_replicas
        total = self.num_steps * w
        batches = batches[:total] + [batches[i % len(batches)] for i in range(total - len(batches))]
        steps = [batches[s * w : (s + 1) * w] for s in range(self.num_steps)]
        if self.shuffle:
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        return _longest_first(steps, [max(self.lengths[b[0]] * len(b) for b in step) for step in steps])

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps():
            yield list(step[self.rank])

    def __len__(self) -> int:
        return self.num_steps
