"""Attention capture under activation checkpointing (issue 27): one set of maps per step, whatever the flavour.

The recomputation during backward runs every capture again; a map it stored would hold the whole recomputed layer's
autograd graph, so every layer's activations would stay alive until the step ends and checkpointing would save
nothing. Memory here is measured (the profiler's allocation events: the most tensor bytes alive at once), not
estimated, so it does not depend on the load of the machine.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from bench.memory import peak_tensor_bytes
from klal.capture import CaptureRequest
from klal.data.collate import KLALCollator
from klal.models.config import ModelConfig
from klal.models.lora import LoraSettings
from klal.module import KLALModule

LAYERS = 8
SIDE = 448  # 16 x 16 = 256 visual tokens


@pytest.fixture(scope="module")
def deep():
    """An 8-layer tiny Qwen2.5-VL with LoRA (random B, so every gradient is nonzero) and a batch of 2 at 256 visual
    tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine two threads per process oversubscribe the cores
    torch.manual_seed(0)
    backbone = ModelConfig("tiny", max_pixels=SIDE * SIDE, tiny_overrides={"num_hidden_layers": LAYERS})
    m = KLALModule(backbone=backbone, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    m.configure_model()
    g = torch.Generator().manual_seed(0)
    for n, p in m.model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    m.train()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8))
    row = {
        "task": "test",
        "image": img,
        "question": "Which cell contains the red star?",
        "answer": "(1, 2)",
        "width": SIDE,
        "height": SIDE,
        "evidence": {"boxes": [[0.0, 0.0, 112.0, 112.0]], "points": [], "polylines": []},
        "meta": "{}",
    }
    batch = KLALCollator(m.processor)([dict(row, id=f"r{i}") for i in range(2)])
    assert int((batch["input_ids"][0] == m.image_token_id).sum()) == 256
    yield m, batch
    torch.set_num_threads(threads)


def _set(m: KLALModule, klal_weight: float, measure: bool, checkpointing: bool) -> None:
    m.klal_weight, m.measure_attention = klal_weight, measure
    if checkpointing:
        m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.model.enable_input_require_grads()
    else:
        m.model.gradient_checkpointing_disable()


def _step(m: KLALModule, batch, seen: list[CaptureRequest] | None = None) -> dict[str, torch.Tensor]:
    """compute_losses + backward; ``seen`` receives the step's request and the number of maps the forward stored."""
    if seen is not None:
        orig = m.klal_result

        def spy(request, b):
            seen.append((request, len(request.log_maps)))
            return orig(request, b)

        m.klal_result = spy
    try:
        parts = m.compute_losses(batch)
        parts["loss"].backward()
    finally:
        m.__dict__.pop("klal_result", None)
    return {k: v.detach() for k, v in parts.items()}


def _grads(m: KLALModule) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad}
    m.model.zero_grad(set_to_none=True)
    return out


def _peak(m: KLALModule, batch) -> int:
    def one():
        m.compute_losses(batch)["loss"].backward()
        m.model.zero_grad(set_to_none=True)

    one()  # warm-up: lazily built buffers are not the step's cost
    return peak_tensor_bytes(one)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_klal_step_memory_matches_ntp_and_no_map_outlives_the_step(deep, checkpointing):
    m, batch = deep
    _set(m, 1.0, True, checkpointing)
    seen: list = []
    _step(m, batch, seen)
    m.model.zero_grad(set_to_none=True)
    ((request, stored),) = seen
    assert stored == LAYERS  # the forward captured every layer ...
    assert request.log_maps == {} and request.full_probs == {}  # ... and backward (the recomputation) stored none
    klal = _peak(m, batch)
    _set(m, 0.0, False, checkpointing)  # plain NTP: no capture at all
    ntp = _peak(m, batch)
    assert klal <= 1.05 * ntp, (klal / ntp, klal, ntp)


def test_ntp_arm_measures_the_same_maps_without_autograd(deep):
    m, batch = deep
    logged = []
    for weight, ckpt in ((1.0, False), (0.0, True)):
        _set(m, weight, True, ckpt)
        parts = _step(m, batch)
        m.model.zero_grad(set_to_none=True)
        logged.append((parts["klal"].item(), parts["target_mass"].item()))
    # The NTP arm logs the KLAL arm's metrics (same weights) though its maps carry no autograd graph.
    assert logged[1] == pytest.approx(logged[0], rel=1e-5)


def test_lightning_fsdp_checkpoint_wrapper_flavour(deep):
    """Lightning's FSDP ``activation_checkpointing_policy`` wraps layers with torch's ``checkpoint_wrapper``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    m, batch = deep
    _set(m, 1.0, True, False)
    _step(m, batch)
    reference = _grads(m)
    layers = m.model.get_base_model().model.language_model.layers
    originals = list(layers)
    layer_type = type(originals[0])
    m.model.enable_input_require_grads()
    apply_activation_checkpointing(
        m.model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda mod: isinstance(mod, layer_type),
    )
    try:
        assert type(layers[0]).__name__ == "CheckpointWrapper"
        seen: list = []
        _step(m, batch, seen)
        ((request, stored),) = seen
        assert stored == LAYERS and request.log_maps == {}
        grads = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in _grads(m).items()}
        assert grads.keys() == reference.keys()
        for n, g in reference.items():
            assert torch.allclose(grads[n], g, atol=1e-6, rtol=1e-4), n
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def test_reentrant_checkpointing_is_refused_when_klal_trains(deep):
    m, batch = deep
    _set(m, 1.0, True, False)
    m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    m.model.enable_input_require_grads()
    try:
        with pytest.raises(RuntimeError, match="use_reentrant=True"):
            m.compute_losses(batch)
        # Measuring only (the NTP arm) needs no gradient through the maps: it runs, and stores no recomputed map.
        _set(m, 0.0, True, False)
        m.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        seen: list = []
        _step(m, batch, seen)
        ((request, stored),) = seen
        assert stored == LAYERS and request.log_maps == {}
        m.model.zero_grad(set_to_none=True)
    finally:
        m.model.gradient_checkpointing_disable()


def test_bench_step_reaches_the_requested_visual_tokens_or_refuses_naming_the_maximum():
    from bench.step import collated_inputs

    inputs, cfg = collated_inputs("tiny", 1, 1024, torch.device("cpu"), layers=28)
    assert int(inputs["visual_mask"][0].sum()) == 1024 and cfg.tiny_overrides == {"num_hidden_layers": 28}
    with pytest.raises(ValueError, match=r"tiny-llava-onevision reaches at most \d+ visual tokens"):
        collated_inputs("tiny-llava-onevision", 1, 1024, torch.device("cpu"))
