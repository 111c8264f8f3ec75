"""Attention capture: the selected query rows' attention over each sample's visual tokens, without
``output_attentions``.

``output_attentions=True`` needs eager attention and materialises ``(B, H, S, S)`` per layer. Instead, klal
registers an attention function with transformers' ``AttentionInterface`` that

1. computes the layer output with the fast kernel (sdpa, or flash-attention when requested), unchanged, and
2. for the selected query positions of each sample, recomputes ``softmax(q_sel k_vis^T * scale)`` over that sample's
   visual-token keys only (post-rotary q and k, GQA heads repeated), then averages over heads.

Memory therefore grows with ``layers x heads x selected queries x visual tokens``, never with ``S^2``. The scores
are those of the model's own attention: the same scale, the logit soft-capping the layer passes (``softcap``: Gemma 2)
and the mask the model built for that layer, read at the selected rows and visual keys (sliding windows that hide
visual keys from far queries, Gemma 3's bidirectional image blocks, padding; without a 4-D mask, the kernel's
causality and the ``sliding_window`` it is given). So the result equals the eager attention row renormalised over
visual tokens per head. Attention sinks (``s_aux``) add one logit to every row's denominator and cancel in that
renormalisation. A query that sees no visual key at a layer gets a uniform row (its attention over visual keys is
undefined; the loss's gradient through it is zero).

The request travels as a forward keyword (``klal_capture=request``) so it reaches every decoder layer through
transformers' ``**kwargs`` plumbing, and is replayed by non-reentrant gradient checkpointing during backward. The
recomputation must run the same ops (its saved tensors are matched by order) but must not store its maps: a recomputed
map's autograd graph holds the whole recomputed layer, so a map kept past its layer's backward keeps every layer's
activations alive and undoes the checkpointing. A request therefore stores each layer's map once, and nothing after
:meth:`CaptureRequest.clear` (the step has consumed the maps; what runs later is the recomputation). Reentrant
checkpointing (``use_reentrant=True``, DeepSpeed's activation checkpointing) runs the forward without autograd, so no
gradient could reach the maps: a request that needs gradients refuses it in one line.

Usage::

    name = register_capture_attention("sdpa")          # -> "klal_sdpa"
    set_text_attn_implementation(model, name)          # vision tower stays on sdpa
    request = CaptureRequest.from_masks(query_mask, visual_mask, layers=None)
    out = model(**batch, klal_capture=request)
    log_q = request.stacked()                          # (L, B, A, V) log of head-mean attention over visual keys
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_KWARG = "klal_capture"
CAPTURE_PREFIX = "klal_"
_BASE_OF: dict[str, str] = {}
"""Registered capture name -> the kernel it wraps (a hub kernel's ``org/repo`` cannot appear in a name: transformers
would read ``klal_org/repo`` as another hub kernel)."""

QueryMode = Literal["last", "all", "first", "prompt_last", "word"]


@dataclass
class CaptureRequest:
    """What to capture in one forward pass, and where the captured maps land.

    Attributes:
        query_index: ``(B, A)`` sequence positions of the selected query tokens, padded with 0.
        query_valid: ``(B, A)`` True where ``query_index`` is a real query.
        key_index: ``(B, V)`` sequence positions of each sample's visual tokens (row-major per image, images in order),
            padded with 0.
        key_valid: ``(B, V)`` True where ``key_index`` is a real visual token.
        layers: language-model layer indices to capture; None captures every layer.
        per_head: keep each head's map (``(B, H, A, V)`` per layer) instead of the head mean (probes need heads).
        differentiable_rows: make the layer *output* of the selected query rows flow through an explicitly computed
            softmax over all keys, kept in ``full_probs``, so that gradients of the model output with respect to
            those attention weights exist (ViCrop's grad-att). The output is numerically the kernel's. Batch size 1,
            no padding, and the selected rows must see every earlier key (causal), which holds for prompt tokens.
        log_maps: layer index -> ``(B, A, V)`` (or ``(B, H, A, V)`` with ``per_head``) float32 log of the attention
            over visual keys, renormalised over visual keys per head. Padded keys hold a large negative value, padded
            queries hold a uniform row.
        full_probs: layer index -> ``(B, H, A, S)`` attention probabilities over all keys (``differentiable_rows``).
        key_bias: ``(B, A, V)`` logits added to the selected rows' attention scores on the visual keys (every head,
            every requested layer), the rows then recomputed as with ``differentiable_rows`` (batch size 1): an
            intervention, e.g. an oracle that makes a query look at the evidence, not a measurement. The captured maps
            stay those of the unbiased scores.
        needs_grad: whether the maps must carry gradients (KLAL is trained from them). None follows the grad mode;
            False computes them without autograd (a measurement: nothing saved for backward, nothing recomputed);
            True refuses a layer that runs without autograd (reentrant gradient checkpointing), where KLAL would
            silently get no gradient.
        closed: set by :meth:`clear`: the maps were consumed, later calls (the gradient-checkpoint recomputation
            during backward) store nothing.
    """

    query_index: torch.Tensor
    query_valid: torch.Tensor
    key_index: torch.Tensor
    key_valid: torch.Tensor
    layers: frozenset[int] | None = None
    per_head: bool = False
    differentiable_rows: bool = False
    log_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    full_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    key_bias: torch.Tensor | None = None
    needs_grad: bool | None = None
    closed: bool = False

    @classmethod
    def from_masks(
        cls, query_mask: torch.Tensor, visual_mask: torch.Tensor, layers: Iterable[int] | None = None
    ) -> CaptureRequest:
        """Build a request from boolean ``(B, S)`` masks of the query positions and the visual-token positions."""
        q_idx, q_valid = _mask_to_index(query_mask)
        k_idx, k_valid = _mask_to_index(visual_mask)
        return cls(q_idx, q_valid, k_idx, k_valid, None if layers is None else frozenset(int(i) for i in layers))

    def wants(self, layer_idx: int | None) -> bool:
        """Whether this layer's map is requested."""
        return layer_idx is not None and (self.layers is None or layer_idx in self.layers)

    def stacked(self) -> torch.Tensor:
        """All captured maps as ``(L, B, A, V)`` in increasing layer order."""
        if not self.log_maps:
            raise RuntimeError(
                "no attention was captured: the text backbone is not using a klal capture attention implementation "
                "(call klal.capture.enable_capture(model)) or no requested layer exists"
            )
        return torch.stack([self.log_maps[i] for i in sorted(self.log_maps)])

    def clear(self) -> None:
        """Drop the captured maps (and the autograd graph they hold) and close the request: a gradient-checkpoint
        recomputation that runs later (during backward) stores no maps again."""
        self.log_maps.clear()
        self.full_probs.clear()
        self.closed = True


