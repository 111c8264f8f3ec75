"""The Lightning module on the tiny model: gradients, NaN safety, a short fit that lowers KLAL, checkpoints, adapter."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from klal.data.collate import KLALCollator
from klal.models.loader import ModelConfig
from klal.models.lora import LoraSettings
from klal.module import KLALModule, OptimSettings
from tests.conftest import make_row

SMALL = ModelConfig(min_pixels=56 * 56, max_pixels=224 * 224)


def _module(**kw) -> KLALModule:
    m = KLALModule(backbone=SMALL, lora=LoraSettings(r=4, alpha=8, dropout=0.0), **kw)
    m.configure_model()
    return m


def _randomise_lora_b(module: KLALModule) -> None:
    # LoRA B starts at zero, which makes every A gradient zero; a random B makes "gets a gradient" meaningful.
    g = torch.Generator().manual_seed(0)
    for n, p in module.model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def _batch(tiny_processor, rows):
    return KLALCollator(tiny_processor)(rows)


def test_klal_gradients_reach_supervised_layers_only(tiny_processor, mixed_rows):
    m = _module(klal_layers=[0, 1])
    _randomise_lora_b(m)
    m.train()
    parts = m.compute_losses(_batch(tiny_processor, mixed_rows))
    parts["klal"].backward()
    for n, p in m.model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {n} got a gradient"
            continue
        layer = int(n.split("layers.")[1].split(".")[0])
        nonzero = p.grad is not None and p.grad.abs().sum().item() > 0
        # KLAL at layers 0-1 depends on q/k of layers 0-1 and on everything that feeds layer 1 (layer 0's v, o).
        if layer >= 2 or (layer == 1 and ("v_proj" in n or "o_proj" in n)):
            assert not nonzero, f"{n} is above the supervised layers but got a KLAL gradient"
        elif "q_proj" in n or "k_proj" in n:
            assert nonzero, f"{n} in a supervised layer got no KLAL gradient"


def test_total_loss_gradients_reach_every_lora_parameter_and_no_frozen_one(tiny_processor, mixed_rows):
    m = _module()
    _randomise_lora_b(m)
    m.train()
    loss = m.compute_losses(_batch(tiny_processor, mixed_rows))["loss"]
    loss.backward()
    trainable = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    for n, p in m.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_no_nan_with_empty_and_one_hot_maps(tiny_processor):
    rows = [make_row(0, 112, 112, None), make_row(1, 112, 112, [28.0, 28.0, 56.0, 56.0])]
    m = _module()
    m.train()
    batch = _batch(tiny_processor, rows)
    assert batch["has_target"].tolist() == [False, True]
    assert batch["target"][1].max().item() == pytest.approx(1.0)  # one-hot
    parts = m.compute_losses(batch)
    assert all(torch.isfinite(v).all() for v in parts.values())
    parts["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.model.parameters() if p.grad is not None)
    # A batch with no map at all still gives a finite, graph-connected KLAL of zero.
    batch0 = _batch(tiny_processor, [rows[0]])
    parts0 = m.compute_losses(batch0)
    assert parts0["klal"].item() == 0.0 and parts0["klal"].requires_grad


def test_ntp_only_measures_but_does_not_train_attention(tiny_processor, mixed_rows):
    m = _module(klal_weight=0.0)
    parts = m.compute_losses(_batch(tiny_processor, mixed_rows))
    assert torch.equal(parts["loss"], parts["ntp"])
    assert not parts["klal"].requires_grad and parts["klal"].item() > 0


def test_short_fit_lowers_klal_and_checkpoint_holds_only_lora(tiny_processor, tmp_path):
    rows = [
        make_row(i, 112, 112, [28.0 * (i % 4), 28.0 * (i // 4 % 4), 28.0 * (i % 4) + 28, 28.0 * (i // 4 % 4) + 28])
        for i in range(8)
    ]
    torch.manual_seed(0)
    m = KLALModule(
        backbone=SMALL,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        optim=OptimSettings(lr=5e-3, warmup_steps=2),
        adapter_dir=str(tmp_path / "adapter"),
    )
    m.configure_model()
    loader = DataLoader(rows, batch_size=4, collate_fn=KLALCollator(m.processor))
    batches = list(loader)
    with torch.no_grad():
        before = sum(m.compute_losses(b)["klal"].item() for b in batches) / len(batches)
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
    )
    trainer.fit(m, train_dataloaders=loader)
    m.eval()
    with torch.no_grad():
        after = sum(m.compute_losses(b)["klal"].item() for b in batches) / len(batches)
    assert after < 0.8 * before, (before, after)

    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    n_trainable = sum(1 for p in m.model.parameters() if p.requires_grad)
    assert len(ckpt["state_dict"]) == n_trainable

    # The adapter folder loads onto a fresh base model with peft and reproduces the trained model's logits.
    from peft import PeftModel

    from klal.models.loader import load_model_and_processor

    base, _ = load_model_and_processor(SMALL)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    b = batches[0]
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        ref = m.model(**{k: b[k] for k in keys}).logits
        got = loaded(**{k: b[k] for k in keys}).logits
    assert (ref - got).abs().max().item() < 1e-5


def test_checkpoint_from_another_base_is_refused():
    m = _module()
    with pytest.raises(ValueError, match="base model"):
        m.on_load_checkpoint({"klal_base_model": "Qwen/Qwen2.5-VL-7B-Instruct", "state_dict": {}})


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_processor, mixed_rows):
    batch = _batch(tiny_processor, mixed_rows)
    results = []
    for gc in (False, True):
        torch.manual_seed(0)  # LoRA A is initialised from the global RNG
        m = _module(gradient_checkpointing=gc)
        _randomise_lora_b(m)
        m.train()
        parts = m.compute_losses(batch)
        parts["loss"].backward()
        grads = {n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad}
        results.append((parts["klal"].item(), grads))
    (k0, g0), (k1, g1) = results
    assert k1 == pytest.approx(k0, rel=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), n
