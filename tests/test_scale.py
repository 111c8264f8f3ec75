"""Scaling: length estimates, the length-grouped and token-budget samplers, the data module's sharding, cross-rank loss
normalisation (1 process vs 2-process DDP on CPU give the same loss curve), no DDP hang on batches without target
maps, rank discovery under torchrun and SLURM, the FSDP wrapping checks and the flash-attention fallback. GPU-only
checks (FSDP / DeepSpeed fit, checkpoint and resume; flash-attention-2) are marked ``gpu``."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from torch.utils.data import DistributedSampler

from klal.checkpoint.loading import safe_load
from klal.data.collate import NO_IMAGE_REASON, KLALCollator, PromptSettings
from klal.data.sampler import LengthGroupedSampler, TokenBudgetBatchSampler, estimate_lengths, padding_fraction
from klal.data.schema import FEATURES
from klal.fsdp import KLALFSDPStrategy, mixed_dtype_units, strip_wrapper_prefixes
from klal.global_batch import global_share
from klal.kernels import flash_attention_available, resolve_attn_implementation
from tests.conftest import HANG_S, make_row, make_text_row

REPO = Path(__file__).resolve().parents[1]
# The demo config's pixel bounds, which the DDP runs below use.
DEMO_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- length estimates --------------------------------------------------------------------------------------------------
SIZES = [(224, 224, "(3, 2)"), (168, 112, "7"), (140, 196, "(12, 10)"), (50, 600, "Yes"), (1000, 800, "no way")]


@pytest.mark.parametrize(
    "prompt",
    [PromptSettings(), PromptSettings(system_prompt="You ground answers.", question_suffix=" Answer briefly.")],
    ids=["default", "system+suffix"],
)
def test_estimated_lengths_equal_collated_lengths(tiny_processor, prompt):
    rows = [make_row(i, w, h, None, answer=a) for i, (w, h, a) in enumerate(SIZES)]
    # Text-only rows (no image, size 0 x 0) render without the image placeholder.
    rows += [make_text_row(0), make_text_row(1, answer="(12, 10) and (3, 4)", question="Where?")]
    collator = KLALCollator(tiny_processor, prompt=prompt)
    real = [int(collator([r])["attention_mask"].sum()) for r in rows]
    assert estimate_lengths(rows, tiny_processor, prompt) == real
    ds = datasets.Dataset.from_list(rows, features=FEATURES)
    assert estimate_lengths(ds, tiny_processor, prompt) == real
    with pytest.raises(ValueError, match="width"):
        estimate_lengths(ds.remove_columns("width"), tiny_processor)
    # Only a 0 x 0 (or unknown) size means "no image"; one zero side is an error naming the sample.
    assert estimate_lengths([dict(rows[-1], width=None, height=None)], tiny_processor, prompt) == real[-1:]
    with pytest.raises(ValueError, match=r"sample .row-0. \(row 0\), image 0 x 224.*positive"):
        estimate_lengths([dict(rows[0], width=0)], tiny_processor, prompt)


# -- LengthGroupedSampler ----------------------------------------------------------------------------------------------
def _rank_batches(sampler_cls, lengths, batch_size, world, **kw) -> list[list[list[int]]]:
    """Per rank, the list of batches the rank's DataLoader would form."""
    out = []
    for r in range(world):
        idx = list(sampler_cls(lengths, batch_size, num_replicas=world, rank=r, **kw))
        out.append([idx[i : i + batch_size] for i in range(0, len(idx), batch_size)])
    return out


