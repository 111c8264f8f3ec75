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
column. The prompt's positions come once from the model family (:meth:`klal.models.family.VLMFamily.prompt_positions`:
on the Qwen families the model's own ``get_rope_index``, 3-D mrope from ``mm_token_type_ids`` and ``image_grid_thw``,
padding excluded, so a padded row gets the positions it gets alone), and each generated token takes the row's next
text position (:meth:`~klal.models.family.VLMFamily.step_positions`), passed explicitly at every step. Stateful
position caches such as Qwen's ``rope_deltas`` are thus never read.

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

from klal.models.family import family_of

LogitsHook = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]
"""``(logits (B, vocab) float32, tokens generated so far per row) -> logits (B, vocab)``; it may run its own passes."""

Decoding = Literal["greedy", "generation_config"]
"""How an answer is decoded: ``greedy`` (:func:`greedy_generate`, the raw argmax) or ``generation_config``
(:func:`config_generate`, ``model.generate(do_sample=False)`` under the checkpoint's generation config)."""


def greedy_generate(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    logits_hook: LogitsHook | None = None,
) -> list[list[int]]:
    """Greedy (argmax) decoding of a batch of prompts, ignoring the checkpoint's generation config.

    Args:
        model: a VLM for conditional generation of a supported family (plain or peft-wrapped).
        inputs: the prompts as model inputs: ``input_ids`` ``(B, S)`` (left-padded), ``attention_mask`` (default all
            ones), and the family's image inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` on the
            Qwen families) for prompts with images. Keys the family does not read are ignored.
        max_new_tokens: most tokens generated per row (>= 1).
        eos_token_ids: tokens that end a row's answer (the family's end-of-turn token and the tokenizer's eos:
            :meth:`klal.models.family.VLMFamily.stop_token_ids`).
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
    family = family_of(model)
    positions = family.prompt_positions(model, inputs, mask)  # (3, B, S) on the Qwen families
    next_pos = family.next_positions(positions)  # (B,)
    cache_kw = _cache_kwarg(model)

    step_kw = {k: inputs[k] for k in family.input_keys if k in inputs and k not in ("input_ids", "attention_mask")}
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
                "position_ids": family.step_positions(next_pos),
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
        model: a VLM for conditional generation of a supported family (plain or peft-wrapped).
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
    kw = {k: inputs[k] for k in family_of(model).input_keys if k in inputs and k != "input_ids"}
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


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The name the installed transformers gives the KV cache argument and output (``cache``, or the older
    ``past_key_values``)."""
    params = inspect.signature(type(_unwrapped(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


__all__ = ["Decoding", "LogitsHook", "config_generate", "generate_ids", "greedy_generate"]