def _mask_to_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S)`` bool mask -> left-aligned ``(B, N)`` positions and validity, N = max count per row (at least 1)."""
    mask = mask.bool()
    counts = mask.sum(-1)  # (B,)
    n = max(int(counts.max().item()) if mask.numel() else 0, 1)
    # Stable sort puts True positions first while keeping their order.
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :n]  # (B, N)
    valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]  # (B, N)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def visual_attention_log_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    per_head: bool = False,
    softcap: float | None = None,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log head-mean (or per-head) attention of selected queries over visual keys.

    Args:
        query: ``(B, H, S, D)`` post-rotary queries.
        key: ``(B, Hkv, S, D)`` post-rotary keys before GQA repetition.
        scaling: softmax scale (``head_dim ** -0.5``).
        query_index: ``(B, A)`` selected query positions.
        query_valid: ``(B, A)`` validity of ``query_index``.
        key_index: ``(B, V)`` visual key positions.
        key_valid: ``(B, V)`` validity of ``key_index``.
        per_head: return every head's map instead of the head mean.
        softcap: logit soft-capping ``softcap * tanh(score / softcap)`` after scaling, as the layer's kernel does.
        visible: ``(B, A, V)`` bool, False where the layer's mask hides the key from the query (:func:`visible_keys`).

    Returns:
        ``(B, A, V)`` float32 ``log(mean_h softmax_v(q_h k_v * scaling))``, or ``(B, H, A, V)`` per head.
        Invalid keys get ``-1e9`` (probability zero), rows of invalid queries or of samples without visual tokens
        are uniform, so nothing is NaN.
    """
    b, h, _, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    a, v = query_index.shape[1], key_index.shape[1]
    q_sel = query.gather(2, query_index[:, None, :, None].expand(b, h, a, d))  # (B, H, A, D)
    k_vis = key.gather(2, key_index[:, None, :, None].expand(b, hkv, v, d))  # (B, Hkv, V, D)
    # Query head h uses KV head h // g (transformers' repeat_kv layout), so group queries instead of repeating keys.
    scores = torch.matmul(q_sel.view(b, hkv, g * a, d), k_vis.transpose(-1, -2)).view(b, hkv, g, a, v)
    scores = scores.float() * scaling  # (B, Hkv, G, A, V)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = key_valid[:, None, :] & query_valid[:, :, None]  # (B, A, V)
    if visible is not None:
        keep = keep & visible
    keep = keep[:, None, None].expand_as(scores)
    # Finite fill keeps fully masked rows uniform instead of NaN; those rows are ignored by the loss.
    scores = scores.masked_fill(~keep, -1e9)
    log_p = torch.log_softmax(scores, dim=-1)  # (B, Hkv, G, A, V)
    if per_head:
        return log_p.flatten(1, 2)  # (B, H, A, V), head index = kv_head * G + group member
    return torch.logsumexp(log_p.flatten(1, 2), dim=1) - math.log(h)  # (B, A, V)


