"""Attention capture against eager ``output_attentions`` on the tiny model, with padded mixed-size batches, and with
text-only rows (no visual token) in the batch or making up the whole batch."""

from __future__ import annotations

import json

import pytest
import torch

from klal.capture import CaptureRequest, register_capture_attention, select_queries
from klal.data.collate import KLALCollator
from klal.loss import klal_loss
from klal.models.qwen2_5_vl.tiny import build_tiny_model
from tests.conftest import make_text_row

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@pytest.fixture(scope="module")
def models():
    sdpa = build_tiny_model(seed=0, attn_implementation="sdpa")
    cap = build_tiny_model(seed=0, attn_implementation=register_capture_attention("sdpa"))
    eager = build_tiny_model(seed=0, attn_implementation="eager")
    return sdpa, cap, eager


def _eager_reference(att: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Eager rows of the selected queries over visual keys, renormalised per head, then averaged over heads."""
    rows = att[:, q_idx][:, :, k_idx]  # (H, A, V)
    return (rows / rows.sum(-1, keepdim=True)).mean(0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("query_mode", ["last", "all", "prompt_last"])
def test_capture_equals_eager_rows(models, tiny_processor, mixed_rows, padding_side, query_mode):
    sdpa, cap, eager = models
    batch = KLALCollator(tiny_processor, padding_side=padding_side)(mixed_rows)
    assert batch["attention_mask"].min() == 0, "the batch must be padded for this test to mean something"
    inputs = {k: batch[k] for k in MODEL_KEYS}
    visual = batch["input_ids"] == tiny_processor.image_token_id
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], query_mode), visual)
    with torch.no_grad():
        ref_logits = sdpa(**inputs).logits
        out = cap(**inputs, klal_capture=request)
        e = eager(**inputs, output_attentions=True)
    valid = batch["attention_mask"].bool()
    # Same kernel for the output: logits identical to plain sdpa.
    assert torch.equal(out.logits[valid], ref_logits[valid])
    n_layers = cap.config.text_config.num_hidden_layers
    assert sorted(request.log_maps) == list(range(n_layers))
    worst = 0.0
    for layer in range(n_layers):
        got = request.log_maps[layer].exp()
        for b in range(len(mixed_rows)):
            qi = request.query_index[b][request.query_valid[b]]
            ki = request.key_index[b][request.key_valid[b]]
            ref = _eager_reference(e.attentions[layer][b], qi, ki)
            worst = max(worst, (got[b, : len(qi), : len(ki)] - ref).abs().max().item())
            # Padded visual keys carry no probability.
            if got.shape[-1] > len(ki):
                assert got[b, : len(qi), len(ki) :].max().item() < 1e-12
    assert worst < 1e-5


def test_visual_keys_follow_each_samples_grid(tiny_processor, mixed_rows):
    batch = KLALCollator(tiny_processor)(mixed_rows)
    visual = batch["input_ids"] == tiny_processor.image_token_id
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], "last"), visual)
    counts = request.key_valid.sum(-1).tolist()
    expected = [int(t.prod()) // 4 for t in batch["image_grid_thw"]]
    assert counts == expected
    assert [sum(h * w for h, w in g) for g in batch["grids"]] == expected


def test_layer_subset_and_memory_shape(models, tiny_processor, mixed_rows):
    _, cap, _ = models
    batch = KLALCollator(tiny_processor)(mixed_rows)
    visual = batch["input_ids"] == tiny_processor.image_token_id
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], "all"), visual, layers=[1, 3])
    with torch.no_grad():
        cap(**{k: batch[k] for k in MODEL_KEYS}, klal_capture=request)
    stacked = request.stacked()
    n_answer = int(batch["answer_mask"].sum(-1).max())
    # (L, B, A, V): grows with layers x answer tokens x visual tokens, never with the sequence length squared.
    assert stacked.shape == (2, 3, n_answer, int(visual.sum(-1).max()))
    assert sorted(request.log_maps) == [1, 3]


def test_no_capture_request_means_no_work(models, tiny_processor, mixed_rows):
    _, cap, _ = models
    batch = KLALCollator(tiny_processor)(mixed_rows)
    with torch.no_grad():
        out = cap(**{k: batch[k] for k in MODEL_KEYS})
    assert torch.isfinite(out.logits).all()
    empty = CaptureRequest.from_masks(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="no attention was captured"):
        empty.stacked()


def test_per_head_maps_equal_eager_rows_per_head(models, tiny_processor, mixed_rows):
    _, cap, eager = models
    batch = KLALCollator(tiny_processor)(mixed_rows[:1])
    inputs = {k: batch[k] for k in MODEL_KEYS}
    visual = batch["input_ids"] == tiny_processor.image_token_id
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], "prompt_last"), visual)
    request.per_head = True
    with torch.no_grad():
        cap(**inputs, klal_capture=request)
        e = eager(**inputs, output_attentions=True)
    qi = request.query_index[0][request.query_valid[0]]
    ki = request.key_index[0][request.key_valid[0]]
    for layer, log_map in request.log_maps.items():
        got = log_map.exp()[0]  # (H, A, V)
        rows = e.attentions[layer][0][:, qi][:, :, ki]
        assert torch.allclose(got, rows / rows.sum(-1, keepdim=True), atol=1e-5)


def test_differentiable_rows_keep_output_and_give_attention_gradients(models, tiny_processor, mixed_rows, monkeypatch):
    """The spliced rows reproduce the kernel's logits, and d(log p)/d(attention weight) agrees with a finite
    difference: adding +-eps to one attention weight of the explicit softmax changes log p as the gradient says."""
    _, cap, _ = models
    batch = KLALCollator(tiny_processor)(mixed_rows[:1])
    n_prompt = int(torch.nonzero(batch["answer_mask"][0])[0])
    inputs = {
        k: batch[k][:, :n_prompt] if k != "pixel_values" and batch[k].dim() == 2 else batch[k] for k in MODEL_KEYS
    }
    seq = inputs["input_ids"].shape[1]
    visual = inputs["input_ids"] == tiny_processor.image_token_id
    last = torch.zeros_like(visual)
    last[0, -1] = True
    layer = 2

    def request() -> CaptureRequest:
        r = CaptureRequest.from_masks(last, visual, layers=[layer])
        r.differentiable_rows = True
        return r

    with torch.no_grad():
        plain = cap(**inputs).logits
    req = request()
    with torch.enable_grad():
        logits = cap(**inputs, klal_capture=req).logits
        assert torch.allclose(logits, plain, atol=1e-5)
        top = int(logits[0, -1].argmax())
        torch.log_softmax(logits[0, -1], -1)[top].backward()
    grad = req.full_probs[layer].grad  # (1, H, A, S)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    key = int(req.key_index[0, 3])
    eps = 1e-3
    real_softmax = torch.softmax

    def logp_with(delta: float) -> float:
        def softmax_plus(x, dim):
            p = real_softmax(x, dim=dim)
            if p.dim() == 3 and p.shape[-1] == seq:  # the explicit (H, A, S) rows of the capture
                p = p.clone()
                p[0, 0, key] += delta
            return p

        monkeypatch.setattr(torch, "softmax", softmax_plus)
        try:
            with torch.no_grad():
                out = cap(**inputs, klal_capture=request()).logits
        finally:
            monkeypatch.setattr(torch, "softmax", real_softmax)
        return float(torch.log_softmax(out[0, -1].double(), -1)[top])

    fd = (logp_with(eps) - logp_with(-eps)) / (2 * eps)
    assert abs(fd - float(grad[0, 0, 0, key])) < 1e-3 * max(1.0, abs(fd))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_only_rows_capture_nothing_and_klal_equals_the_eager_klal_of_the_image_rows(
    models, tiny_processor, mixed_rows, padding_side
):
    """A batch mixing image rows and text-only rows: the image rows' captured maps equal eager attention, the text rows'
    maps are finite placeholders, and KLAL equals a hand computation from the eager maps of the image rows alone."""
    sdpa, cap, eager = models
    rows = [make_text_row(0), mixed_rows[0], make_text_row(1, answer="(12, 10) and (3, 4)"), mixed_rows[1]]
    batch = KLALCollator(tiny_processor, padding_side=padding_side)(rows)
    inputs = {k: batch[k] for k in MODEL_KEYS}
    visual = batch["input_ids"] == tiny_processor.image_token_id
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], "last"), visual)
    assert request.key_valid.any(-1).tolist() == [False, True, False, True]
    with torch.no_grad():
        ref_logits = sdpa(**inputs).logits
        out = cap(**inputs, klal_capture=request)
        e = eager(**inputs, output_attentions=True)
    valid = batch["attention_mask"].bool()
    assert torch.equal(out.logits[valid], ref_logits[valid])
    log_q = request.stacked()  # (L, B, A, V)
    assert torch.isfinite(log_q).all()
    eps = 1e-4
    per_row = []
    for b in (1, 3):
        qi = request.query_index[b][request.query_valid[b]]
        ki = request.key_index[b][request.key_valid[b]]
        p = batch["target"][b, : len(ki)].double()
        p = (1 - eps) * p + eps / len(ki)
        kl = []
        for layer in range(log_q.shape[0]):
            ref = _eager_reference(e.attentions[layer][b], qi, ki).double()  # (A=1, V)
            assert torch.allclose(log_q[layer, b, : len(qi), : len(ki)].exp().double(), ref, atol=1e-5)
            kl.append((p * (p.log() - ref.log())).sum(-1).mean())
        per_row.append(torch.stack(kl).mean())
    expected = torch.stack(per_row).mean().item()
    res = klal_loss(log_q, batch["target"], batch["has_target"], request.query_valid, request.key_valid, epsilon=eps)
    assert res.has_map.tolist() == [False, True, False, True]
    assert res.per_sample[[0, 2]].tolist() == [0.0, 0.0]
    assert res.klal.item() == pytest.approx(expected, rel=1e-4)


def test_all_text_batch_gives_zero_klal_attached_to_the_graph(tiny_processor):
    """No visual token in any row: the capture still returns (placeholder) maps, and KLAL is a finite 0 whose graph
    reaches the model's weights, so a backward pass visits the same parameters as on a batch with images."""
    cap = build_tiny_model(seed=0, attn_implementation=register_capture_attention("sdpa"))
    batch = KLALCollator(tiny_processor)([make_text_row(0), make_text_row(1, answer="(12, 10)")])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    visual = batch["input_ids"] == tiny_processor.image_token_id
    assert not visual.any()
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], "last"), visual)
    cap(**inputs, klal_capture=request)
    log_q = request.stacked()
    assert log_q.shape[-1] == 1 and torch.isfinite(log_q).all() and log_q.requires_grad
    res = klal_loss(log_q, batch["target"], batch["has_target"], request.query_valid, request.key_valid)
    assert res.klal.item() == 0.0 and res.num_with_map == 0 and res.target_mass.item() == 0.0
    res.klal.backward()
    q_proj = cap.model.language_model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and torch.isfinite(q_proj.grad).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_only_batch_logits_equal_each_row_run_alone(models, tiny_processor, padding_side):
    """Without ``image_grid_thw`` the model numbers positions itself (from 0, padding included); for text this must
    give the same logits as each row run alone, also with left padding."""
    sdpa, _, _ = models
    rows = [make_text_row(0), make_text_row(1, answer="(12, 10) and (3, 4)", question="Where are the two stars?")]
    batch = KLALCollator(tiny_processor, padding_side=padding_side)(rows)
    assert batch["attention_mask"].min() == 0, "the batch must be padded for this test to mean something"
    with torch.no_grad():
        logits = sdpa(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}).logits
        for i in range(len(rows)):
            real = batch["attention_mask"][i].bool()
            alone = sdpa(input_ids=batch["input_ids"][i][real][None]).logits[0]
            assert torch.allclose(logits[i][real], alone, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_word_query_is_the_last_token_of_the_named_word(tiny_processor, padding_side):
    from data_gen.tasks.lookup import ColourLookupTask, LookupConfig, NeighbourLookupTask
    from data_gen.writer import sample_row

    colour = ColourLookupTask(LookupConfig(image_size=112, rows=(3, 3), cols=(3, 3)))
    neighbour = NeighbourLookupTask(LookupConfig(image_size=112, rows=(3, 3), cols=(3, 3)))
    rows = [sample_row(colour, 0, i) for i in range(3)] + [sample_row(neighbour, 0, 0)]
    rows.append(make_text_row(9))  # meta names no word: no query for this row
    batch = KLALCollator(tiny_processor, padding_side=padding_side)(rows)
    query = select_queries(batch["answer_mask"], "word", batch["word_mask"])
    tok = tiny_processor.tokenizer
    for i, row in enumerate(rows[:4]):
        meta = json.loads(row["meta"])
        word = meta["query_word"]
        assert word in row["question"]
        span = batch["word_mask"][i].nonzero().squeeze(-1).tolist()
        # The marked tokens spell the word, they are contiguous, and the query is their last one.
        assert tok.decode(batch["input_ids"][i, span]).strip() == word
        assert span == list(range(span[0], span[-1] + 1))
        assert query[i].nonzero().squeeze(-1).tolist() == [span[-1]]
        # The word sits in the question, before the answer.
        assert span[-1] < int(batch["answer_mask"][i].nonzero().min())
    assert not batch["word_mask"][4].any() and not query[4].any()
    # colour_lookup names the target's shape, neighbour_lookup the anchor's.
    assert json.loads(rows[0]["meta"])["query_word"] == json.loads(rows[0]["meta"])["objects"][0]["shape"]
    assert json.loads(rows[3]["meta"])["query_word"] == json.loads(rows[3]["meta"])["objects"][1]["shape"]


def test_word_query_errors_name_the_sample(tiny_processor):
    row = make_text_row(1, question="What colour is the star?")
    row["meta"] = json.dumps({"query_word": "circle"})
    with pytest.raises(ValueError, match=r"text-1.*query_word 'circle'"):
        KLALCollator(tiny_processor)([row])
    batch = KLALCollator(tiny_processor)([make_text_row(2)])
    assert "word_mask" not in batch
    with pytest.raises(ValueError, match="query_word"):
        select_queries(batch["answer_mask"], "word", batch.get("word_mask"))


def test_key_bias_reweights_the_selected_rows_exactly():
    """A bias on the visual keys of one query row, against softmax(q k^T * scale + causal + bias) v written out."""
    from klal.capture import _route_rows

    g = torch.Generator().manual_seed(0)
    h, hkv, s, d = 4, 2, 9, 8
    q, k, v = (torch.randn(1, n, s, d, generator=g) for n in (h, hkv, hkv))
    out = torch.randn(1, s, h, d, generator=g)  # the kernel's output, overwritten only on the selected row
    pos, keys = 6, torch.tensor([1, 2, 3, 4])
    bias = torch.tensor([0.0, 3.0, -2.0, 0.5])
    req = CaptureRequest(
        torch.tensor([[pos]]),
        torch.tensor([[True]]),
        keys[None],
        torch.ones(1, 4, dtype=torch.bool),
        key_bias=bias[None, None],
    )
    got = _route_rows(out, q, k, v, 0.3, req, 0)
    kk, vv = k[0].repeat_interleave(2, 0), v[0].repeat_interleave(2, 0)  # (H, S, D)
    scores = (q[0, :, pos, None] @ kk.transpose(-1, -2))[:, 0] * 0.3  # (H, S)
    full_bias = torch.zeros(s)
    full_bias[keys] = bias
    scores = (scores + full_bias).masked_fill(torch.arange(s) > pos, float("-inf"))
    want = (torch.softmax(scores, -1)[:, :, None] * vv).sum(1)  # (H, D)
    assert torch.allclose(got[0, pos], want, atol=1e-6)
    others = [i for i in range(s) if i != pos]
    assert torch.equal(got[0, others], out[0, others])


def test_key_bias_on_the_model(models, tiny_processor, mixed_rows):
    """Zero bias changes no logit; a large bias on one visual key makes the row read that key alone."""
    _, cap, _ = models
    row = mixed_rows[0]
    batch = KLALCollator(tiny_processor)([row])
    inputs = {k: batch[k] for k in MODEL_KEYS}
    visual = batch["input_ids"] == tiny_processor.image_token_id
    query = select_queries(batch["answer_mask"], "prompt_last")
    with torch.no_grad():
        plain = cap(**inputs).logits
        req = CaptureRequest.from_masks(query, visual)
        req.key_bias = torch.zeros(1, 1, int(visual.sum()))
        zero = cap(**inputs, klal_capture=req).logits
        assert torch.allclose(zero, plain, atol=1e-5)
        req = CaptureRequest.from_masks(query, visual)
        req.key_bias = torch.zeros(1, 1, int(visual.sum()))
        req.key_bias[0, 0, 5] = 1e4
        cap(**inputs, klal_capture=req)
        probs = req.full_probs[0][0, :, 0]  # (H, S) of layer 0
        assert torch.allclose(probs[:, int(req.key_index[0, 5])], torch.ones(probs.shape[0]))
        moved = cap(**inputs, klal_capture=req).logits
    pos = int(query[0].nonzero())
    assert not torch.allclose(moved[0, pos], plain[0, pos], atol=1e-3)


@pytest.mark.parametrize(("base", "softcap"), [("eager", 2.0), ("sdpa", None)])
def test_capture_applies_the_layers_softcap_and_sliding_window(base, softcap):
    """A Gemma 2 language model (the transformers class that passes ``softcap`` to its attention function), with a
    window smaller than the sequence and logit soft-capping on (eager; transformers' sdpa refuses ``softcap``): the
    capture over a block of "visual" keys equals the eager rows renormalised over that block, on its sliding and full
    layers; the window hides part of the block from the later queries, and the soft-capping matters (the capture
    without it is far off)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        attn_logit_softcapping=softcap,
        final_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # large scores, so that tanh capping bends them
            layer.self_attn.q_proj.weight.mul_(30)
    ids = torch.randint(5, 64, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    visual = torch.zeros_like(ids, dtype=torch.bool)
    visual[:, 4:12] = True
    queries = torch.zeros_like(visual)
    queries[:, [12, 14, 16, 19]] = True
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model.config._attn_implementation = register_capture_attention(base, model_eager_fn(model))
    req = CaptureRequest.from_masks(queries, visual)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, klal_capture=req)
    got = req.stacked().exp()  # (L, B, A, V)
    q_idx, k_idx = torch.tensor([12, 14, 16, 19]), torch.arange(4, 12)
    hidden = 0
    for layer, att in enumerate(eager):
        for b in range(2):
            want = _eager_reference(att[b], q_idx, k_idx)
            # Query 19 at the sliding layer sees no visual key (undefined for eager): the capture's row is uniform.
            unseen = want.isnan().any(-1)
            assert unseen.tolist() == [False, False, False, layer == 0], (layer, b)
            want[unseen] = 1 / len(k_idx)
            assert torch.allclose(got[layer, b].double(), want.double(), atol=1e-6), (layer, b)
            hidden += int((att[b][:, q_idx][:, :, k_idx] == 0).all(0).sum())
    assert hidden > 8, "the window must hide some visual keys from some queries"
    if softcap is None:
        return
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    req = CaptureRequest.from_masks(queries, visual)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, klal_capture=req)
    assert (req.stacked().exp() - got).abs().max() > 1e-2


def model_eager_fn(model):
    """The model's own eager attention function (for the ``eager`` base)."""
    import sys

    return sys.modules[type(model.model.layers[0].self_attn).__module__].eager_attention_forward
