"""Attention capture against eager ``output_attentions`` on the tiny model, with padded mixed-size batches."""

from __future__ import annotations

import pytest
import torch

from klal.capture import CaptureRequest, register_capture_attention, select_queries
from klal.data.collate import KLALCollator
from klal.models.tiny import build_tiny_model

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
