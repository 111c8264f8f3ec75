"""The InternVL family at the geometry of its smallest real checkpoint, and its offline tokenizer and processor.

InternVL3-1B-hf (public ``config.json`` / ``preprocessor_config.json`` / ``processor_config.json``): 448-px tiles
(``size``), 1 to 12 tiles (``crop_to_patches``, ``min_patches`` / ``max_patches``) plus a thumbnail, BICUBIC; the
tower has 14-px patches at 448 px and a CLS token; the pixel shuffle (``downsample_ratio`` 0.5) folds 2 x 2 patches
into one token, so ``image_seq_length`` is 256 (16 x 16) per view. Here the real ``InternVLForConditionalGeneration``
and ``InternVLProcessor`` run at that geometry with tiny widths. Each visual token's footprint is derived from the
model itself (which patches of which view its shuffled feature holds, where the model scatters it) and from
transformers' own tiling function and crops, not from klal's arithmetic; target maps on that footprint are compared
with klal's.
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

FAMILY = family_for_type("internvl")
REAL = {"tile": 448, "patch": 14, "tokens": 256, "max_tiles": 12}

SIZES_WH = [(350, 220), (200, 330), (640, 480), (500, 333), (1000, 300), (57, 1000), (1000, 57), (448, 448), (30, 40)]
"""(width, height) of the images checked: odd and long thin ones, 640 x 480 for the largest tiling (4 x 3 = 12
tiles), a square one (one tile, no thumbnail) and a small one the processor upscales."""


@pytest.fixture(scope="module")
def replica():
    """The real classes at the real geometry, tiny widths: no vision layer, no position embedding, and a projector
    that averages each channel over the 4 patches a token folds in; the patch embedding is forced to output each
    patch's own row, column, their squares and the index of the view it belongs to."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from klal.models.internvl import _processor_class

    tok = FAMILY.tiny_tokenizer()
    processor = FAMILY.mark(
        _processor_class()(
            GotOcr2ImageProcessorPil(
                size={"height": REAL["tile"], "width": REAL["tile"]},
                crop_to_patches=True,
                min_patches=1,
                max_patches=REAL["max_tiles"],
                resample=3,
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
            ),
            tok,
            image_seq_length=REAL["tokens"],
            chat_template=tok.chat_template,
        )
    )
    cfg = FAMILY.tiny_config(
        tok,
        vision_image_size=REAL["tile"],
        vision_patch_size=REAL["patch"],
        vision_num_hidden_layers=0,
        num_hidden_layers=1,
    )
    model = FAMILY.build_tiny_model(cfg)
    FAMILY.check_pair(model, processor, "InternVL3-1B replica")
    vision = model.model.vision_tower
    d = cfg.vision_config.hidden_size
    with torch.no_grad():
        vision.embeddings.position_embeddings.zero_()
    proj = torch.nn.Linear(4 * d, cfg.text_config.hidden_size, bias=False)
    averaging_projection(proj.weight, d, 4)
    model.model.multi_modal_projector = proj

    vision.embeddings.patch_embeddings.projection.register_forward_hook(coordinate_features)
    return model, processor


def _tiles(processor, w: int, h: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """``(cols, rows)`` from transformers' ``get_optimal_tiled_canvas`` and each crop's ``(row, col)``, read off
    ``crop_image_to_patches`` run on an image whose blocks name themselves."""
    from transformers.image_processing_utils import SizeDict
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    t = REAL["tile"]
    cols, rows = get_optimal_tiled_canvas((h, w), (t, t), 1, REAL["max_tiles"])
    yy, xx = np.mgrid[0:h, 0:w]
    coded = np.stack([(yy * rows // h) * 20, (xx * cols // w) * 20, np.zeros_like(yy)]).astype(np.uint8)
    crops = processor.image_processor.crop_image_to_patches(
        coded, 1, REAL["max_tiles"], use_thumbnail=True, patch_size=SizeDict(height=t, width=t), resample=3
    )
    n = cols * rows
    assert len(crops) == (n + 1 if n > 1 else 1)
    places = [(int(round(c[0, t // 2, t // 2] / 20)), int(round(c[1, t // 2, t // 2] / 20))) for c in crops[:n]]
    return (cols, rows), places if n > 1 else []


@pytest.mark.parametrize("size", SIZES_WH)
def test_target_maps_match_the_models_own_token_footprints_at_real_geometry(replica, size):
    model, processor = replica
    w, h = size
    box = box_for(w, h)
    batch = KLALCollator(processor)([noise_row(w, h, box)])
    patches = token_patches(FAMILY, model, processor.image_token_id, batch)
    (cols, rows), places = _tiles(processor, w, h)
    n_views = len(places) + 1
    views = patches[:, 0].round().astype(int)
    assert sorted(set(views)) == list(range(n_views))
    assert batch["grids"] == [[(16, 16)] * n_views]
    assert np.allclose(patches[:, 3] - patches[:, 1], 2) and np.allclose(patches[:, 4] - patches[:, 2], 2)
    p, t = REAL["patch"], REAL["tile"]
    ref = np.zeros((len(patches), 4))  # (x0, y0, x1, y1) in original pixels
    for i, (view, r0, c0, r1, c1) in enumerate(patches):
        v = int(round(view))
        if v < len(places):  # a tile of the C t x R t squash
            tr, tc = places[v]
            sx, sy = w / (cols * t), h / (rows * t)
            ref[i] = [(tc * t + c0 * p) * sx, (tr * t + r0 * p) * sy, (tc * t + c1 * p) * sx, (tr * t + r1 * p) * sy]
        else:  # the thumbnail, or the only view: the whole image squashed to t x t
            ref[i] = [c0 * p * w / t, r0 * p * h / t, c1 * p * w / t, r1 * p * h / t]
    want = reference_target(ref, patches[:, 0].round().astype(int), box)
    got = batch["target"][0].numpy()
    assert np.abs(got - want).max() <= 1e-6, (size, np.abs(got - want).max())


def test_tiny_processor_expands_views_between_img_tokens():
    """The placeholder becomes ``<img>``, the views' ``<IMG_CONTEXT>`` cells and ``</img>``; the image token count,
    the answer's end-of-turn token and the stop tokens are the family's; the tokenizer round-trips text."""
    processor = FAMILY.build_tiny_processor(0, 0)
    tok = processor.tokenizer
    text = "Where is the red star? Ünïcödé 漢字 (12, 345)\n\ttabs"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    sizes = [(100, 150), (60, 200), (224, 224), (50, 50)]  # (h, w): 2, 3, 4 tiles (+ thumbnail), one view
    rows = [
        {"id": i, "image": Image.new("RGB", (w, h)), "question": "Which cell?", "answer": "yes"}
        for i, (h, w) in enumerate(sizes)
    ]
    batch = KLALCollator(processor)(rows)
    assert batch["grids"] == [[(4, 4)] * 3, [(4, 4)] * 4, [(4, 4)] * 5, [(4, 4)]]
    plain = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which cell?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert plain == "<|im_start|>user\n<IMG_CONTEXT>\nWhich cell?<|im_end|>\n<|im_start|>assistant\n"
    n_plain = len(tok(plain, add_special_tokens=False)["input_ids"])
    for i, (h, w) in enumerate(sizes):
        n_labels = int((batch["labels"][i] != -100).sum())
        assert n_plain + FAMILY.image_token_count(processor, h, w) + n_labels == int(batch["attention_mask"][i].sum())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert batch["labels"][0][batch["labels"][0] != -100].tolist()[-1] == end
    assert end in FAMILY.stop_token_ids(processor) and processor.image_token_id in FAMILY.stop_token_ids(processor)
