"""The Lightning module on the tiny model: gradients, NaN safety, a short fit that lowers KLAL, checkpoints, adapter,
and text-only samples (alone and mixed with image samples)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from klal.data.collate import IGNORE_INDEX, KLALCollator
from klal.models.loader import ModelConfig
from klal.models.lora import LoraSettings
from klal.module import KLALModule, OptimSettings
from tests.conftest import make_row, make_text_row

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


# -- text-only samples -------------------------------------------------------------------------------------------------
TEXT_ROWS = [make_text_row(20), make_text_row(21, answer="(12, 10) and (3, 4)", question="Where are the two stars?")]


def _rows(kind: str, mixed_rows: list[dict]) -> list[dict]:
    """``all_text``: only text-only rows; ``mixed``: the image rows with text-only rows between them."""
    if kind == "all_text":
        return list(TEXT_ROWS)
    return [mixed_rows[0], TEXT_ROWS[0], mixed_rows[1], TEXT_ROWS[1], mixed_rows[2]]


def _cross_entropy_of_rows(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """NTP computed without klal: each row run on its own, unpadded, straight through the model, and the summed
    next-token cross-entropy of the supervised labels divided by their count over the batch."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    grids = iter(batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)))
    pixels = batch.get("pixel_values")
    offset = 0
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][real][None], batch["labels"][i][real][None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        n_images = len(batch["grids"][i])
        if n_images:
            thw = torch.stack([next(grids) for _ in range(n_images)])
            n_patches = int(thw.prod(-1).sum())
            inputs.update(
                pixel_values=pixels[offset : offset + n_patches],
                image_grid_thw=thw,
                mm_token_type_ids=batch["mm_token_type_ids"][i][real][None],
            )
            offset += n_patches
        logits = model(**inputs).logits[0, :-1].double()
        target = labels[0, 1:]
        keep = target != IGNORE_INDEX
        total = total + torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("kind", ["all_text", "mixed"])
def test_text_only_rows_train_every_lora_parameter_with_the_plain_ntp(tiny_processor, mixed_rows, kind):
    m = _module()
    _randomise_lora_b(m)
    m.train()
    batch = _batch(tiny_processor, _rows(kind, mixed_rows))
    assert ("pixel_values" in batch) == (kind == "mixed")
    parts = m.compute_losses(batch)
    assert all(torch.isfinite(v).all() for v in parts.values()), parts
    if kind == "all_text":
        # No visual token anywhere: KLAL is an exact zero that is still part of the graph (DDP reduces the same
        # parameters on every rank), and the loss is the NTP alone.
        assert parts["klal"].item() == 0.0 and parts["klal"].requires_grad
        assert parts["maps"].item() == 0 and parts["loss"].item() == parts["ntp"].item()
    else:
        assert parts["maps"].item() == 2 and parts["klal"].item() > 0
    parts["loss"].backward()
    trainable = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model.layers." in n for n, _ in trainable)
    for n, p in m.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n  # the frozen vision tower among them
    with torch.no_grad():
        expected = _cross_entropy_of_rows(m.model, batch)
    assert parts["ntp"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("image_mode", ["joint", "per_image"])
def test_mixed_batch_klal_equals_the_klal_of_its_image_rows_alone(tiny_processor, mixed_rows, image_mode):
    m = _module(klal_image_mode=image_mode)
    _randomise_lora_b(m)
    m.eval()
    with torch.no_grad():
        mixed = m.compute_losses(_batch(tiny_processor, _rows("mixed", mixed_rows)))
        images_only = m.compute_losses(_batch(tiny_processor, mixed_rows))
    assert mixed["maps"].item() == images_only["maps"].item() == 2
    assert mixed["klal"].item() == pytest.approx(images_only["klal"].item(), rel=1e-5)
    assert mixed["target_mass"].item() == pytest.approx(images_only["target_mass"].item(), rel=1e-5)
