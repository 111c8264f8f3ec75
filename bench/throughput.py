"""Training throughput of NTP only vs NTP + KLAL: samples/s and tokens/s per device, step time, peak memory, model
FLOPs utilisation (MFU), the data pipeline's rate, and the padding that length grouping removes.

One training step is what :class:`klal.module.KLALModule` runs under Lightning: forward with attention capture (for
NTP + KLAL), KLAL on the captured maps, backward, AdamW on the LoRA weights. Batches are built in memory by the real
collator (processor, chat template, target maps), so no ``datasets`` is needed. The 3B/7B rows use random weights at
the published Qwen2.5-VL architectures (``bench/step.py`` ``ARCH``) with the published vocabulary size.

MFU counts the FLOPs a LoRA step needs, divided by step time and by the device's peak: forward of every linear
layer (``2 x params x tokens``) and of attention (causal: ``2 x S^2 x hidden`` per layer); backward of the frozen
language model computes input gradients only (``2 x params x tokens``, attention ``2x`` its forward); LoRA weights
also get weight gradients; the frozen vision tower runs forward only. Gradient-checkpoint recomputation is not
counted (it is overhead, not model FLOPs). The peak is measured at start-up (large bf16 matmuls on GPU, float32 on
CPU) unless ``--peak-tflops`` is given.

Run::

    python -m bench.throughput                                                       # tiny model, CPU
    python -m bench.throughput --arch 7b --device cuda --dtype bfloat16 --visual-tokens 1024 --seq 1536 \\
        --batch 4 --gradient-checkpointing both                                      # one GPU, random 7B weights
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image

from bench.step import ARCH, saved_bytes
from klal.cli import run as run_command
from klal.data.collate import KLALCollator
from klal.data.sampler import (
    LengthGroupedSampler,
    TokenBudgetBatchSampler,
    estimate_lengths,
    padding_fraction,
)
from klal.geometry import DEFAULT_MIN_PIXELS
from klal.models.loader import ModelConfig
from klal.models.lora import LoraSettings
from klal.models.qwen2_5_vl.tiny import build_tiny_processor
from klal.models.qwen2_vl.geometry import TOKEN_PX
from klal.module import KLALModule

# Published vocabulary sizes (lm_head and the loss over it are a real part of the step's cost).
VOCAB = {"3b": 151936, "7b": 152064}
WORDS = [
    *("where", "is", "the", "small", "red", "star", "among", "the", "cells", "of", "this", "grid"),
    *("and", "which", "row", "and", "column", "holds", "it"),
]


# -- batches -----------------------------------------------------------------------------------------------------------
def make_rows(n: int, grid: int, question_words: int, seed: int = 0) -> list[dict]:
    """Schema rows with a ``grid*28`` px square noise image (``grid^2`` visual tokens) and an evidence box."""
    rng = np.random.default_rng(seed)
    side = grid * TOKEN_PX
    rows = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
        question = " ".join(WORDS[j % len(WORDS)] for j in range(question_words)) + "?"
        box = [side * 0.25, side * 0.25, side * 0.5, side * 0.5]
        rows.append(
            {
                "id": f"bench-{i}",
                "task": "bench",
                "image": img,
                "question": question,
                "answer": f"({1 + i % 9}, {2 + i % 7})",
                "width": side,
                "height": side,
                "evidence": {"boxes": [box], "points": [], "polylines": []},
                "meta": "{}",
            }
        )
    return rows


def question_words_for(seq: int, grid: int, processor) -> int:
    """Question length (in words) that brings a sample to about ``seq`` tokens."""
    base = estimate_lengths(make_rows(1, grid, 1), processor)[0]
    per_word = estimate_lengths(make_rows(1, grid, 101), processor)[0] - base
    return max(1, 1 + round((seq - base) * 100 / max(per_word, 1)))


# -- FLOPs -------------------------------------------------------------------------------------------------------------
def step_flops(model: torch.nn.Module, tokens: int, seq: int, batch: int, patches: int) -> dict[str, float]:
    """Model FLOPs of one LoRA training step by part (see the module docstring); ``total`` sums them.

    Args:
        model: the (peft-wrapped) Qwen2.5-VL.
        tokens: real tokens of the batch (image tokens included).
        seq: padded sequence length.
        batch: samples in the batch (one image each).
        patches: vision patches of the batch (``pixel_values`` rows).
    """
    cfg = model.config
    text, vis = cfg.text_config, cfg.vision_config
    frozen_text = lora = vision = merger = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d)):
            continue
        n = mod.weight.numel()
        if "lora_" in name:
            lora += n
        elif ".visual." in f".{name}":
            if ".merger." in name:
                merger += n
            else:
                vision += n
        else:
            frozen_text += n
    attn_fwd = 2.0 * seq * seq * text.hidden_size * text.num_hidden_layers * batch  # causal QK^T and AV
    # Vision tower, forward only: window attention (112 px windows) except in the full-attention blocks.
    window = (vis.window_size // vis.patch_size) ** 2
    full = len(vis.fullatt_block_indexes)
    per_image = patches // batch
    keys_per_patch = full * per_image + (vis.depth - full) * min(window, per_image)  # summed over blocks
    parts = {
        "text_linear": 4.0 * frozen_text * tokens + 6.0 * lora * tokens,
        "text_attention": 3.0 * attn_fwd,
        "vision_linear": 2.0 * vision * patches + 2.0 * merger * patches / vis.spatial_merge_size**2,
        "vision_attention": 4.0 * vis.hidden_size * patches * keys_per_patch,
    }
    parts["total"] = sum(parts.values())
    return parts


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Sustained matmul throughput of this device (TFLOP/s) on large square matrices."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def cpu_name() -> str:
    """The CPU model as the OS reports it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- model and step ----------------------------------------------------------------------------------------------------
