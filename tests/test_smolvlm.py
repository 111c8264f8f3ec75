"""The SmolVLM family at the geometry of its smallest real checkpoints, and its offline tokenizer and processor.

SmolVLM-256M-Instruct and -500M-Instruct (``model_type`` ``idefics3``; public ``preprocessor_config.json`` /
``processor_config.json`` / ``config.json``): the image processor resizes the longest edge to 2048 px and splits into
512-px tiles (``max_image_size``), LANCZOS, mean/std 0.5; the tower has 16-px patches at 512 px; the connector's pixel
shuffle folds 4 x 4 patches (``scale_factor`` 4) into one token, so ``image_seq_len`` is 64 (8 x 8) per tile and for
the global view. Here the real ``Idefics3ForConditionalGeneration`` and ``Idefics3Processor`` run at that geometry
with tiny widths. Each visual token's footprint is derived from the model itself (which patches of which view its
shuffled feature holds, at which sequence position the model scatters it) and from transformers' own resize and split
functions, not from klal's arithmetic; target maps built on that footprint are compared with klal's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klal.data.collate import KLALCollator
from klal.models.family import family_for_type
from tests.tile_replica import (
    averaging_projection,
    box_for,
    coordinate_features,
    noise_row,
    reference_target,
    token_patches,
)

FAMILY = family_for_type("idefics3")
REAL = {"longest": 2048, "tile": 512, "patch": 16, "scale": 4, "tokens": 64}

SIZES_WH = [(350, 220), (200, 330), (640, 480), (500, 333), (1000, 300), (57, 1000), (1000, 57), (2048, 2048), (40, 30)]
"""(width, height) of the images checked: odd and long thin ones, 2048 x 2048 for the largest tiling (4 x 4 tiles),
and a small one the processor upscales."""


class _Contiguous(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


@pytest.fixture(scope="module")
def replica():
    """The real classes at the real geometry, tiny widths: no vision layer, no position embedding, no post norm, and
    a connector projection that averages each channel over the 16 patches a token folds in; the patch embedding is
    forced to output each patch's own row, column, their squares and the index of the view it belongs to."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = FAMILY.tiny_tokenizer()
    processor = FAMILY.mark(
        Idefics3Processor(
            Idefics3ImageProcessorPil(
                size={"longest_edge": REAL["longest"]},
                max_image_size={"longest_edge": REAL["tile"]},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
                resample=1,
            ),
            tok,
            image_seq_len=REAL["tokens"],
            chat_template=tok.chat_template,
        )
    )
    cfg = FAMILY.tiny_config(
        tok,
        vision_image_size=REAL["tile"],
        vision_patch_size=REAL["patch"],
        vision_num_hidden_layers=0,
        scale_factor=REAL["scale"],
        num_hidden_layers=1,
    )
    model = FAMILY.build_tiny_model(cfg)
    FAMILY.check_pair(model, processor, "SmolVLM-256M replica")
    vision = model.model.vision_model
    d = cfg.vision_config.hidden_size
    s2 = REAL["scale"] ** 2
    with torch.no_grad():
        vision.embeddings.position_embedding.weight.zero_()
    averaging_projection(model.model.connector.modality_projection.proj.weight, d, s2)
    vision.post_layernorm = _Contiguous()  # no norm; the connector's pixel shuffle needs a contiguous tensor

    vision.embeddings.patch_embedding.register_forward_hook(coordinate_features)
    return model, processor