def _make_capture_fn(base: str):
    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        request: CaptureRequest | None = kwargs.pop(CAPTURE_KWARG, None)
        out = ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, **kwargs)
        layer_idx = getattr(module, "layer_idx", None)
        if request is None or not request.wants(layer_idx):
            return out
        rows = request.differentiable_rows or request.key_bias is not None
        if request.closed and not rows and request.needs_grad is False:
            return out  # recomputation of a measurement: nothing of it is saved for backward, nothing to replay
        if request.needs_grad and not request.closed and not torch.is_grad_enabled():
            raise RuntimeError(
                "KLAL needs gradients through the attention maps, but this decoder layer runs without autograd: "
                "reentrant gradient checkpointing (use_reentrant=True, DeepSpeed activation checkpointing) hides them; "
                "use non-reentrant checkpointing (klal's gradient_checkpointing, FSDP activation checkpointing)"
            )
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        softcap = kwargs.get("softcap")
        visible = visible_keys(
            attention_mask, module, kwargs, request.query_index, request.key_index, query.shape[2], key.shape[2]
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and request.needs_grad is not False):
            log_q = visual_attention_log_probs(
                query,
                key,
                scaling,
                request.query_index,
                request.query_valid,
                request.key_index,
                request.key_valid,
                per_head=request.per_head,
                softcap=softcap,
                visible=visible,
            )
        # Gradient-checkpoint recomputation runs this again during backward: keep the forward's map only (see the
        # module docstring), and none once the request is closed.
        if not request.closed:
            request.log_maps.setdefault(layer_idx, log_q)
        if rows:
            mask = (attention_mask, module, kwargs, softcap)
            out = (_route_rows(out[0], query, key, value, scaling, request, layer_idx, mask), *out[1:])
        return out

    capture_attention.__name__ = f"klal_capture_{base}"
    return capture_attention


def _route_rows(
    attn_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    request: CaptureRequest,
    layer_idx: int,
    mask: tuple[Any, torch.nn.Module | None, dict[str, Any], float | None] = (None, None, {}, None),
) -> torch.Tensor:
    """Recompute the selected rows' output as ``softmax(q k^T + bias) v`` over the keys the layer's mask shows them,
    and splice it in (``mask``: the attention function's mask, module, keyword arguments and soft-capping; the
    default is plain causal attention).

    The kernel's output carries no handle on its attention weights; this explicit path keeps one (``full_probs``)
    so that a gradient of the model output reaches them. Without ``key_bias`` values agree with the kernel to float
    tolerance.
    """
    b, h, s, d = query.shape
    if b != 1:
        raise ValueError("differentiable_rows and key_bias captures need batch size 1")
    attention_mask, module, kwargs, softcap = mask
    if kwargs.get("s_aux") is not None:
        raise ValueError("differentiable_rows and key_bias captures do not support attention sinks (s_aux)")
    hkv = key.shape[1]
    g = h // hkv
    pos = request.query_index[0][request.query_valid[0]]  # (A,)
    q_sel = query[0][:, pos]  # (H, A, D)
    k = key[0].repeat_interleave(g, dim=0)  # (H, S, D)
    v = value[0].repeat_interleave(g, dim=0)  # (H, S, D)
    scores = torch.matmul(q_sel, k.transpose(-1, -2)).float() * scaling  # (H, A, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if request.key_bias is not None:
        keys = request.key_index[0][request.key_valid[0]]  # (V,)
        bias = request.key_bias[0][request.query_valid[0]][:, : len(keys)].float()  # (A, V)
        scores = scores.index_add(-1, keys, bias[None].expand(scores.shape[0], -1, -1))
    all_keys = torch.arange(key.shape[2], device=query.device)[None]  # (1, S_k)
    hidden = ~visible_keys(attention_mask, module, kwargs, pos[None], all_keys, s, key.shape[2])[0]  # (A, S_k)
    probs = torch.softmax(scores.masked_fill(hidden[None], float("-inf")), dim=-1)[None]  # (1, H, A, S_k)
    if torch.is_grad_enabled():
        # With frozen weights nothing upstream needs grad; a leaf keeps d(output)/d(probs) available all the same.
        if not probs.requires_grad:
            probs = probs.detach().requires_grad_(True)
        else:
            probs.retain_grad()
    if not request.closed:
        request.full_probs.setdefault(layer_idx, probs)
    rows = torch.matmul(probs[0].to(v.dtype), v)  # (H, A, D)
    attn_out = attn_out.clone()
    attn_out[0, pos] = rows.transpose(0, 1).to(attn_out.dtype)  # kernel output is (B, S, H, D)
    return attn_out


