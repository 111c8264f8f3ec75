"""The collator: chat prompt, answer-only labels, mm_token_type_ids, target maps on each sample's token grid, and
text-only samples (no image) alone and mixed with image samples."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from klal.data.collate import IGNORE_INDEX, NO_IMAGE_REASON, KLALCollator
from klal.data.targets import TargetMapError
from tests.conftest import make_row, make_text_row


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


# -- text-only samples -------------------------------------------------------------------------------------------------
def _check_text_and_labels(tok, batch, i: int, row: dict) -> None:
    """Row ``i`` supervises exactly ``answer<|im_end|>``, and ``answer_mask`` marks exactly the answer."""
    lab = batch["labels"][i]
    assert tok.decode(lab[lab != IGNORE_INDEX].tolist()) == row["answer"] + "<|im_end|>"
    assert tok.decode(batch["input_ids"][i][batch["answer_mask"][i]].tolist()) == row["answer"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_only_batch_has_no_image_inputs_and_counts_no_image(tiny_processor, padding_side):
    rows = [make_text_row(0), make_text_row(1, answer="(12, 10) and (3, 4)"), dict(make_text_row(2), image=[])]
    collator = KLALCollator(tiny_processor, padding_side=padding_side)
    batch = collator(rows)
    tok = tiny_processor.tokenizer
    # Nothing for the vision tower: the model then never runs it.
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    vision_ids = tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    assert not torch.isin(batch["input_ids"], torch.tensor(vision_ids)).any()
    # Positions come from mm_token_type_ids, which must still be there: all text.
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert batch["mm_token_type_ids"].abs().sum().item() == 0
    for i, row in enumerate(rows):
        _check_text_and_labels(tok, batch, i, row)
        real = batch["attention_mask"][i].bool()
        first = int(batch["answer_mask"][i][real].nonzero()[0])
        # The prompt is the chat template with no image placeholder.
        assert tok.decode(batch["input_ids"][i][real][:first].tolist()) == collator.prompt_text(row["question"], 0)
    assert batch["has_target"].tolist() == [False, False, False]
    assert batch["no_map_reason"] == [NO_IMAGE_REASON] * 3
    assert collator.no_map.reasons == Counter({NO_IMAGE_REASON: 3})
    # (B, 1) placeholders with no valid visual token.
    assert batch["target"].shape == (3, 1) and batch["target"].abs().sum().item() == 0.0
    assert (batch["key_image"] == -1).all()
    assert batch["grids"] == [[], [], []]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_image_and_text_only_batch(tiny_processor, mixed_rows, padding_side):
    text = [make_text_row(10, answer="(12, 10) and (3, 4)"), dict(make_text_row(11), image=[])]
    rows = [mixed_rows[0], text[0], mixed_rows[1], text[1], mixed_rows[2]]
    collator = KLALCollator(tiny_processor, padding_side=padding_side)
    batch = collator(rows)
    alone = KLALCollator(tiny_processor, padding_side=padding_side)(mixed_rows)
    tok = tiny_processor.tokenizer
    image_tokens = batch["input_ids"] == tiny_processor.image_token_id
    assert torch.equal(batch["mm_token_type_ids"].bool(), image_tokens)
    # The image rows' vision inputs are exactly those of the image rows collated on their own.
    assert torch.equal(batch["pixel_values"], alone["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], alone["image_grid_thw"])
    n_visual = [int(t.prod()) // 4 for t in alone["image_grid_thw"]]
    assert image_tokens.sum(-1).tolist() == [n_visual[0], 0, n_visual[1], 0, n_visual[2]]
    for i, row in enumerate(rows):
        _check_text_and_labels(tok, batch, i, row)
    # Image rows keep their maps; text-only rows get none, with the reason "no image".
    for i, j in ((0, 0), (2, 1), (4, 2)):
        v = n_visual[j]
        assert torch.equal(batch["target"][i, :v], alone["target"][j, :v])
        assert torch.equal(batch["key_image"][i, :v], alone["key_image"][j, :v])
        assert batch["no_map_reason"][i] == alone["no_map_reason"][j]
    for i in (1, 3):
        assert batch["target"][i].abs().sum().item() == 0.0 and (batch["key_image"][i] == -1).all()
    assert batch["has_target"].tolist() == [True, False, True, False, False]
    assert batch["no_map_reason"][1] == batch["no_map_reason"][3] == NO_IMAGE_REASON
    assert batch["grids"][1] == batch["grids"][3] == []
    # Both kinds of skip are counted: the two text-only rows and the image row without evidence.
    assert collator.no_map.reasons == Counter({NO_IMAGE_REASON: 2, alone["no_map_reason"][2]: 1})
    assert collator.no_map.total == 3


def test_image_field_errors_name_the_sample(tiny_processor):
    collator = KLALCollator(tiny_processor)
    missing = make_text_row(0)
    del missing["image"]
    # A missing field is not a text-only sample: that takes an explicit None.
    with pytest.raises(ValueError, match="text-0.*no 'image' field"):
        collator([missing])
    with pytest.raises(TypeError, match="row-1.*PIL image"):
        collator([dict(make_row(1, 56, 56, None), image="picture.png")])
    with pytest.raises(TypeError, match="text-2.*PIL image"):
        collator([dict(make_text_row(2), image=[None])])
    with_box = dict(make_text_row(3), evidence={"boxes": [[0.0, 0.0, 5.0, 5.0]], "points": [], "polylines": []})
    with pytest.raises(ValueError, match="text-3.*evidence but no image"):
        collator([make_row(4, 56, 56, None), with_box])
    # Errors are raised before anything is counted as a skip.
    assert collator.no_map.total == 0


def test_batch_keys_and_shapes_are_those_klal_batch_declares(tiny_processor, mixed_rows):
    from klal.data.collate import KLALBatch

    required, optional = KLALBatch.__required_keys__, KLALBatch.__optional_keys__
    per_token = {"mm_token_type_ids", "token_type_ids"}  # the families' token_inputs: Qwen's, Gemma 3's
    image_keys = {"pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask"}  # Qwen, LLaVA, SmolVLM
    assert optional == image_keys | {"word_mask"} | per_token
    assert len(required | optional) == 19
    batch = KLALCollator(tiny_processor)(mixed_rows)
    # The Qwen families' image inputs and per-token input; image_sizes is LLaVA-OneVision's.
    assert set(batch) == required | {"pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert batch["grid_image"] == [list(range(len(g))) for g in batch["grids"]]  # one grid per image
    assert batch["image_wh"] == [[r["image"].size] for r in mixed_rows]  # (W, H) per image, for the footprints
    b, s = batch["input_ids"].shape
    for key in ("attention_mask", "labels", "answer_mask", "mm_token_type_ids"):
        assert batch[key].shape == (b, s), key
    # Grids 8x8, 4x6 and one more image: V is the largest visual-token count; patches 4 per token, 1176 values each.
    n_tokens = [sum(h * w for h, w in g) for g in batch["grids"]]
    assert batch["target"].shape == batch["key_image"].shape == (b, max(n_tokens))
    assert batch["has_target"].shape == (b,) and len(batch["ids"]) == len(batch["no_map_reason"]) == b
    thw = batch["image_grid_thw"]
    assert thw.shape == (len(mixed_rows), 3) and batch["pixel_values"].shape == (int(thw.prod(1).sum()), 1176)
    assert int(thw.prod(1).sum()) == 4 * sum(n_tokens)
    text_only = KLALCollator(tiny_processor)([make_text_row(0)])
    assert set(text_only) == required | {"mm_token_type_ids"}
