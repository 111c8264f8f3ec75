"""Every attention kernel a user can name either runs with capture or falls back to sdpa with one warning line
(issue 27). Capture under any kernel must give the eager attention rows renormalised over the visual tokens.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from klal.capture import CaptureRequest, enable_capture, register_capture_attention, select_queries
from klal.data.collate import KLALCollator
from klal.kernels import flash_attention_available, resolve_attn_implementation
from klal.models.config import ModelConfig
from klal.models.family import family_of, nest_grids
from klal.models.loader import load_model_and_processor, set_text_attn_implementation

NAMES = [
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
    "kernels-community/flash-attn",
    "kernels-community/flash-attn3",
    "kernels-community/vllm-flash-attn3:flash_attn_func",
]


def _runs_here(name: str) -> bool:
    if name.startswith("flash_attention_"):
        return flash_attention_available(int(name[-1]))
    return name in ("eager", "sdpa")  # Qwen2.5-VL has no flex; hub kernels need CUDA (and the hub)


@pytest.mark.parametrize("name", NAMES)
def test_each_kernel_runs_or_falls_back_to_sdpa_in_one_warning_line(name, caplog):
    with caplog.at_level(logging.WARNING, logger="klal.kernels"):
        model, _ = load_model_and_processor(ModelConfig("tiny", attn_implementation=name))
    warnings = [r.getMessage() for r in caplog.records if r.name == "klal.kernels"]
    got = model.config.text_config._attn_implementation
    if _runs_here(name):
        assert got == name and not warnings
    elif got == name:  # a GPU machine where the kernel loaded (hub kernels: with the hub reachable)
        assert torch.cuda.is_available() and not warnings
    else:
        assert got == "sdpa"
        assert len(warnings) == 1 and name in warnings[0] and "using sdpa" in warnings[0] and "\n" not in warnings[0]
    assert enable_capture(model).startswith("klal_")


def _check_capture_equals_eager(model, processor) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    row = {
        "id": "a",
        "image": img,
        "question": "Where is the star?",
        "answer": "(1, 2)",
        "evidence": {"boxes": [[0, 0, 50, 50]], "points": [], "polylines": []},
    }
    batch = KLALCollator(processor)([row, dict(row, id="b", question="Where is the red star, please?")])
    family = family_of(model)
    visual = family.visual_token_mask(
        batch["input_ids"], processor.image_token_id, nest_grids(batch["grids"], batch["grid_image"])
    )
    request = CaptureRequest.from_masks(select_queries(batch["answer_mask"], "last"), visual)
    kw = {k: batch[k] for k in family.input_keys if k in batch}
    with torch.no_grad():
        out = model(**kw, klal_capture=request, use_cache=False)
        set_text_attn_implementation(model, "eager")
        ref = model(**kw, output_attentions=True, use_cache=False)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    maps = request.stacked().exp()  # (L, B, A, V)
    for layer, att in enumerate(ref.attentions):  # (B, H, S, S)
        for i in range(2):
            keys = request.key_index[i][request.key_valid[i]]
            rows = att[i, :, request.query_index[i, 0], keys]  # (H, V)
            expected = (rows / rows.sum(-1, keepdim=True)).mean(0)
            assert torch.allclose(maps[layer, i, 0, : len(keys)], expected, atol=1e-6), (layer, i)


def test_flex_attention_runs_with_capture_where_the_architecture_supports_it(caplog):
    with caplog.at_level(logging.WARNING, logger="klal.kernels"):
        model, processor = load_model_and_processor(
            ModelConfig("tiny-llava-onevision", attn_implementation="flex_attention")
        )
    assert not [r for r in caplog.records if r.name == "klal.kernels"]
    assert enable_capture(model) == "klal_flex_attention"
    _check_capture_equals_eager(model, processor)


def test_a_hub_kernel_name_is_wrapped_under_a_name_transformers_does_not_read_as_a_hub_repo():
    # What load_and_register_attn_kernel leaves behind on a GPU machine: the repo name registered as a kernel.
    AttentionInterface.register("kernels-test/sdpa-as-hub-kernel", sdpa_attention_forward)
    AttentionMaskInterface.register("kernels-test/sdpa-as-hub-kernel", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    assert resolve_attn_implementation("kernels-test/sdpa-as-hub-kernel") == "sdpa" or torch.cuda.is_available()
    model, processor = load_model_and_processor(ModelConfig("tiny"))
    name = register_capture_attention("kernels-test/sdpa-as-hub-kernel")
    assert name == "klal_kernels_test_sdpa_as_hub_kernel"
    set_text_attn_implementation(model, name)  # transformers would try to download a name with a slash
    assert enable_capture(model) == name  # the wrapped kernel is found again from the capture name
    _check_capture_equals_eager(model, processor)
