"""Answer decoding: the greedy decoder (plain argmax with a KV cache, on a batch of left-padded prompts with images),
and the authors' ``generate(do_sample=False)`` for the baselines that follow their code.

**Truly greedy, whatever the checkpoint says.** ``model.generate(do_sample=False)`` is not plain greedy decoding: it
still runs the logits processors that the checkpoint's ``generation_config`` asks for, and Qwen2.5-VL-Instruct ships
``repetition_penalty=1.05`` (with ``top_k=1``, ``top_p=0.001``, ``temperature=0.1``). A repetition penalty changes
which token has the largest score, so such "greedy" answers differ from the argmax of the model's logits, from the
teacher-forced exact match and from any hand-written loop. A fresh ``GenerationConfig`` is not enough either:
``generate`` fills every field that the given config leaves unset from the checkpoint's config, so a "plain greedy"
config would have to name every logits processor transformers has (and will add). :func:`greedy_generate` therefore
never calls ``generate``: it is an explicit loop (with a KV cache) that takes the argmax of the raw next-token logits
at every step, so ``repetition_penalty``, ``no_repeat_ngram_size``, ``top_k``, ``top_p``, ``temperature``, bad-word
lists, forced tokens and every other setting of the generation config are ignored. The only change to the logits is
the one the caller asks for with ``logits_hook`` (LASER's contrastive decoding, which runs its own passes per step).

**Batches and positions.** Rows are left-padded (``attention_mask`` 0 on the padding, as
:class:`klal.data.collate.KLALCollator` pads with ``padding_side="left"``), so every row's next token is at the last
column. Qwen2.5-VL numbers positions in 3-D (mrope) from ``mm_token_type_ids`` and ``image_grid_thw``; the prompt's
positions are computed once with the model's own ``get_rope_index`` (padding excluded, so a padded row gets the
positions it gets alone), and each generated token takes the row's next text position (all three axes equal),
passed explicitly at every step. The model's stateful ``rope_deltas`` are thus never read.

**Decoding as the authors ran it.** The released code of ViCrop and of entropy-gradient grounding answers with
``model.generate(do_sample=False, max_new_tokens=...)``, which does apply the checkpoint's generation config (its
repetition penalty and n-gram ban, not its sampling settings). :func:`config_generate` decodes that way, so those
baselines' answers can be compared with the authors' numbers; :func:`generate_ids` picks one of the two
(:data:`Decoding`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

LogitsHook = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]
"""``(logits (B, vocab) float32, tokens generated so far per row) -> logits (B, vocab)``; it may run its own passes."""

Decoding = Literal["greedy", "generation_config"]
"""How an answer is decoded: ``greedy`` (:func:`greedy_generate`, the raw argmax) or ``generation_config``
(:func:`config_generate`, ``model.generate(do_sample=False)`` under the checkpoint's generation config)."""

_PROMPT_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def greedy_generate(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    logits_hook: LogitsHook | None = None,
) -> list[list[int]]:
    """Greedy (argmax) decoding of a batch of prompts, ignoring the checkpoint's generation config.

    Args:
        model: a Qwen2.5-VL for conditional generation (plain or peft-wrapped).
        inputs: the prompts as model inputs: ``input_ids`` ``(B, S)`` (left-padded), ``attention_mask`` (default all
            ones), and ``pixel_values`` / ``image_grid_thw`` / ``mm_token_type_ids`` for prompts with images. Other
            keys are ignored.
        max_new_tokens: most tokens generated per row (>= 1).
        eos_token_ids: tokens that end a row's answer (e.g. ``<|im_end|>`` and the tokenizer's eos).
        logits_hook: optional change of each step's logits before the argmax (see :data:`LogitsHook`).

    Returns:
        Per row, the generated token ids, cut before the first eos token (which is not included).

    Raises:
        ValueError: ``max_new_tokens`` < 1, or no eos token.
    """
    stops = _checked_stops(max_new_tokens, eos_token_ids)
    ids = inputs["input_ids"]
    b = ids.shape[0]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
    positions = prompt_positions(model, inputs, mask)  # (3, B, S)
    next_pos = positions.amax(dim=(0, 2)) + 1  # (B,): padding sits at position 0, so it never wins the max
    cache_kw = _cache_kwarg(model)

    step_kw = {k: inputs[k] for k in _PROMPT_KEYS if k in inputs}
    step_kw.update(input_ids=ids, attention_mask=mask, position_ids=positions)
    generated: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    cache = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(**step_kw, **({cache_kw: cache} if cache is not None else {}), use_cache=True, logits_to_keep=1)
            cache = getattr(out, cache_kw, None)
            if cache is None:
                raise RuntimeError(f"the model returned no KV cache ({cache_kw!r}) with use_cache=True")
            logits = out.logits[:, -1].float()  # (B, vocab)
            if logits_hook is not None:
                logits = logits_hook(logits, [list(g) for g in generated])
            nxt = logits.argmax(dim=-1)  # (B,)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in stops:
                    done[i] = True
                else:
                    generated[i].append(int(t))
            if bool(done.all()):
                break
            # Finished rows keep being fed (their token is ignored); the batch shape stays fixed.
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            step_kw = {
                "input_ids": nxt[:, None].to(ids.dtype),
                "attention_mask": mask,
                "position_ids": next_pos.view(1, b, 1).expand(3, b, 1).clone(),
            }
            next_pos = next_pos + 1
    return generated


def config_generate(
    model: torch.nn.Module, inputs: dict[str, Any], max_new_tokens: int, eos_token_ids: Sequence[int]
) -> list[list[int]]:
    """``model.generate(do_sample=False, max_new_tokens=max_new_tokens)`` under the checkpoint's generation config.

    The decoding the authors' ViCrop and EGG code runs: greedy search, but the config's logits processors apply (a
    ``repetition_penalty`` over the prompt and the answer so far, ``no_repeat_ngram_size``, ...); its sampling
    settings (``temperature``, ``top_k``, ``top_p``) do not, since ``do_sample=False``. Decoding also stops at
    ``eos_token_ids`` (with the config's own eos tokens): the answer ends there anyway, and stopping there makes the
    number of steps run the one :func:`greedy_generate` would count.

    Args:
        model: a Qwen2.5-VL for conditional generation (plain or peft-wrapped).
        inputs: as for :func:`greedy_generate` (left-padded ``input_ids``, ``attention_mask``, image keys).
        max_new_tokens: most tokens generated per row (>= 1).
        eos_token_ids: tokens that end a row's answer.

    Returns:
        Per row, the generated token ids, cut before the first eos token (which is not included).

    Raises:
        ValueError: ``max_new_tokens`` < 1, or no eos token.
    """
    stops = _checked_stops(max_new_tokens, eos_token_ids)
    configured = model.generation_config.eos_token_id
    if configured is not None:
        stops |= {int(t) for t in (configured if isinstance(configured, (list, tuple)) else [configured])}
    ids = inputs["input_ids"]
    kw = {k: inputs[k] for k in ("attention_mask", *_PROMPT_KEYS) if k in inputs}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, **kw, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stops)
        )
    rows = []
    for new in out[:, ids.shape[1] :].tolist():
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        rows.append(new[:end])
    return rows