def _views(processor, w: int, h: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``(H2, W2)`` and each tile's ``(y0, x0)`` in the resized image, from transformers' own resize and split."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

    ip = processor.image_processor
    h1, w1 = get_resize_output_image_size(np.zeros((3, h, w), dtype=np.uint8), REAL["longest"])
    h2, w2 = ip.resize_for_vision_encoder(np.zeros((3, h1, w1), dtype=np.uint8), REAL["tile"]).shape[-2:]
    # A canvas whose pixels name their own 16-px block: each crop's first pixel says where it was cut.
    yy, xx = np.mgrid[0:h2, 0:w2] // 16
    canvas = np.stack([yy, xx, np.zeros_like(yy)]).astype(np.uint8)
    frames, n_h, n_w = ip.split_images(canvas, max_image_size={"longest_edge": REAL["tile"]})
    tiles = [(int(f[0, 0, 0]) * 16, int(f[1, 0, 0]) * 16) for f in frames[: n_h * n_w]]
    return (h2, w2), tiles


@pytest.mark.parametrize("size", SIZES_WH)
def test_target_maps_match_the_models_own_token_footprints_at_real_geometry(replica, size):
    model, processor = replica
    w, h = size
    box = box_for(w, h)
    batch = KLALCollator(processor)([noise_row(w, h, box)])
    patches = token_patches(FAMILY, model, processor.image_token_id, batch)
    (h2, w2), tiles = _views(processor, w, h)
    n_views = len(tiles) + 1
    assert sorted(set(patches[:, 0].round().astype(int))) == list(range(n_views))
    assert batch["grids"] == [[(8, 8)] * n_views]
    # Reference footprint of each token in original pixels: a tile's patches sit at the tile's place in the
    # H2 x W2 resize (a squash of the whole image), the global view's span the image squashed to 512 x 512.
    p = REAL["patch"]
    ref = np.zeros((len(patches), 4))  # (x0, y0, x1, y1)
    for i, (view, r0, c0, r1, c1) in enumerate(patches):
        v = int(round(view))
        if v < len(tiles):
            ty, tx = tiles[v]
            ref[i] = [(tx + c0 * p) * w / w2, (ty + r0 * p) * h / h2, (tx + c1 * p) * w / w2, (ty + r1 * p) * h / h2]
        else:
            t = REAL["tile"]
            ref[i] = [c0 * p * w / t, r0 * p * h / t, c1 * p * w / t, r1 * p * h / t]
    assert np.allclose(patches[:, 3] - patches[:, 1], 4) and np.allclose(patches[:, 4] - patches[:, 2], 4)
    want = reference_target(ref, patches[:, 0].round().astype(int), box)
    got = batch["target"][0].numpy()
    assert np.abs(got - want).max() <= 1e-6, (size, np.abs(got - want).max())


def test_the_processor_squashes_the_whole_image_into_the_tiles(replica):
    """The reference's premise, read off the processor's own pixels: a white box in a black image lands, across
    the tiles put back together, where one scale per axis puts it (no crop, no padding)."""
    _, processor = replica
    for w, h in [(1000, 300), (350, 220), (57, 1000)]:
        img = np.zeros((h, w, 3), dtype=np.uint8)
        y0, y1, x0, x1 = h // 4, h // 2, w // 3, (2 * w) // 3
        img[y0:y1, x0:x1] = 255
        enc = processor.image_processor(Image.fromarray(img), return_tensors="np", return_row_col_info=True)
        rows, cols = enc["rows"][0][0], enc["cols"][0][0]
        t = REAL["tile"]
        px = enc["pixel_values"][0, :, 0]  # (views, 512, 512)
        canvas = np.concatenate([np.concatenate(list(px[r * cols : (r + 1) * cols]), 1) for r in range(rows)], 0)
        sy, sx = canvas.shape[0] / h, canvas.shape[1] / w
        ys, xs = np.nonzero(canvas > 0)
        tol = 3 + max(sy, sx)  # LANCZOS rings a few resized pixels past the scaled edges
        assert abs(ys.min() - y0 * sy) <= tol and abs(ys.max() + 1 - y1 * sy) <= tol, (w, h)
        assert abs(xs.min() - x0 * sx) <= tol and abs(xs.max() + 1 - x1 * sx) <= tol, (w, h)
        assert canvas.shape == (rows * t, cols * t)


def test_stitched_map_places_tiles_and_keeps_the_global_views_mass(replica):
    """merge_grids: each tile's map lands in its place of the stitched grid, and the global map is spread over the
    stitched tokens that saw the same pixels (mass kept); map_footprint is the stitched grid."""
    _, processor = replica
    w, h = 1000, 300
    grids = FAMILY.processor_grids(processor, h, w)
    fps = FAMILY.footprints(processor, h, w, grids)
    assert len(grids) == 2 * 4 + 1
    rng = np.random.RandomState(1)
    maps = [rng.rand(*g) for g in grids]
    merged = FAMILY.merge_grids(maps, fps)
    fp = FAMILY.map_footprint(processor, h, w)
    assert merged.shape == fp.shape == (16, 32)
    assert merged.sum() == pytest.approx(sum(m.sum() for m in maps))
    without_global = FAMILY.merge_grids([*maps[:-1], np.zeros((8, 8))], fps)
    for k in range(8):
        r, c = divmod(k, 4)
        assert np.array_equal(without_global[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8], maps[k])
    # A global cell's mass goes to the stitched tokens under it: the top-left global cell covers 1/8 of each axis.
    only = np.zeros((8, 8))
    only[0, 0] = 1.0
    spread = FAMILY.merge_grids([np.zeros(g) for g in grids[:-1]] + [only], fps)
    assert spread[:2, :4].sum() == pytest.approx(1.0) and spread.sum() == pytest.approx(1.0)
    boxes = fp.boxes()
    assert boxes[0, 0] == pytest.approx([0, 0, w / 32, h / 16])


def test_tiny_tokenizer_round_trips_and_renders_the_smolvlm_chat_format():
    tok = FAMILY.tiny_tokenizer()
    text = "Where is the red star? Ünïcödé 漢字 (12, 345)\n\ttabs"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for special in ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<row_6_col_6>"):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which cell?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "(1, 2)"}]},
    ]
    # SmolVLM-Instruct's format as its chat template writes it (": " before a turn that opens with text).
    want = "<|im_start|>User:<image>Which cell?<end_of_utterance>\nAssistant: (1, 2)<end_of_utterance>\nAssistant:"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want


