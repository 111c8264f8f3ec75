"""The attention probe: each query token's map against the capture read by hand, and its answer in generated_last."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klal.grounding.probe import append_answer
from klal.grounding.registry import build_method
from klal.session import GroundingError

pytest_plugins = ["tests.grounding_helpers"]  # the gm and row fixtures


def _head_layer_mean(gm, inputs, pos: int, layers: list[int]) -> np.ndarray:
    """Head- and layer-mean attention of position ``pos`` over the visual tokens, renormalised per head."""
    req = gm.request(inputs, query_pos=pos, layers=layers, per_head=True)
    with torch.no_grad():
        gm.forward(inputs, req)
    att = req.stacked().exp()[:, 0, :, 0]  # (L, H, V)
    req.clear()
    return att.mean(dim=(0, 1)).double().numpy()


def test_answer_last_reads_the_gold_answers_last_content_token(gm, row):
    res = build_method("attention_probe", query="answer_last", layers="1-2").run(gm, row)
    inputs = gm.inputs([row["image"]], row["question"])
    ids, n_content = gm.collator.answer_ids(str(row["answer"]))
    full = gm.append_tokens(inputs, ids)
    pos = inputs["input_ids"].shape[1] + n_content - 1  # the last content token, not the end-of-turn token
    ref = _head_layer_mean(gm, full, pos, [1, 2]).reshape(res.maps[0].shape)
    np.testing.assert_allclose(res.maps[0], ref, rtol=1e-5, atol=1e-9)
    assert res.extras == {"layers": [1, 2], "query": "answer_last"} and res.answer is None
    assert res.passes == {"forward": 1, "backward": 0}


def test_prompt_last_reads_the_last_prompt_token(gm, row):
    res = build_method("attention_probe").run(gm, row)
    inputs = gm.inputs([row["image"]], row["question"])
    ref = _head_layer_mean(gm, inputs, inputs["input_ids"].shape[1] - 1, list(range(gm.num_layers)))
    np.testing.assert_allclose(res.maps[0], ref.reshape(res.maps[0].shape), rtol=1e-5, atol=1e-9)
    assert len(res.boxes) == 1


def test_generated_last_answers_and_reads_its_own_answer(gm, row):
    method = build_method("attention_probe", query="generated_last", max_new_tokens=3)
    assert method.answers and not method.batched
    assert not build_method("attention_probe").answers and build_method("attention_probe").batched
    res = method.run(gm, row)
    inputs = gm.inputs([row["image"]], row["question"])
    answer = gm.generate(inputs, 3)
    assert res.answer == answer
    if answer:
        full, pos = append_answer(gm, inputs, answer)
        ref = _head_layer_mean(gm, full, pos, list(range(gm.num_layers)))
        np.testing.assert_allclose(res.maps[0], ref.reshape(res.maps[0].shape), rtol=1e-5, atol=1e-9)


def test_empty_answer_is_refused(gm, row):
    with pytest.raises(GroundingError, match="empty answer"):
        append_answer(gm, gm.inputs([row["image"]], row["question"]), "")
