"""The Gemma 3 family at the geometry of its real checkpoints, and its offline tokenizer and processor.

The real checkpoints (``google/gemma-3-4b-it`` and larger, public configs): SigLIP at 896 px with 14-px patches
(64 x 64), ``mm_tokens_per_image`` 256 (the projector average-pools 4 x 4 patches), pan-and-scan off. Here the real
``Gemma3ForConditionalGeneration`` and ``Gemma3Processor`` run at that geometry with tiny widths, and each visual
token's footprint in the original image is derived from the model itself (which patches its pooled feature averages,
at which sequence position the model scatters it) and from what the image processor does to the pixels, not from
klal's grid arithmetic; target maps built on that footprint are compared with klal's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klal.data.collate import KLALCollator
from klal.data.targets import build_target_map
from klal.models.family import family_for_type

FAMILY = family_for_type("gemma3")
REAL = {"image_size": 896, "patch": 14, "tokens": 256}

SIZES_HW = [(220, 350), (330, 200), (480, 640), (333, 500), (300, 1000), (1000, 57), (57, 1000), (1500, 2000)]
"""(height, width) of the images checked, odd and long thin ones included (no tiling on Gemma 3, so the largest
is simply the most downscaled)."""


@pytest.fixture(scope="module")
def replica():
    """The real classes at the real vision geometry, tiny widths: no vision layer, no norms and an identity-like
    projection, so the features the model scatters into the prompt are what the tower's patch grid and the
    projector's pooling make of the coordinates the patch embedding is forced to output."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = FAMILY.tiny_tokenizer()
    processor = FAMILY.mark(
        Gemma3Processor(
            Gemma3ImageProcessorPil(
                size={"height": REAL["image_size"], "width": REAL["image_size"]},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
                resample=2,
                do_pan_and_scan=False,
            ),
            tok,
            chat_template=tok.chat_template,
            image_seq_length=REAL["tokens"],
        )
    )
    cfg = FAMILY.tiny_config(
        tok,
        vision_image_size=REAL["image_size"],
        vision_patch_size=REAL["patch"],
        vision_num_hidden_layers=0,
        mm_tokens_per_image=REAL["tokens"],
        num_hidden_layers=1,
        layer_types=["full_attention"],
    )
    model = FAMILY.build_tiny_model(cfg)
    vision = model.model.vision_tower  # SiglipVisionModel: embeddings, encoder, post_layernorm
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        vision.embeddings.position_embedding.weight.zero_()
        proj.mm_input_projection_weight.zero_()
        for i in range(4):
            proj.mm_input_projection_weight[i, i] = 1.0
    vision.post_layernorm = torch.nn.Identity()
    proj.mm_soft_emb_norm = torch.nn.Identity()

    def coordinates(_module, _args, out):  # (B, D, 64, 64): the conv's own spatial layout names each patch
        n = out.shape[-1]
        r, c = torch.meshgrid(torch.arange(n, dtype=out.dtype), torch.arange(n, dtype=out.dtype), indexing="ij")
        feat = torch.zeros_like(out)
        feat[:, 0], feat[:, 1], feat[:, 2], feat[:, 3] = r, c, r * r, c * c
        return feat

    vision.embeddings.patch_embedding.register_forward_hook(coordinates)
    return model, processor


def _footprints(model, processor, batch) -> np.ndarray:
    """``(V, 4)`` ``(y0, x0, y1, x1)`` of each visual token, in resized-image pixels, in sequence order: from the
    pooled coordinates the model placed at its image-token positions (mean and spread of the patches pooled)."""
    lm = FAMILY.language_model(model)
    seen = {}

    def grab(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**{k: batch[k] for k in FAMILY.input_keys if k in batch})
    finally:
        handle.remove()
    cells = batch["input_ids"][0] == FAMILY.grid_token_id(processor)
    f = seen["embeds"][0, cells, :4].double()  # (V, 4): mean r, mean c, mean r^2, mean c^2
    mr, mc = f[:, 0], f[:, 1]
    # k consecutive patches have variance (k^2 - 1) / 12 along that axis.
    kr, kc = (12 * (f[:, 2] - mr**2) + 1).sqrt(), (12 * (f[:, 3] - mc**2) + 1).sqrt()
    p = REAL["patch"]
    out = torch.stack(
        [(mr - (kr - 1) / 2) * p, (mc - (kc - 1) / 2) * p, (mr + (kr + 1) / 2) * p, (mc + (kc + 1) / 2) * p]
    )
    return out.T.numpy()