def test_length_grouped_global_batches_do_not_depend_on_the_number_of_processes():
    lengths = [int(x) for x in torch.randint(20, 400, (48,), generator=torch.Generator().manual_seed(1))]
    plans = {}
    for world in (1, 2, 4):
        per_rank = _rank_batches(LengthGroupedSampler, lengths, 8 // world, world, seed=3, megabatch_mult=2)
        assert len({len(b) for b in per_rank}) == 1, "every rank must get the same number of batches"
        plans[world] = [sorted(sum((per_rank[r][k] for r in range(world)), [])) for k in range(len(per_rank[0]))]
    assert plans[1] == plans[2] == plans[4]
    assert sorted(sum(plans[1], [])) == list(range(48)), "one epoch covers every sample once"


def test_length_grouped_sorts_within_megabatches_and_puts_the_longest_first():
    # Hand-worked: one megabatch holding everything, sorted longest first -> {10, 9}, {5, 4}, {2, 1}.
    lengths = [1, 10, 4, 9, 2, 5]
    s = LengthGroupedSampler(lengths, batch_size=2, seed=0, megabatch_mult=10)
    batches = s.global_batches()
    assert batches[0] == [1, 3]
    assert sorted(map(sorted, batches)) == [[0, 4], [1, 3], [2, 5]]
    assert padding_fraction(batches, lengths) == pytest.approx(1 - 31 / 34)
    # Same epoch, same plan; another epoch, another order of the samples (with megabatch_mult=1 the groups change).
    s1 = LengthGroupedSampler(list(range(1, 41)), batch_size=4, seed=0, megabatch_mult=1)
    first = list(s1)
    assert list(s1) == first
    s1.set_epoch(1)
    assert list(s1) != first and sorted(s1) == sorted(first)


def test_length_grouped_cuts_padding_compared_with_random_batches():
    lengths = [int(x) for x in torch.randint(30, 1200, (512,), generator=torch.Generator().manual_seed(0))]
    grouped = LengthGroupedSampler(lengths, batch_size=8, seed=0).global_batches()
    order = list(DistributedSampler(range(512), num_replicas=1, rank=0, seed=0))
    plain = [order[i : i + 8] for i in range(0, 512, 8)]
    assert padding_fraction(grouped, lengths) < 0.25 * padding_fraction(plain, lengths)


def test_length_grouped_pads_the_last_global_batch_and_checks_arguments():
    per_rank = _rank_batches(LengthGroupedSampler, [5] * 7, 2, 2, seed=0)
    flat = sorted(i for rank in per_rank for b in rank for i in b)
    assert len(flat) == 8 and set(flat) == set(range(7)), "7 samples fill 2 steps x 2 ranks x 2 with one repeat"
    assert all(len(b) == 2 for rank in per_rank for b in rank)
    assert len(LengthGroupedSampler([5] * 7, 2, num_replicas=2, rank=0, drop_last=True)) == 2
    with pytest.raises(ValueError, match="rank 2"):
        LengthGroupedSampler([5] * 8, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        LengthGroupedSampler([5, 0], 1)


# -- TokenBudgetBatchSampler -------------------------------------------------------------------------------------------
def test_token_budget_hand_worked_packing():
    # Sorted longest first: 8 8 | 4 4 4 4 | 2 -> padded costs 16, 16, 2.
    lengths = [4, 8, 2, 4, 8, 4, 4]
    s = TokenBudgetBatchSampler(lengths, max_tokens=16, shuffle=False)
    assert [sorted(step[0]) for step in s.steps()] == [[1, 4], [0, 3, 5, 6], [2]]
    assert len(s) == 3
    capped = TokenBudgetBatchSampler(lengths, max_tokens=16, shuffle=False, max_batch_size=3)
    # At most 3 samples: 8 8 | 4 4 4 | 4 2 (padded 4 x 2 = 8).
    assert [sorted(b) for b in capped] == [[1, 4], [0, 3, 5], [2, 6]]
    with pytest.raises(ValueError, match="sample 1 has 8 tokens"):
        TokenBudgetBatchSampler(lengths, max_tokens=7)


def test_token_budget_ranks_stay_in_step_and_cover_the_data():
    lengths = [int(x) for x in torch.randint(10, 300, (101,), generator=torch.Generator().manual_seed(2))]
    for epoch in (0, 1):
        ranks = []
        for r in range(3):
            s = TokenBudgetBatchSampler(lengths, max_tokens=1000, num_replicas=3, rank=r, seed=5)
            s.set_epoch(epoch)
            ranks.append(list(s))
            assert len(ranks[-1]) == len(s), "len() must match the batches actually yielded"
        assert len({len(b) for b in ranks}) == 1, "every rank gets the same number of batches"
        flat = [i for b in ranks for batch in b for i in batch]
        assert set(flat) == set(range(101)), "every sample is seen"
        assert len(flat) - 101 <= max(len(batch) for b in ranks for batch in b) * 2, "only the padding repeats"
        assert all(max(lengths[i] for i in b) * len(b) <= 1000 for rank in ranks for b in rank)
        sizes = {len(b) for rank in ranks for b in rank}
        assert len(sizes) > 3, "short samples travel in bigger batches"


# -- data module -------------------------------------------------------------------------------------------------------
def _write_dataset(path: Path, train_rows: list[dict], val_rows: list[dict]) -> str:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(train_rows, features=FEATURES),
            "validation": datasets.Dataset.from_list(val_rows, features=FEATURES),
        }
    )
    dd.save_to_disk(str(path))
    return str(path)