def test_tiny_processor_expands_tiles_and_the_global_view():
    """The placeholder becomes the tiles' and the global view's cells with their separators, which are no cells;
    the image token count, the answer's end-of-turn token and the stop tokens are the family's."""
    processor = FAMILY.build_tiny_processor(0, 0)
    tok = processor.tokenizer
    sizes = [(100, 150), (60, 200), (224, 224)]  # (h, w): 2 x 2, 1 x 2, 2 x 2 tiles of 64 px
    rows = [
        {"id": i, "image": Image.new("RGB", (w, h)), "question": "Which cell?", "answer": "yes"}
        for i, (h, w) in enumerate(sizes)
    ]
    batch = KLALCollator(processor)(rows)
    assert batch["grids"] == [[(4, 4)] * 5, [(4, 4)] * 3, [(4, 4)] * 5]
    cells = batch["input_ids"] == processor.image_token_id
    assert cells.sum(1).tolist() == [80, 48, 80]
    assert torch.equal(FAMILY.visual_token_mask(batch["input_ids"], processor.image_token_id), cells)
    plain = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which cell?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    n_plain = len(tok(plain, add_special_tokens=False)["input_ids"])
    for i, (h, w) in enumerate(sizes):
        n_labels = int((batch["labels"][i] != -100).sum())
        n_real = int(batch["attention_mask"][i].sum())
        assert n_plain + FAMILY.image_token_count(processor, h, w) + n_labels == n_real
    ids = batch["input_ids"][1].tolist()
    assert tok.convert_tokens_to_ids("<row_1_col_2>") in ids and tok.convert_tokens_to_ids("<row_2_col_1>") not in ids
    end = tok.convert_tokens_to_ids("<end_of_utterance>")
    answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
    # The answer turn as the chat template writes it: "Assistant: yes<end_of_utterance>".
    assert answer[-1] == end and tok.decode(answer) == " yes<end_of_utterance>"
    assert end in FAMILY.stop_token_ids(processor) and processor.image_token_id in FAMILY.stop_token_ids(processor)


def test_base_identity_reads_the_text_model_weights():
    """The identity check samples SmolVLM's decoder (``text_model``), so another seed is another model."""
    from klal.models.identity import base_identity, identity_mismatch

    a = FAMILY.build_tiny_model(seed=0)
    assert base_identity(a, "x")["weights"] is not None
    assert "weights" in identity_mismatch(base_identity(a, "x"), base_identity(FAMILY.build_tiny_model(seed=1), "x"))


def test_teacher_forced_attention_merges_the_tiles_as_the_probe_does():
    """The collator's image sizes let the teacher-forced attention merge an image's tile and global maps through their
    footprints: the stitched map equals the attention probe's answer_last map and keeps the attention's mass."""
    from klal.eval.attention import TeacherForcedAttention
    from klal.grounding import GroundingModel, build_method
    from klal.models.loader import ModelConfig
    from tests.conftest import make_row

    gm = GroundingModel.load(ModelConfig("tiny-smolvlm"))
    rows = [make_row(1, 224, 168, [28.0, 28.0, 84.0, 56.0]), make_row(2, 60, 200, None, answer="(1, 1)")]
    batched = TeacherForcedAttention(query="last", layers="all").run_batch(gm, rows)
    probe = build_method("attention_probe", query="answer_last").run_batch(gm, rows)
    for res, want, row in zip(batched, probe, rows):
        w, h = row["image"].size
        assert res.maps[0].shape == FAMILY.map_footprint(gm.processor, h, w).shape
        np.testing.assert_allclose(res.maps[0], want.maps[0], rtol=1e-5, atol=1e-8)
        assert res.maps[0].sum() == pytest.approx(1.0, rel=1e-5)
