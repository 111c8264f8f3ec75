"""klal.eval.attention: teacher-forced exact match (hand-worked, and against an explicit greedy loop), token accuracy
and answer loss against hand computations, and the teacher-forced attention against the attention probe and a
per-sample pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from klal.data.collate import IGNORE_INDEX
from klal.eval.attention import answer_nll, teacher_forced_exact, token_accuracy


def test_teacher_forced_exact_hand_worked():
    # Vocabulary of 4; labels supervise positions 2 and 3 (predicted from logits at 1 and 2).
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, IGNORE_INDEX, 3, 1]])
    logits = torch.zeros(2, 4, 4)
    logits[:, 1, 3] = 5.0  # both samples predict token 3 after position 1
    logits[0, 2, 1] = 5.0  # sample 0 then predicts 1 (right) ...
    logits[1, 2, 2] = 5.0  # ... sample 1 predicts 2 (wrong at the last supervised position)
    logits[:, 0, 0] = 9.0  # a wrong argmax on an unsupervised position must not count
    assert teacher_forced_exact(logits, labels).tolist() == [True, False]
    # A sample with no supervised token is never counted as right.
    none = torch.full((1, 4), IGNORE_INDEX)
    assert teacher_forced_exact(torch.zeros(1, 4, 4), none).tolist() == [False]


def test_teacher_forced_exact_matches_greedy_decoding(tiny_processor):
    """The one-pass rule agrees with an explicit greedy loop on the (random) tiny model."""
    from PIL import Image

    from klal.data.collate import KLALCollator
    from klal.models.loader import ModelConfig, load_model_and_processor

    model, proc = load_model_and_processor(ModelConfig(max_pixels=112 * 112), processor=tiny_processor)
    col = KLALCollator(proc)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    row = {
        "id": "x",
        "image": img,
        "question": "Where?",
        "answer": "(1, 2)",
        "width": 112,
        "height": 112,
        "evidence": {"boxes": [], "points": [], "polylines": []},
    }
    batch = col([row])
    n_prompt = int((batch["labels"][0] == IGNORE_INDEX).sum())
    ids = batch["input_ids"][:, :n_prompt]
    extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    mm = batch["mm_token_type_ids"][:, :n_prompt]
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra).logits
            greedy.append(int(logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], 1)
            mm = torch.cat([mm, torch.zeros(1, 1, dtype=mm.dtype)], 1)
        # Teacher-force the greedy tokens themselves: every supervised label is the argmax, so exact must be True.
        seq = torch.cat([batch["input_ids"][:, :n_prompt], torch.tensor([greedy])], 1)
        mm_full = torch.cat([batch["mm_token_type_ids"][:, :n_prompt], torch.zeros(1, 3, dtype=mm.dtype)], 1)
        labels = torch.full_like(seq, IGNORE_INDEX)
        labels[0, n_prompt:] = seq[0, n_prompt:]
        out = model(input_ids=seq, attention_mask=torch.ones_like(seq), mm_token_type_ids=mm_full, **extra).logits
        assert teacher_forced_exact(out, labels).tolist() == [True]
        # Changing the last greedy token to anything else makes it wrong.
        labels[0, -1] = (greedy[-1] + 1) % out.shape[-1]
        assert teacher_forced_exact(out, labels).tolist() == [False]


def test_token_accuracy_and_answer_loss_hand_worked():
    # Vocabulary of 3; sample 0 supervises positions 2 and 3, sample 1 only position 3.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]])
    logits = torch.zeros(2, 4, 3)
    logits[0, 1, 2] = 2.0  # right at position 2
    logits[0, 2, 1] = 2.0  # wrong at position 3 (predicts 1, label 0)
    logits[1, 2, 1] = 2.0  # right
    logits[1, 0, 0] = 9.0  # unsupervised position: ignored
    np.testing.assert_allclose(token_accuracy(logits, labels).numpy(), [0.5, 1.0])
    # Cross-entropy of a 3-way softmax with one logit at 2: -log(e^2 / (e^2 + 2)) for the argmax, and
    # -log(1 / (e^2 + 2)) for another token.
    z = math.exp(2.0) + 2.0
    right, wrong = -math.log(math.exp(2.0) / z), -math.log(1.0 / z)
    np.testing.assert_allclose(answer_nll(logits, labels).numpy(), [(right + wrong) / 2, right], rtol=1e-6)
    none = torch.full((1, 4), IGNORE_INDEX)
    assert token_accuracy(torch.zeros(1, 4, 3), none).tolist() == [0.0]


def test_teacher_forced_attention_is_the_answer_token_probe(tmp_path):
    """The teacher-forced attention of the last answer token (all layers) is the attention probe's answer_last map,
    batched or one row at a time, and its extras agree with the functions above on the same pass."""
    from klal.eval.attention import TeacherForcedAttention
    from klal.grounding import GroundingModel, build_method
    from klal.models.loader import ModelConfig
    from tests.conftest import make_row

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    rows = [make_row(1, 224, 168, [28.0, 28.0, 84.0, 56.0]), make_row(2, 112, 112, None, answer="(1, 1)")]
    method = TeacherForcedAttention(query="last", layers="all")
    batched = method.run_batch(gm, rows)
    probe = build_method("attention_probe", query="answer_last").run_batch(gm, rows)
    for res, want, row in zip(batched, probe, rows):
        assert res.maps[0].shape == want.maps[0].shape
        np.testing.assert_allclose(res.maps[0], want.maps[0], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(method.run(gm, row).maps[0], res.maps[0], rtol=1e-5, atol=1e-8)
        assert res.maps[0].sum() == pytest.approx(1.0, rel=1e-5)
        assert res.answer is None and res.boxes == []
    batch = gm.collator(rows)
    with torch.no_grad():
        logits = gm.model(
            **{
                k: batch[k]
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
            }
        ).logits
    assert [r.extras["exact_tf"] for r in batched] == teacher_forced_exact(logits, batch["labels"]).tolist()
    np.testing.assert_allclose(
        [r.extras["token_acc"] for r in batched], token_accuracy(logits, batch["labels"]).numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        [r.extras["answer_nll"] for r in batched], answer_nll(logits, batch["labels"]).numpy(), rtol=1e-4
    )
    # With a decoding cap the rows also get the greedy answer, as GroundingModel's own decoding gives it.
    answered = TeacherForcedAttention(query="last", max_new_tokens=4).run_batch(gm, rows)
    for res, row in zip(answered, rows):
        assert res.answer == gm.generate(gm.inputs([row["image"]], row["question"]), 4)