def _varied_rows(n: int, offset: int = 0) -> list[dict]:
    sizes = [(112, 112), (224, 112), (224, 224), (56, 56), (168, 224)]
    answers = ["(2, 3)", "7", "(12, 10)", "Yes"]
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        rows.append(make_row(offset + i, w, h, [0.0, 0.0, w / 2, h / 2] if i % 3 else None, answer=answers[i % 4]))
    return rows


def _datamodule(path: str, processor, **kw):
    from klal.datamodule import KLALDataModule

    dm = KLALDataModule(paths=[path], **kw)
    dm.processor = processor
    dm.setup("fit")
    return dm


def test_datamodule_token_budget_batches_fit_the_budget_once_collated(tmp_path):
    from klal.models.qwen2_5_vl.tiny import build_tiny_processor

    processor = build_tiny_processor(**DEMO_PIXELS)
    path = _write_dataset(tmp_path / "d", _varied_rows(20), _varied_rows(2, 100))
    dm = _datamodule(path, processor, token_budget=200, seed=0)
    seen, sizes = [], set()
    for batch in dm.train_dataloader():
        b, s = batch["input_ids"].shape
        assert b * s <= 200, "the padded batch the collator builds stays within the budget"
        seen += batch["ids"]
        sizes.add(b)
    assert sorted(seen) == sorted(f"row-{i}" for i in range(20)) and len(sizes) > 1
    grouped = _datamodule(path, processor, batch_size=4, group_by_length=True, seed=0).train_dataloader()
    assert isinstance(grouped.sampler, LengthGroupedSampler)
    assert sorted(i for batch in grouped for i in batch["ids"]) == sorted(seen)
    with pytest.raises(ValueError, match="token_budget"):
        _datamodule(path, processor, token_budget=0)


def test_datamodule_token_budget_with_text_only_rows(tmp_path):
    """Text-only rows saved in the schema (``image`` None) load, get length estimates without visual tokens, and
    token-budget batches of them (alone or mixed with image rows) stay within the budget once collated."""
    from klal.models.qwen2_5_vl.tiny import build_tiny_processor

    processor = build_tiny_processor(**DEMO_PIXELS)
    rows = _varied_rows(10) + [make_text_row(i, answer="(12, 10)" if i % 2 else "Paris") for i in range(10)]
    path = _write_dataset(tmp_path / "d", rows, [make_text_row(100)])
    dm = _datamodule(path, processor, token_budget=200, seed=0)
    assert dm.splits["train"][10]["image"] is None and dm.splits["train"][10]["width"] == 0
    seen, kinds = [], set()
    for batch in dm.train_dataloader():
        b, s = batch["input_ids"].shape
        assert b * s <= 200
        seen += batch["ids"]
        n_text = sum(r == NO_IMAGE_REASON for r in batch["no_map_reason"])
        kinds.add("text" if n_text == b else "image" if n_text == 0 else "mixed")
        assert ("pixel_values" in batch) == (n_text < b)
    assert sorted(seen) == sorted(r["id"] for r in rows)
    assert {"text", "mixed"} <= kinds, kinds
    assert dm.train_lengths()[10:] == [int(dm.collator([r])["attention_mask"].sum()) for r in rows[10:]]


def test_nodes_generating_the_same_dataset_at_once_do_not_fail(tmp_path, monkeypatch):
    """``prepare_data`` runs on local rank 0 of every node: on a shared file system two nodes may generate
    ``data.generate.out`` at the same time. The one that finishes second must use the first one's dataset."""
    import data_gen.writer as writer
    from klal.datamodule import GenerateSettings, KLALDataModule

    out = tmp_path / "gp"
    settings = GenerateSettings(task="grid_patch", num=6, seed=0, image_size=112, preset="easy", out=str(out))
    real = writer.generate_dataset

    def other_node_finishes_first(task, **kw):
        real(task, **kw)  # the other node renames its complete dataset into place first
        return real(task, **kw)  # this node's rename then finds the folder taken

    monkeypatch.setattr(writer, "generate_dataset", other_node_finishes_first)
    KLALDataModule(generate=settings).prepare_data()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["dataset_dict.json", "klal_dataset.json", "test", "train", "validation"]
    )
    assert not list(tmp_path.glob(".gp.partial-*")), "the loser's temporary folder is removed"

    # A failure that leaves no dataset behind is not swallowed.
    def fails(task, **kw):
        raise writer.DatasetWriteError("disk full")

    monkeypatch.setattr(writer, "generate_dataset", fails)
    with pytest.raises(writer.DatasetWriteError, match="disk full"):
        KLALDataModule(generate=GenerateSettings(out=str(tmp_path / "other"))).prepare_data()