def visible_keys(
    attention_mask: torch.Tensor | None,
    module: torch.nn.Module | None,
    kwargs: dict[str, Any],
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    q_len: int,
    k_len: int,
) -> torch.Tensor:
    """``(B, A, V)`` bool: which of the keys ``key_index`` the layer lets each query ``query_index`` see.

    With flex attention's ``BlockMask`` it is the block mask's own ``mask_mod`` asked at those rows and keys. With a
    4-D mask (what sdpa and eager receive: bool, True = attend, or additive float, 0 = attend) it is that
    mask read at those rows and keys, so whatever the model built for the layer (causal, sliding window, bidirectional
    image blocks, padding) applies. Without one (sdpa's causal fast path, flash attention's 2-D padding mask) the
    kernel applies causality when ``module.is_causal`` and the ``sliding_window`` it is given
    (``key > query - window``, transformers' window), so those are applied here.

    Args:
        attention_mask: the mask the attention function received.
        module: the attention module (``is_causal``).
        kwargs: the attention function's keyword arguments (``sliding_window``).
        query_index: ``(B, A)`` query positions among the ``q_len`` queries.
        key_index: ``(B, V)`` key positions among the ``k_len`` keys.
        q_len: number of queries (the last ``q_len`` positions of the ``k_len`` keys).
        k_len: number of keys.
    """
    b = query_index.shape[0]
    mask_mod = getattr(attention_mask, "mask_mod", None)
    if mask_mod is not None:  # flex attention's BlockMask: ask its mask function at exactly these rows and keys
        batch = torch.arange(b, device=query_index.device)[:, None, None]  # (B, 1, 1)
        got = mask_mod(batch, torch.zeros_like(batch), query_index[:, :, None], key_index[:, None, :])  # (B, A, V)
        return got.to(torch.bool).expand(b, query_index.shape[1], key_index.shape[1])
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[:, 0].expand(b, -1, -1)  # (B, q_len, k_len); the head axis is broadcast
        rows = torch.arange(b, device=m.device)[:, None, None]
        got = m[rows, query_index[:, :, None].to(m.device), key_index[:, None, :].to(m.device)]  # (B, A, V)
        return (got if got.dtype == torch.bool else got > torch.finfo(got.dtype).min / 2).to(query_index.device)
    q_pos = query_index[:, :, None] + (k_len - q_len)  # (B, A, 1) positions among the keys
    k_pos = key_index[:, None, :]  # (B, 1, V)
    visible = torch.ones(b, query_index.shape[1], key_index.shape[1], dtype=torch.bool, device=query_index.device)
    if getattr(module, "is_causal", True):
        visible = visible & (k_pos <= q_pos)
    window = kwargs.get("sliding_window")
    if window:
        visible = visible & (k_pos > q_pos - int(window))
    return visible