def build_module(args: ThroughputOptions, grad_ckpt: bool, max_pixels: int) -> KLALModule:
    backbone = ModelConfig(
        name_or_path="tiny",
        dtype=args.dtype,
        min_pixels=DEFAULT_MIN_PIXELS,
        max_pixels=max_pixels,
        tiny_overrides=dict(ARCH[args.arch]) if args.arch in ARCH else None,
        attn_implementation=args.attn,
    )
    module = KLALModule(
        backbone=backbone,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, targets="attention"),
        gradient_checkpointing=grad_ckpt,
    )
    device = torch.device(args.device)
    with device:  # initialise the random weights on the device (a 7B model initialises slowly on CPU)
        module.configure_model()
    if args.arch in VOCAB:
        base = module.model.get_base_model()
        base.resize_token_embeddings(VOCAB[args.arch], mean_resizing=False)
        for p in (*base.get_input_embeddings().parameters(), *base.get_output_embeddings().parameters()):
            p.requires_grad_(False)
    return module.to(device)


def move(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            out[k] = v.to(dtype) if k == "pixel_values" else v
        else:
            out[k] = v
    return out


def run_modes(module: KLALModule, batch: dict, args: ThroughputOptions, device: torch.device) -> dict[str, dict]:
    """Time training steps of NTP only and NTP + KLAL on the same model and batch.

    The two modes alternate step by step, so a change in machine load hits both alike (their ratio is the figure of
    interest); peak memory is tracked per mode.
    """
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    cuda = device.type == "cuda"

    def step(mode: str) -> None:
        module.klal_weight = 1.0 if mode == "klal" else 0.0
        # NTP only must not pay for attention capture.
        module.measure_attention = mode == "klal"
        with autocast:
            loss = module.compute_losses(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    modes = ("ntp", "klal")
    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    peak: dict[str, int] = dict.fromkeys(modes, 0)
    for _ in range(args.steps):
        for mode in modes:
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step(mode)
            _sync(device)
            times[mode].append(time.perf_counter() - t0)
            if cuda:
                peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated(device))
    out = {}
    for mode in modes:
        mem = peak[mode] if cuda else saved_bytes(lambda m=mode: step(m))
        out[mode] = {"time_s": statistics.median(times[mode]), "mem_bytes": int(mem)}
    return out


# -- padding -----------------------------------------------------------------------------------------------------------
def padding_report(n: int = 2000, batch: int = 8, seed: int = 0) -> dict[str, float]:
    """Padding share of random batches vs length-grouped vs token-budget batches, for images of random size resized
    to at most 1024 visual tokens (a typical real-run max_pixels)."""
    processor = build_tiny_processor(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=1024 * TOKEN_PX * TOKEN_PX)
    rng = np.random.default_rng(seed)
    rows = [
        {
            "width": int(rng.integers(200, 1400)),
            "height": int(rng.integers(200, 1400)),
            "question": " ".join(WORDS[: int(rng.integers(5, 40))]),
            "answer": "(3, 4)",
        }
        for _ in range(n)
    ]
    lengths = estimate_lengths(rows, processor)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    plain = [order[i : i + batch] for i in range(0, n, batch)]
    grouped = LengthGroupedSampler(lengths, batch, seed=seed).global_batches()
    budget = int(np.mean(lengths) * batch)
    by_budget = list(TokenBudgetBatchSampler(lengths, max(budget, max(lengths)), seed=seed))
    return {
        "random": padding_fraction(plain, lengths),
        "group_by_length": padding_fraction(grouped, lengths),
        "token_budget": padding_fraction(by_budget, lengths),
        "mean_length": float(np.mean(lengths)),
        "budget": float(max(budget, max(lengths))),
    }


@dataclass
class ThroughputOptions:
    """Training throughput of NTP only vs NTP + KLAL (see the module docstring)."""

    arch: Literal["tiny", "3b", "7b"] = "tiny"
    """The tiny model, or random weights at the published Qwen2.5-VL 3B / 7B sizes."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, ...)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype (bfloat16 also runs the step under autocast)."""
    attn: str = "sdpa"
    """Text attention kernel (flash_attention_2 falls back to sdpa)."""
    visual_tokens: PositiveInt = 256
    """Visual tokens per image, rounded down to a square grid."""
    seq: PositiveInt = 400
    """Target tokens per sample (image + text)."""
    batch: PositiveInt = 4
    """Samples per step."""
    steps: PositiveInt = 5
    """Timed steps per mode."""
    warmup: NonNegativeInt = 2
    """Untimed steps per mode first."""
    gradient_checkpointing: Literal["off", "on", "both"] = "off"
    """Gradient checkpointing off, on, or both one after the other."""
    peak_tflops: float | None = None
    """Device peak for MFU in TFLOP/s (default: measured with large matmuls)."""
    json: str | None = None
    """Also write the results to this file."""
    threads: PositiveInt | None = None
    """CPU threads (1 is steadier on a shared machine: no OpenMP spinning)."""


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict:
    """``python -m bench.throughput [options]``: :func:`benchmark`."""
    return benchmark(run_command(ThroughputOptions, argv, prog or "python -m bench.throughput"))


def benchmark(args: ThroughputOptions) -> dict:
    """Measure, print the table and return the results (also written to ``args.json`` when given)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    grid = max(int(math.isqrt(args.visual_tokens)), 1)
    max_pixels = grid * grid * TOKEN_PX * TOKEN_PX

    # Data: collate one batch in this process (a DataLoader worker does the same work).
    probe = KLALModule(backbone=ModelConfig(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=max_pixels))
    processor = probe.processor
    rows = make_rows(args.batch, grid, question_words_for(args.seq, grid, processor))
    collator = KLALCollator(processor)
    collator(rows)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        batch_cpu = collator(rows)
    collate_s = (time.perf_counter() - t0) / reps
    seq = int(batch_cpu["input_ids"].shape[1])
    text_tokens = int(batch_cpu["attention_mask"].sum())
    patches = int(batch_cpu["pixel_values"].shape[0])
    batch = move(batch_cpu, device, dtype)

    peak = args.peak_tflops or measure_peak_tflops(device, dtype if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} CPU ({torch.get_num_threads()} threads of {os.cpu_count()} cores)"
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    results = []
    for gc in settings:
        module = build_module(args, gc, max_pixels)
        flops = step_flops(module.model, text_tokens, seq, args.batch, patches)["total"]
        for mode, r in run_modes(module, batch, args, device).items():
            r.update(
                mode=mode,
                grad_ckpt=gc,
                samples_per_s=args.batch / r["time_s"],
                tokens_per_s=text_tokens / r["time_s"],
                mfu=flops / r["time_s"] / (peak * 1e12),
            )
            results.append(r)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()

    kind = "peak allocated (incl. model)" if device.type == "cuda" else "saved-for-backward"
    print(
        f"device={name} arch={args.arch} dtype={args.dtype} attn={args.attn} batch={args.batch} "
        f"visual_tokens={grid * grid} seq={seq} tokens/batch={text_tokens} steps={args.steps} "
        f"peak={peak:.3g} TFLOP/s ({'given' if args.peak_tflops else 'measured matmul'})"
    )
    print(
        f"collate: {collate_s * 1e3:.1f} ms/batch in one process = {args.batch / collate_s:.1f} samples/s per "
        "DataLoader worker"
    )
    head = f"{'mode':<14}{'grad ckpt':>10}{'step s':>10}{'samples/s':>11}{'tokens/s':>11}{'MiB':>10}{'MFU':>8}"
    print(f"{head}   ({kind})")
    for r in results:
        print(
            f"{'NTP' if r['mode'] == 'ntp' else 'NTP + KLAL':<14}{str(r['grad_ckpt']):>10}{r['time_s']:>10.4f}"
            f"{r['samples_per_s']:>11.2f}{r['tokens_per_s']:>11.0f}{r['mem_bytes'] / 2**20:>10.1f}{r['mfu']:>8.1%}"
        )
    for gc in settings:
        t = {r["mode"]: r for r in results if r["grad_ckpt"] == gc}
        need = math.ceil(t["ntp"]["samples_per_s"] / (args.batch / collate_s))
        print(
            f"grad_ckpt={gc}: (NTP+KLAL)/NTP step time {t['klal']['time_s'] / t['ntp']['time_s']:.3f}; "
            f"DataLoader workers needed to keep up with NTP: {need}"
        )
    pad = padding_report()
    print(
        f"padding share, {2000} samples of random image size (mean {pad['mean_length']:.0f} tokens), batch 8: "
        f"random {pad['random']:.1%}, group_by_length {pad['group_by_length']:.1%}, "
        f"token_budget={pad['budget']:.0f} {pad['token_budget']:.1%}"
    )
    out = {
        "device": name,
        "args": dataclasses.asdict(args),
        "seq": seq,
        "tokens_per_batch": text_tokens,
        "peak_tflops": peak,
        "collate_s": collate_s,
        "results": results,
        "padding": pad,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