def _resize_scale(processor, h: int, w: int) -> tuple[float, float]:
    """Resized px per original px on each axis, read off the processor's pixels: a white box at a known place in a
    black image lands where the scale puts it (so the resize squashes the whole image, no crop and no padding)."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    y0, y1, x0, x1 = h // 4, h // 2, w // 3, (2 * w) // 3
    img[y0:y1, x0:x1] = 255
    px = processor.image_processor(Image.fromarray(img), return_tensors="np")["pixel_values"][0, 0]  # (896, 896)
    side = REAL["image_size"]
    assert px.shape == (side, side)
    sy, sx = side / h, side / w
    rows, cols = np.nonzero(px > 0)  # normalised to [-1, 1]: white > 0 > black
    # Bilinear resampling blurs the edges by at most a couple of resized pixels beyond the scaled box.
    tol = 2 + max(sy, sx)
    assert abs(rows.min() - y0 * sy) <= tol and abs(rows.max() + 1 - y1 * sy) <= tol, (h, w)
    assert abs(cols.min() - x0 * sx) <= tol and abs(cols.max() + 1 - x1 * sx) <= tol, (h, w)
    return sy, sx


def _area_map(box: tuple[float, float, float, float], feet: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """Area of the box (original px, ``x0, y0, x1, y1``) inside each token's footprint, normalised."""
    x0, y0, x1, y1 = box
    fy0, fx0, fy1, fx1 = (feet[:, 0] / sy, feet[:, 1] / sx, feet[:, 2] / sy, feet[:, 3] / sx)
    ov = np.clip(np.minimum(fx1, x1) - np.maximum(fx0, x0), 0, None) * np.clip(
        np.minimum(fy1, y1) - np.maximum(fy0, y0), 0, None
    )
    return ov / ov.sum()


def test_target_maps_match_the_models_own_token_footprints_at_real_geometry(replica):
    model, processor = replica
    rng = np.random.RandomState(0)
    collator = KLALCollator(processor)
    for h, w in SIZES_HW:
        box = [0.13 * w, 0.61 * h, 0.58 * w, 0.97 * h]  # odd fractions: cuts cells partially on every side
        row = {
            "id": f"{h}x{w}",
            "image": Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")),
            "question": "Where is it?",
            "answer": "here",
            "evidence": {"boxes": [box], "points": [], "polylines": []},
        }
        batch = collator([row])
        assert batch["grids"] == [[(16, 16)]]
        feet = _footprints(model, processor, batch)
        assert feet.shape == (256, 4)
        # The footprints tile the 896 x 896 resized image exactly: 4 x 4 patches of 14 px each, no overlap.
        assert np.allclose(feet[:, 2] - feet[:, 0], 56) and np.allclose(feet[:, 3] - feet[:, 1], 56)
        sy, sx = _resize_scale(processor, h, w)
        want = _area_map(box, feet, sy, sx)
        got = build_target_map(row["evidence"], (h, w), (16, 16)).reshape(-1)
        assert np.abs(got - batch["target"][0].numpy()).max() < 1e-6
        assert np.abs(got - want).max() <= 1e-6, (h, w, np.abs(got - want).max())


def test_tiny_tokenizer_round_trips_and_renders_the_gemma_chat_format():
    tok = FAMILY.tiny_tokenizer()
    assert tok.get_vocab() == FAMILY.tiny_tokenizer().get_vocab()  # deterministic
    text = "Where is the red star? Ünïcödé 漢字 (12, 345)\n\ttabs"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for special in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Which cell? "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "(1, 2)"}]},
    ]
    # Gemma 3's format as its model card shows it: the system text opens the first user turn.
    want = (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>Which cell?<end_of_turn>\n"
        "<start_of_turn>model\n(1, 2)<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want


def test_tiny_processor_expands_the_image_and_marks_its_tokens():
    """The placeholder becomes 64 soft tokens between begin/end-of-image, ``token_type_ids`` mark exactly those,
    the image token count and the stop tokens are the family's, and a batch of two prompts with images nests them."""
    processor = FAMILY.build_tiny_processor(0, 0)
    tok = processor.tokenizer
    rows = [
        {"id": i, "image": Image.new("RGB", (40 + 30 * i, 50)), "question": "Which cell?", "answer": "yes"}
        for i in range(2)
    ]
    batch = KLALCollator(processor)(rows)
    soft = batch["input_ids"] == FAMILY.grid_token_id(processor)
    assert soft.sum(1).tolist() == [64, 64] and torch.equal(batch["token_type_ids"].bool(), soft)
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<bos>")) == 1  # the template's, none added by the tokenizer
    first = ids.index(FAMILY.grid_token_id(processor))
    assert ids[first - 1] == tok.convert_tokens_to_ids("<start_of_image>")
    assert ids[first + 64] == tok.convert_tokens_to_ids("<end_of_image>")
    # The placeholder's expansion, as the length estimate counts it.
    plain = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which cell?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    n_plain = len(tok(plain, add_special_tokens=False)["input_ids"])
    n_labels = int((batch["labels"][0] != -100).sum())
    assert n_plain - 1 + FAMILY.image_token_count(processor, 50, 40) + n_labels == int(batch["attention_mask"][0].sum())
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert batch["labels"][0][batch["labels"][0] != -100].tolist()[-1] == end
    assert end in FAMILY.stop_token_ids(processor) and FAMILY.grid_token_id(processor) in FAMILY.stop_token_ids(
        processor
    )