def generate_ids(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    decoding: Decoding = "greedy",
    logits_hook: LogitsHook | None = None,
) -> list[list[int]]:
    """:func:`greedy_generate` or :func:`config_generate`, as ``decoding`` says.

    Raises:
        ValueError: an unknown ``decoding``, or a ``logits_hook`` with ``generation_config`` (the hook changes the
            argmax of :func:`greedy_generate`'s own loop).
    """
    if decoding == "greedy":
        return greedy_generate(model, inputs, max_new_tokens, eos_token_ids, logits_hook)
    if decoding != "generation_config":
        raise ValueError(f"decoding must be 'greedy' or 'generation_config', got {decoding!r}")
    if logits_hook is not None:
        raise ValueError("a logits_hook needs decoding='greedy'")
    return config_generate(model, inputs, max_new_tokens, eos_token_ids)


def _checked_stops(max_new_tokens: int, eos_token_ids: Sequence[int]) -> set[int]:
    """The stop tokens as a set, after checking the decoding limits (ValueError naming the bad one)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = {int(t) for t in eos_token_ids}
    if not stops:
        raise ValueError("eos_token_ids is empty: decoding would never stop at an answer's end")
    return stops


def prompt_positions(model: torch.nn.Module, inputs: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """The ``(3, B, S)`` mrope positions of left-padded prompts, as the model computes them (padding at 0).

    With ``mm_token_type_ids`` the model's own ``get_rope_index`` gives them (3-D positions for image tokens, padding
    excluded); without (a text-only model input) they are the running count of real tokens, on all three axes.
    """
    ids = inputs["input_ids"]
    if "mm_token_type_ids" in inputs:
        rope = _rope_owner(model)
        pos, _ = rope.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=mask,
        )
        return pos
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos[None].expand(3, -1, -1).clone()


def _rope_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The submodule that has ``get_rope_index`` (the Qwen2.5-VL model under a peft or generation wrapper)."""
    for mod in model.modules():
        if callable(getattr(mod, "get_rope_index", None)):
            return mod
    raise RuntimeError("the model has no get_rope_index: greedy_generate needs a Qwen2.5-VL model")


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The name the installed transformers gives the KV cache argument and output (``cache``, or the older
    ``past_key_values``)."""
    for mod in model.modules():
        if hasattr(mod, "get_rope_index"):
            params = inspect.signature(type(mod).forward).parameters
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


__all__ = ["Decoding", "LogitsHook", "config_generate", "generate_ids", "greedy_generate", "prompt_positions"]
