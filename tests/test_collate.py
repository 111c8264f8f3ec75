"""The collator: chat prompt, answer-only labels, mm_token_type_ids, and target maps on each sample's token grid."""

from __future__ import annotations

import pytest
import torch

from klal.data.collate import IGNORE_INDEX, KLALCollator
from klal.targets import TargetMapError
from tests.conftest import make_row


def test_labels_cover_answer_and_end_of_turn_only(tiny_processor, mixed_rows):
    batch = KLALCollator(tiny_processor)(mixed_rows)
    tok = tiny_processor.tokenizer
    for i, row in enumerate(mixed_rows):
        lab = batch["labels"][i]
        sup = lab[lab != IGNORE_INDEX].tolist()
        assert tok.decode(sup) == row["answer"] + "<|im_end|>"
        am = batch["answer_mask"][i]
        assert tok.decode(batch["input_ids"][i][am].tolist()) == row["answer"]
        # The answer directly follows the assistant header of the chat template.
        first = int(am.nonzero()[0])
        assert tok.decode(batch["input_ids"][i][:first].tolist()).endswith("<|im_start|>assistant\n")


def test_mm_token_type_ids_mark_exactly_the_image_tokens(tiny_processor, mixed_rows):
    for side in ("left", "right"):
        batch = KLALCollator(tiny_processor, padding_side=side)(mixed_rows)
        image_tokens = batch["input_ids"] == tiny_processor.image_token_id
        assert torch.equal(batch["mm_token_type_ids"].bool(), image_tokens)
        assert (batch["attention_mask"][image_tokens] == 1).all()


def test_targets_land_on_the_right_tokens(tiny_processor, mixed_rows):
    batch = KLALCollator(tiny_processor)(mixed_rows)
    # Row 0: 224x224 is kept as is (8x8 grid); box x 28..84, y 56..112 covers cells (2,1),(2,2),(3,1),(3,2).
    assert batch["grids"][0] == [(8, 8)]
    t0 = batch["target"][0]
    assert t0[[17, 18, 25, 26]].tolist() == pytest.approx([0.25] * 4)
    assert t0.sum().item() == pytest.approx(1.0)
    # Row 1: 168 wide x 112 high -> grid 4 x 6; box 0..56 covers cells (0,0),(0,1),(1,0),(1,1).
    assert batch["grids"][1] == [(4, 6)]
    t1 = batch["target"][1]
    assert t1[[0, 1, 6, 7]].tolist() == pytest.approx([0.25] * 4)
    assert t1[24:].abs().sum().item() == 0.0  # padding beyond this sample's 24 tokens
    # Row 2 has no evidence: no map, counted with a reason.
    assert batch["has_target"].tolist() == [True, True, False]
    assert batch["no_map_reason"][2] is not None
    assert batch["target"][2].abs().sum().item() == 0.0


def test_resized_images_rescale_evidence(tiny_processor):
    # 448x448 with max_pixels 224*224 is processed at 224x224: a 56x56 box is exactly one token cell.
    row = make_row(5, 448, 448, [112.0, 56.0, 168.0, 112.0])
    batch = KLALCollator(tiny_processor)([row])
    assert batch["grids"][0] == [(8, 8)]
    assert batch["target"][0][1 * 8 + 2].item() == pytest.approx(1.0)


def test_two_images_joint_target(tiny_processor):
    a = make_row(7, 112, 112, [0.0, 0.0, 28.0, 28.0])
    b = make_row(8, 56, 56, None)
    row = dict(a, image=[a["image"], b["image"]], evidence=[a["evidence"], {}])
    batch = KLALCollator(tiny_processor)([row])
    assert batch["grids"][0] == [(4, 4), (2, 2)]
    assert batch["key_image"][0].tolist() == [0] * 16 + [1] * 4
    assert batch["target"][0][0].item() == pytest.approx(1.0)
    assert int((batch["input_ids"] == tiny_processor.image_token_id).sum()) == 20


def test_bad_evidence_names_the_sample(tiny_processor):
    row = make_row(9, 112, 112, [50.0, 50.0, 10.0, 10.0])  # x1 < x0
    with pytest.raises(TargetMapError, match="row-9"):
        KLALCollator(tiny_processor)([row])


def test_too_long_sample_is_refused_with_its_id(tiny_processor):
    with pytest.raises(ValueError, match="row-3.*max_length"):
        KLALCollator(tiny_processor, max_length=10)([make_row(3, 56, 56, None)])