# -- strategies --------------------------------------------------------------------------------------------------------
def test_global_share_is_one_without_a_process_group():
    assert torch.equal(global_share(torch.tensor([7, 0])), torch.ones(2))


def test_flash_attention_falls_back_to_sdpa_only_when_unavailable(monkeypatch):
    import klal.kernels as st

    monkeypatch.setattr(st, "flash_attention_available", lambda version=2: False)
    assert resolve_attn_implementation("flash_attention_2") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"
    monkeypatch.setattr(st, "flash_attention_available", lambda version=2: True)
    assert resolve_attn_implementation("flash_attention_2") == "flash_attention_2"


@pytest.mark.skipif(flash_attention_available(), reason="checks the fallback on a machine without flash-attn")
def test_module_with_flash_attention_config_runs_on_sdpa_here(tiny_processor, mixed_rows):
    from klal.models.loader import ModelConfig
    from klal.models.lora import LoraSettings
    from klal.module import KLALModule

    cfg = ModelConfig(attn_implementation="flash_attention_2", **DEMO_PIXELS)
    m = KLALModule(backbone=cfg, lora=LoraSettings(r=2, alpha=4))
    m.configure_model()
    assert m.text_config._attn_implementation == "klal_sdpa"
    assert torch.isfinite(m.compute_losses(KLALCollator(tiny_processor)(mixed_rows))["loss"])


def test_fsdp_units_and_dtype_check():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock

    from klal.models.lora import LoraSettings, apply_lora
    from klal.models.qwen2_5_vl import FAMILY
    from klal.models.qwen2_5_vl.tiny import build_tiny_model

    assert FAMILY.fsdp_wrap_classes(vision_blocks=True) == {Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock}
    assert FAMILY.fsdp_wrap_classes(vision_blocks=False) == {Qwen2_5_VLDecoderLayer}
    units = FAMILY.fsdp_wrap_classes(vision_blocks=True)
    fp32 = apply_lora(build_tiny_model(), LoraSettings(r=2, alpha=4))
    assert mixed_dtype_units(fp32, units) == {}
    # bf16 base weights with fp32 LoRA weights (peft keeps adapters in fp32) cannot share a flat parameter.
    mixed = apply_lora(build_tiny_model(dtype=torch.bfloat16), LoraSettings(r=2, alpha=4))
    bad = mixed_dtype_units(mixed, units)
    n_layers = mixed.config.text_config.num_hidden_layers
    assert len(bad) == n_layers and all(".language_model.layers." in k for k in bad)
    assert all(v == ["bfloat16", "float32"] for v in bad.values())
    s = KLALFSDPStrategy()
    # The wrap policy comes from the model's family when the model is set up (FSDP itself needs CUDA).
    assert s.kwargs["use_orig_params"] is True and s.wrap_vision_blocks is True
    with pytest.raises(ValueError, match="use_orig_params"):
        KLALFSDPStrategy(use_orig_params=False)
    name = "base_model.model.model.language_model.layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A.default.weight"
    assert strip_wrapper_prefixes(name) == name.replace("_fsdp_wrapped_module.", "")


# -- multi-process runs ------------------------------------------------------------------------------------------------
def _train_cmd(tmp_path: Path, data: str, steps: int, batch: int, extra: list[str]) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "null",
        "--trainer.log_every_n_steps",
        "1",
        "--data.generate",
        "null",
        "--data.paths",
        f"[{data}]",
        "--data.batch_size",
        str(batch),
        *extra,
    ]


CHECKPOINT_EVERY_STEP = (
    '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
    '"init_args": {"save_last": true, "save_top_k": 0, "every_n_train_steps": 1}}]'
)