def register_capture_attention(base: str = "sdpa", eager_fn: Callable[..., Any] | None = None) -> str:
    """Register ``klal_<base>`` (attention + mask function) with transformers and return the name.

    Args:
        base: the kernel that computes the layer output: ``sdpa``, ``eager``, or any other name registered with
            transformers' ``AttentionInterface`` (flash-attention, ``flex_attention``, a loaded hub kernel; see
            :func:`klal.kernels.resolve_attn_implementation`).
        eager_fn: for ``eager``, the model family's eager attention function
            (:meth:`klal.models.family.VLMFamily.eager_attention`). The families' functions compute the same thing
            (repeat the KV heads, softmax of ``q k^T * scale + mask``, dropout, times ``v``), so the last one
            registered serves every model in the process.
    """
    if base.startswith(CAPTURE_PREFIX):
        return base
    if base not in ALL_ATTENTION_FUNCTIONS and base != "eager":
        raise ValueError(f"attention implementation {base!r} is not available; choose sdpa, eager or flash_attention_2")
    # Keeps the base's name in it: transformers reads "flash" / "flex_attention" / "sdpa" in a name to prepare inputs.
    name = CAPTURE_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", base)
    _BASE_OF[name] = base
    if base == "eager":
        if eager_fn is None:
            raise ValueError("register_capture_attention('eager') needs the model family's eager_fn")
        AttentionInterface.register("eager_fn_for_klal", eager_fn)
        base_key = "eager_fn_for_klal"
    else:
        base_key = base
    AttentionInterface.register(name, _make_capture_fn(base_key))
    # Without a mask function registered under the same name, transformers builds no mask and padding is ignored.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def enable_capture(model: torch.nn.Module, base: str | None = None) -> str:
    """Switch the language model of ``model`` to the capture attention (vision tower untouched); returns the name."""
    from klal.models.family import family_of
    from klal.models.loader import set_text_attn_implementation, text_config

    text_cfg = text_config(model)
    current = text_cfg._attn_implementation or "sdpa"
    base = base or (
        _BASE_OF.get(current, current[len(CAPTURE_PREFIX) :]) if current.startswith(CAPTURE_PREFIX) else current
    )
    name = register_capture_attention(base, family_of(model).eager_attention() if base == "eager" else None)
    set_text_attn_implementation(model, name)
    return name


def attention_layer_ids(spec: str | list[int] | None, attention_layers: list[int]) -> list[int]:
    """The decoder-layer indices ``spec`` picks when only the full-attention layers ``attention_layers`` count.

    On a model whose layers all have softmax attention this is :func:`parse_layers`; on a hybrid model (Qwen3.5)
    ``"-2:"`` picks the last two full-attention layers, whatever linear-attention layers lie between them.
    """
    return [attention_layers[i] for i in parse_layers(spec, len(attention_layers))]


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Resolve a layer selection: None/"all", "a-b" (inclusive), "a:b" (python slice), "-4:" or an explicit list.

    Raises:
        ValueError: naming the bad layer spec.
    """
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        s = spec.strip()
        try:
            if ":" in s:
                lo, hi = (int(x) if x else None for x in s.split(":", 1))
                out = list(range(num_layers))[slice(lo, hi)]
            elif "-" in s[1:]:
                lo, hi = (int(x) for x in s.split("-", 1))
                out = list(range(lo, hi + 1))
            else:
                out = [int(x) for x in s.split(",")]
        except ValueError as e:
            raise ValueError(f"klal layers: cannot parse {spec!r} (use 'all', '4-11', '-8:', or a list)") from e
    else:
        out = [int(x) for x in spec]
    bad = [i for i in out if not 0 <= (i if i >= 0 else num_layers + i) < num_layers]
    if bad or not out:
        raise ValueError(f"klal layers {spec!r}: model has {num_layers} language layers (0..{num_layers - 1})")
    return sorted({i % num_layers for i in out})


def select_queries(answer_mask: torch.Tensor, mode: QueryMode, word_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``(B, S)`` mask of the query positions whose attention is supervised.

    Args:
        answer_mask: ``(B, S)`` True on answer content tokens.
        mode: ``last``/``first``/``all`` answer token, ``prompt_last``: the last prompt token (the position that
            predicts the first answer token), or ``word``: the last token of the question word each sample names in
            its meta (``query_word``; the collator's ``word_mask``), e.g. the object a lookup question asks about.
        word_mask: ``(B, S)`` True on the named word's tokens (needed by ``word``).
    """
    am = answer_mask.bool()
    pos = torch.arange(am.shape[1], device=am.device)[None, :].expand_as(am)
    out = torch.zeros_like(am)
    if mode == "all":
        return am.clone()
    if mode == "word":
        if word_mask is None:
            raise ValueError(
                "klal query 'word' needs samples whose meta names the question word (meta key query_word); "
                "this batch has none"
            )
        am = word_mask.bool()
    has = am.any(-1)
    if mode in ("last", "word"):
        idx = torch.where(am, pos, torch.full_like(pos, -1)).amax(-1)
    elif mode == "first":
        idx = torch.where(am, pos, torch.full_like(pos, am.shape[1])).amin(-1)
    elif mode == "prompt_last":
        idx = torch.where(am, pos, torch.full_like(pos, am.shape[1])).amin(-1) - 1
    else:
        raise ValueError(f"unknown klal query mode {mode!r}; choose last, all, first, prompt_last or word")
    rows = torch.nonzero(has & (idx >= 0)).squeeze(-1)
    out[rows, idx[rows]] = True
    return out