def _run_ddp(
    tmp_path: Path, args: list[str], timeout: float = HANG_S, strategy: str = "ddp"
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    cmd += ["--trainer.devices", "2", "--trainer.strategy", strategy, "--trainer.accelerator", "cpu"]
    # A hang would show as a timeout here rather than a stuck test session.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _step_metrics(root: Path, names: tuple[str, ...] = ("train/loss_step", "train/ntp_step", "train/klal_step")):
    """Logged values of each metric in ``names``, in logging order, from the run's one ``metrics.csv``."""
    files = list(root.rglob("metrics.csv"))
    assert len(files) == 1, files
    rows = list(csv.DictReader(files[0].read_text().splitlines()))
    out: dict[str, list[float]] = {}
    for name in names:
        out[name] = [float(r[name]) for r in rows if r.get(name)]
    return out


@pytest.mark.slow
def test_one_and_two_process_ddp_give_the_same_loss_curve(tmp_path):
    """1 process with batch 4 vs 2 DDP processes with batch 2: the same global batches, so the same losses.

    The rows are arranged so that at step 0 rank 0's two samples have one-token answers and no target map while
    rank 1's have long answers and maps. Averaging per-rank means (plain DDP) then weights rank 0's few answer tokens
    as much as rank 1's many and halves KLAL (0 maps vs 2): without cross-rank normalisation the losses differ by
    about 10% and the test fails (checked by disabling :func:`klal.global_batch.global_share`).
    """
    import train

    n = 16
    order = [list(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
    rank0_step0, rank1_step0 = set(order[0][:2]), set(order[1][:2])
    rows = []
    for i in range(n):
        short = i in rank0_step0 or (i not in rank1_step0 and i % 4 == 0)
        box = None if short else [0.0, 0.0, 56.0, 56.0]
        rows.append(make_row(i, 112 if i % 2 else 168, 112, box, answer="7" if short else "(12, 10) and (3, 4)"))
    data = _write_dataset(tmp_path / "data", rows, _varied_rows(4, 100))
    steps = 5
    one = tmp_path / "one"
    cli = train.main(_train_cmd(one, data, steps, 4, []))
    assert cli.trainer.global_step == steps
    two = tmp_path / "two"
    two.mkdir()
    _run_ddp(two, _train_cmd(two, data, steps, 2, []))
    m1, m2 = _step_metrics(one), _step_metrics(two)
    for name in m1:
        assert len(m1[name]) == len(m2[name]) == steps, name
        assert m1[name] == pytest.approx(m2[name], rel=2e-4, abs=1e-6), name
    assert m1["train/klal_step"][0] > 0


@pytest.mark.slow
def test_ddp_token_budget_with_mapless_batches_finishes(tmp_path):
    """2-process DDP with token-budget batches: ranks get different batch sizes, and rank 0 gets batches whose samples
    all lack a target map. The run must finish (no hang, no unused-parameter error from the frozen vision tower)."""
    from klal.models.qwen2_5_vl.tiny import build_tiny_processor

    rows = _varied_rows(18)
    for i in range(0, 18, 2):
        rows[i]["evidence"] = {"boxes": [], "points": [], "polylines": []}
    budget, steps = 260, 3
    lengths = estimate_lengths(rows, build_tiny_processor(**DEMO_PIXELS))
    plans = [list(TokenBudgetBatchSampler(lengths, budget, num_replicas=2, rank=r, seed=0)) for r in range(2)]
    no_map_batch = [all(rows[i]["evidence"]["boxes"] == [] for i in b) for b in plans[0][:steps]]
    differing = [len(a) != len(b) for a, b in zip(plans[0][:steps], plans[1][:steps])]
    # If the data or sampler changes, re-arrange the rows so that the run still covers both situations.
    assert any(no_map_batch) and any(differing), (plans, no_map_batch, differing)
    data = _write_dataset(tmp_path / "data", rows, _varied_rows(4, 100))
    _run_ddp(tmp_path, _train_cmd(tmp_path, data, steps, 2, ["--data.token_budget", str(budget)]))
    m = _step_metrics(tmp_path)
    assert len(m["train/loss_step"]) == steps and all(v == v for v in m["train/loss_step"])


@pytest.mark.slow
def test_ddp_with_a_rank_whose_batch_has_no_image_finishes(tmp_path):
    """2-process DDP (gloo) with ``find_unused_parameters=False`` and the default frozen vision tower: at step 0
    rank 0's batch is text-only (no ``pixel_values``, so its vision tower never runs) while rank 1's has images and
    maps, and the later steps mix text-only and image rows. Validation does the same (rank 0 text only). The run must
    finish (no hang: a timeout bounds it; no unused-parameter error) with finite losses."""
    n, steps, batch = 16, 3, 2
    # The data module's default sampler: one seeded permutation, rank r takes every 2nd index (seed passed below).
    order = [list(DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
    rank0_step0, rank1_step0 = set(order[0][:batch]), set(order[1][:batch])
    text = rank0_step0 | {i for i in range(n) if i % 3 == 0 and i not in rank1_step0}
    rows = [
        make_text_row(i, answer="(12, 10)" if i % 2 else "Paris")
        if i in text
        else make_row(i, 112 if i % 2 else 168, 112, [0.0, 0.0, 56.0, 56.0], answer="(3, 4)")
        for i in range(n)
    ]
    plan = [[order[r][s * batch : (s + 1) * batch] for s in range(steps)] for r in range(2)]
    no_image = [[all(i in text for i in b) for b in plan[r]] for r in range(2)]
    mixed = [any(i in text for i in b) and not all(i in text for i in b) for r in range(2) for b in plan[r]]
    # If the sampler changes, re-arrange the rows so that the run still covers these situations.
    assert no_image[0][0] and not any(i in text for i in plan[1][0]), plan
    assert any(mixed), (plan, sorted(text))
    # Validation: Lightning's distributed sampler gives rank 0 items 0, 2 and rank 1 items 1, 3.
    box = [0.0, 0.0, 56.0, 56.0]
    val = [make_text_row(100), make_row(101, 112, 112, box), make_text_row(102), make_row(103, 168, 112, box)]
    data = _write_dataset(tmp_path / "data", rows, val)
    # ddp_find_unused_parameters_false: Lightning's DDP with find_unused_parameters=False spelled out.
    args = _train_cmd(tmp_path, data, steps, batch, ["--data.seed", "0"])
    _run_ddp(tmp_path, args, strategy="ddp_find_unused_parameters_false")
    names = ("train/loss_step", "train/ntp_step", "train/klal_step", "val/loss", "val/no_map")
    m = _step_metrics(tmp_path, names)
    for name in names[:3]:
        assert len(m[name]) == steps and all(math.isfinite(v) for v in m[name]), (name, m[name])
    assert m["val/loss"] and all(math.isfinite(v) for v in m["val/loss"]), m
    # Both text-only validation rows were counted as samples without a map (summed over the ranks).
    assert m["val/no_map"] == [2.0], m


# -- launchers: torchrun and SLURM -------------------------------------------------------------------------------------
_PROBE = """
import json, sys
import train
cli = train.main(sys.argv[1:], run=False)
t = cli.trainer
env = t.strategy.cluster_environment
print("PROBE" + json.dumps({"env": type(env).__name__, "strategy": type(t.strategy).__name__, "world": t.world_size,
      "rank": t.global_rank, "node": t.node_rank, "local": t.local_rank, "addr": env.main_address,
      "port": env.main_port}))
"""
_LAUNCHER_VARS = ("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "ROLE_RANK")


def _launcher_env(rank: int, launcher: str) -> dict[str, str]:
    """The environment each launcher gives process ``rank`` of the docs/scaling.md CPU commands (2 nodes x 1)."""
    if launcher == "torchrun":
        # torchrun --nnodes 2 --nproc_per_node 1 --node_rank $r --master_addr 127.0.0.1 --master_port 29512
        return dict(
            RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", GROUP_RANK=str(rank), ROLE_RANK=str(rank),
            LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", TORCHELASTIC_RUN_ID="none",
        )  # fmt: skip
    # srun with --nodes=2 --ntasks-per-node=1 (the variables docs/scaling.md sets by hand)
    return dict(
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(rank), SLURM_LOCALID="0",
        SLURM_NODEID=str(rank), SLURM_JOB_NAME="klal", SLURM_NODELIST="localhost", SLURM_JOB_ID="4242",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_multi_node_launchers_give_each_process_its_rank(tmp_path, launcher):
    """The documented 2-node commands (``--trainer.devices 1 --trainer.num_nodes 2`` under torchrun or srun): each
    process finds Lightning's cluster environment for its launcher, DDP, world size 2, its own global and node rank
    and the rendezvous address (the data module shards by ``trainer.world_size`` / ``global_rank``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    args = ["--config", str(REPO / "configs/scale/ddp_tiny_cpu.yaml"), "--trainer.devices", "1"]
    args += ["--trainer.num_nodes", "2", "--trainer.default_root_dir", str(tmp_path)]
    expected_env = {"torchrun": "TorchElasticEnvironment", "slurm": "SLURMEnvironment"}[launcher]
    # Lightning's SLURM rule: port 15000 + the last 4 digits of the job id.
    expected_addr, expected_port = {"torchrun": ("127.0.0.1", 29512), "slurm": ("localhost", 15000 + 4242)}[launcher]
    for rank in (0, 1):
        env = dict(base, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **_launcher_env(rank, launcher))
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE"))
        got = json.loads(line[len("PROBE") :])
        assert got == {
            "env": expected_env,
            "strategy": "DDPStrategy",
            "world": 2,
            "rank": rank,
            "node": rank,
            "local": 0,
            "addr": expected_addr,
            "port": expected_port,
        }


# -- GPU ---------------------------------------------------------------------------------------------------------------
SHARDED = {
    # A class path given as a plain string is read as a strategy name; the dict form selects the class.
    "fsdp": '{"class_path": "klal.fsdp.KLALFSDPStrategy"}',
    "deepspeed": '{"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", '
    '"init_args": {"stage": 2, "exclude_frozen_parameters": true}}',
}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", sorted(SHARDED))
def test_sharded_strategy_fit_checkpoint_resume_on_one_gpu(tmp_path, strategy):
    """FSDP / DeepSpeed ZeRO-2 on one GPU: train 2 steps with a checkpoint every step, check the checkpoint holds only
    LoRA weights, continue to 4 steps with ``--ckpt_path last``, and load the final adapter with peft."""
    import importlib.util

    import train

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip('DeepSpeed is not installed (pip install "klal[deepspeed]")')
    data = _write_dataset(tmp_path / "data", _varied_rows(8), _varied_rows(2, 100))

    def run(steps: int, *extra: str):
        args = _train_cmd(tmp_path, data, steps, 2, [])
        args += ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]
        args += ["--trainer.strategy", SHARDED[strategy], "--model.backbone.dtype", "float32"]
        args += ["--trainer.enable_checkpointing", "true", "--trainer.callbacks", CHECKPOINT_EVERY_STEP, *extra]
        return train.main(args)

    def checkpoint_weights(version: int) -> dict[str, torch.Tensor]:
        last = tmp_path / "klal" / f"version_{version}" / "checkpoints" / "last.ckpt"
        if strategy == "fsdp":
            return safe_load(last)["state_dict"]
        # DeepSpeed writes a folder; its module states are keyed like the LightningModule's state dict.
        return torch.load(next(last.rglob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]

    assert run(2).trainer.global_step == 2
    weights = checkpoint_weights(0)
    assert weights and all("lora_" in k for k in weights), sorted(weights)[:5]

    assert run(4, "--ckpt_path", "last").trainer.global_step == 4
    # The resumed run continues its own version folder and metrics.csv (docs/checkpoints.md).
    assert sorted(p.name for p in (tmp_path / "klal").iterdir()) == ["version_0"]
    metrics = tmp_path / "klal" / "version_0" / "metrics.csv"
    steps = [int(r["step"]) for r in csv.DictReader(metrics.read_text().splitlines()) if r.get("train/loss_step")]
    assert steps == [0, 1, 2, 3], "steps 0-1 from the first run, then only the steps after the checkpoint"

    from peft import PeftModel

    from klal.models.loader import ModelConfig, load_model_and_processor

    # The final adapter holds the weights of the final checkpoint (both written after step 4).
    final = {k.removeprefix("model."): v.float() for k, v in checkpoint_weights(0).items()}
    base, _ = load_model_and_processor(ModelConfig(**DEMO_PIXELS))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "klal" / "version_0" / "adapter"))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora.keys() == final.keys()
    for name, p in lora.items():
        assert torch.allclose(p.float(), final[name], atol=1e-6), name


@gpu
@pytest.mark.gpu
def test_flash_attention_used_when_installed():
    if not flash_attention_available():
        pytest.skip("flash-attn is not installed")
    assert resolve_attn_implementation("flash_attention_2") == "flash_attention_2"


# -- bench/throughput.py -----------------------------------------------------------------------------------------------
def test_throughput_flop_count_matches_torch_flop_counter(tiny_processor):
    """The MFU numerator's matmul part against torch's own FLOP counter on one NTP training step."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.throughput import make_rows, step_flops
    from klal.models.loader import ModelConfig
    from klal.models.lora import LoraSettings
    from klal.module import KLALModule

    m = KLALModule(backbone=ModelConfig(**DEMO_PIXELS), lora=LoraSettings(r=4, alpha=8), klal_weight=0.0)
    m.measure_attention = False
    m.configure_model()
    batch = KLALCollator(m.processor)(make_rows(2, 8, 40))
    seq, tokens = batch["input_ids"].shape[1], int(batch["attention_mask"].sum())
    parts = step_flops(m.model, tokens, seq, 2, batch["pixel_values"].shape[0])
    with FlopCounterMode(display=False) as counter:
        m.compute_losses(batch)["loss"].backward()
    # Per operator: the linear layers (matmuls and the patch-embedding convolution) against the estimate's linear
    # part. Attention kernels are left out: torch's counter skipped sdpa on CPU up to 2.13 and counts it from 2.15
    # (562.8 M vs 331.0 M in total), and its attention FLOPs are not the estimate's causal-halved ones. The first
    # layer's q/k/v need no input gradient.
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear_ops = {"aten.mm", "aten.addmm", "aten.bmm", "aten.convolution", "aten.convolution_backward"}
    attention_ops = {op for op in by_op if "attention" in op}
    assert set(by_op) - linear_ops - attention_ops == set(), f"an operator the estimate does not model: {by_op}"
    linear = sum(n for op, n in by_op.items() if op in linear_ops)
    assert by_op["aten.mm"] > 0 and by_op["aten.convolution"] > 0
    assert linear == pytest.approx(parts["text_linear"] + parts["vision_linear"], rel=0.05)


def test_gpu_suite_dry_run_plans_commands_the_benches_accept(capsys, monkeypatch, tmp_path):
    """``python -m bench.gpu_suite --dry_run`` on CPU: the planned bench commands parse with each bench's own current
    CLI into the intended settings (3B and 7B, 1024 visual tokens, bf16, both gradient-checkpointing settings)."""
    import functools
    import importlib

    from bench import gpu_suite

    monkeypatch.setattr(gpu_suite, "missing_packages", lambda: ["datasets", "wandb"])
    steps = gpu_suite.main(["--dry-run", "--wheels", str(tmp_path / "wheels")])
    printed = capsys.readouterr().out
    assert [s.name for s in steps] == [
        "install",
        "gpu tests",
        "attention kernels",
        "step 3b ckpt=false",
        "step 3b ckpt=true",
        "step 7b ckpt=false",
        "step 7b ckpt=true",
        "step 3b 4096 ckpt=true",
        "step 7b 4096 ckpt=true",
        "throughput 3b",
        "throughput 7b",
        "probes 3b",
    ]
    assert all(" ".join(s.argv) in printed for s in steps)
    assert steps[0].argv[1:] == ["-m", "pip", "install", "--no-index", "--find-links", str(tmp_path / "wheels")] + [
        "datasets",
        "wandb",
    ]
    assert steps[1].argv[1:5] == ["-m", "pytest", "-q", "-m"] and steps[1].argv[5] == "gpu"
    seen = []
    assert steps[2].argv[1:4] == ["-m", "pytest", "-q"] and steps[2].argv[4] == "tests/test_kernels.py"
    for step in steps[3:]:
        module = importlib.import_module(step.argv[2])
        original = module.benchmark

        @functools.wraps(original)
        def record(*args, **kwargs):
            seen.append(kwargs or vars(args[0]))

        monkeypatch.setattr(module, "benchmark", record)
        module.main(step.argv[3:])
    for got, arch in zip(seen, ["3b", "3b", "7b", "7b", "3b", "7b", "3b", "7b", "3b"], strict=True):
        assert (got["arch"], got["device"], got["dtype"]) == (arch, "cuda", "bfloat16")
    assert [s["visual_tokens"] for s in seen[:8]] == [1024] * 4 + [4096] * 2 + [1024] * 2
    assert [s["gradient_checkpointing"] for s in seen[:8]] == [False, True, False, True, True, True, "both", "both"]
    assert seen[8]["methods"] == ["attention_probe"]
    # Without --dry_run the missing packages need the wheels folder: one clear line.
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--wheels", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "is not a folder, and datasets, wandb must be installed" in capsys.readouterr().err
