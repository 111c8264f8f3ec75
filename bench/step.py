"""Per-step cost of KLAL: (a) NTP only, (m) NTP with the attention measured for the logs (``klal_weight 0``, the
default), (b) NTP + KLAL with klal's attention capture, (c) NTP + KLAL via eager ``output_attentions``, measured side
by side in one run on the same model, inputs and LoRA.

Time: median wall time of a forward+backward step; the modes take turns in a shuffled order in every round, so a
change of load hits them alike. Memory, three measured figures per mode: peak tensor bytes alive above the model
(CUDA: ``max_memory_allocated``; CPU: the profiler's allocation events, :mod:`bench.memory`), the process RSS
high-water mark above its level before the step (CPU, Linux), and the bytes autograd saves for backward.

Run::

    python -m bench.step                                   # tiny model, CPU, ~100 visual tokens, a minute
    python -m bench.step --visual_tokens 1024 --layers 28 --gradient_checkpointing true --modes ntp,measure,capture
    python -m bench.step --arch 3b --device cuda --visual_tokens 1024 --dtype bfloat16   # GPU, random 3B weights
    python -m bench.step --family tiny-qwen3-vl            # another family's tiny model (real processor and collator)
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt

from bench.memory import peak_rss_bytes, peak_tensor_bytes
from klal.capture import CaptureRequest, register_capture_attention, select_queries
from klal.cli import run as run_command
from klal.data.collate import IGNORE_INDEX
from klal.geometry import DEFAULT_MAX_PIXELS
from klal.loss import klal_loss
from klal.models.config import ModelConfig
from klal.models.family import TINY_ALIASES, family_of, nest_grids
from klal.models.loader import load_model_and_processor, set_text_attn_implementation, text_config
from klal.models.lora import LoraSettings, apply_lora
from klal.models.qwen2_5_vl.tiny import build_tiny_model, tiny_config

ARCH = {
    # Published Qwen2.5-VL sizes; weights are random (no checkpoint can be downloaded here).
    "3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vision_depth=32,
        vision_hidden_size=1280,
        vision_num_heads=16,
        vision_intermediate_size=3420,
        vision_fullatt_block_indexes=[7, 15, 23, 31],
    ),
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vision_depth=32,
        vision_hidden_size=1280,
        vision_num_heads=16,
        vision_intermediate_size=3420,
        vision_fullatt_block_indexes=[7, 15, 23, 31],
    ),
}


def build_inputs(cfg, batch: int, grid: int, prompt: int, answer: int, device) -> dict[str, torch.Tensor]:
    """Synthetic batch: text, one image of ``grid x grid`` visual tokens, question, answer (labels on the answer)."""
    n_vis = grid * grid
    ids = [11] * prompt + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_vis + [cfg.vision_end_token_id]
    ids += [12] * prompt + [13] * answer
    input_ids = torch.tensor([ids] * batch, device=device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer:] = input_ids[:, -answer:]
    answer_mask = labels != IGNORE_INDEX
    patches = n_vis * 4
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "mm_token_type_ids": (input_ids == cfg.image_token_id).long(),
        "pixel_values": torch.randn(batch * patches, 3 * 2 * 14 * 14, device=device),
        "image_grid_thw": torch.tensor([[1, grid * 2, grid * 2]] * batch, device=device),
        "answer_mask": answer_mask,
        "visual_mask": input_ids == cfg.image_token_id,
    }


def collated_inputs(
    family_alias: str, batch: int, visual_tokens: int, device, layers: int | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A batch made by the family's own processor and klal's collator: ``batch`` copies of a noise image whose side
    gives the visual-token count closest to ``visual_tokens`` (the family's grids), question and answer; and the model
    config whose pixel budget admits it.

    Raises:
        ValueError: the family cannot reach ``visual_tokens`` within 10% (its tiling caps it): names the maximum.
    """
    import numpy as np
    from PIL import Image

    from klal.data.collate import KLALCollator
    from klal.models.loader import load_processor, model_family

    # Budget for the largest cell any family has (32 px: 16-px patches merged 2 x 2), with room to round.
    max_pixels = max(DEFAULT_MAX_PIXELS, int(visual_tokens * 32 * 32 * 1.25))
    overrides = {"num_hidden_layers": layers} if layers else None
    cfg = ModelConfig(family_alias, max_pixels=max_pixels, tiny_overrides=overrides)
    family, processor = model_family(cfg), load_processor(cfg)
    sides = range(28, math.isqrt(max_pixels) + 5, 4)
    cells = {side: sum(r * c for r, c in family.processor_grids(processor, side, side)) for side in sides}
    side = min(sides, key=lambda x: (abs(cells[x] - visual_tokens), x))
    if abs(cells[side] - visual_tokens) > 0.1 * visual_tokens:
        raise ValueError(
            f"--visual_tokens {visual_tokens}: {family_alias} reaches at most {max(cells.values())} visual tokens per "
            f"square image (closest: {cells[side]} at {side} px)"
        )
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    row = {
        "id": "bench",
        "image": img,
        "question": " ".join(["where is the red star among the cells of this grid"] * 3) + "?",
        "answer": "(1, 2)",
        "evidence": {"boxes": [[0, 0, side / 4, side / 4]], "points": [], "polylines": []},
    }
    out = KLALCollator(processor)([dict(row, id=f"bench-{i}") for i in range(batch)])
    out["visual_mask"] = family.visual_token_mask(
        out["input_ids"], processor.image_token_id, nest_grids(out["grids"], out["grid_image"])
    )
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}, cfg


def target_for(inputs) -> torch.Tensor:
    vis = inputs["visual_mask"]
    v = int(vis.sum(-1).max())
    t = torch.zeros(vis.shape[0], v, device=vis.device)
    t[:, : max(v // 8, 1)] = 1.0 / max(v // 8, 1)
    return t


def step(model, inputs, cfg, mode: str) -> None:
    """One forward + backward of ``mode`` (gradients dropped after)."""
    step_loss(model, inputs, mode).backward()
    model.zero_grad(set_to_none=True)


def step_loss(model, inputs, mode: str) -> torch.Tensor:
    """The loss of one forward pass of ``mode`` (``ntp``, ``measure``, ``capture``, ``eager``); the text backbone
    must already run the capture attention (``eager``: eager attention)."""
    kw = {k: inputs[k] for k in (*family_of(model).input_keys, "labels") if k in inputs}
    vis = inputs["visual_mask"]
    query = select_queries(inputs["answer_mask"], "last")
    if mode == "ntp":
        loss = model(**kw, use_cache=False).loss
    elif mode == "measure":  # klal_weight 0 with measure_attention_when_unweighted (KLALModule's default)
        req = CaptureRequest.from_masks(query, vis)
        req.needs_grad = False
        out = model(**kw, use_cache=False, klal_capture=req)
        req.stacked()
        req.clear()
        loss = out.loss
        del out  # as in NTP mode: the logits are not held through backward
    elif mode == "capture":
        req = CaptureRequest.from_masks(query, vis)
        req.needs_grad = True
        out = model(**kw, use_cache=False, klal_capture=req)
        res = klal_loss(
            req.stacked(),
            target_for(inputs),
            torch.ones(vis.shape[0], dtype=torch.bool, device=vis.device),
            req.query_valid,
            req.key_valid,
        )
        req.clear()
        loss = out.loss + res.klal
        del out
    else:  # eager output_attentions
        req = CaptureRequest.from_masks(query, vis)
        out = model(**kw, use_cache=False, output_attentions=True)
        maps = []
        for att in (a for a in out.attentions if a is not None):  # (B, H, S, S); hybrid models: attention layers
            b_idx = torch.arange(att.shape[0], device=att.device)[:, None]
            rows = att.permute(0, 2, 3, 1)[b_idx, req.query_index]  # (B, A, S, H)
            rows = rows[
                b_idx[:, :, None],
                torch.arange(rows.shape[1], device=att.device)[None, :, None],
                req.key_index[:, None, :],
            ]  # (B, A, V, H)
            rows = rows.float() / rows.float().sum(2, keepdim=True)
            maps.append(torch.log(rows.mean(-1).clamp_min(1e-30)))
        res = klal_loss(
            torch.stack(maps),
            target_for(inputs),
            torch.ones(vis.shape[0], dtype=torch.bool, device=vis.device),
            req.query_valid,
            req.key_valid,
        )
        loss = out.loss + res.klal
        del out, maps
    return loss


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves during ``fn`` (deduplicated by storage)."""
    seen: dict[int, int] = {}

    def pack(t):
        # Tensors without a real storage (e.g. wrapper subclasses) have no bytes of their own to count.
        with contextlib.suppress(RuntimeError, NotImplementedError):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[dict]:
    """``python -m bench.step [options]``: :func:`benchmark`."""
    return run_command(benchmark, argv, prog or "python -m bench.step")


MODES = ("ntp", "measure", "capture", "eager")
LABELS = {
    "ntp": "(a) NTP only",
    "measure": "(m) NTP, attention measured",
    "capture": "(b) NTP + KLAL, capture",
    "eager": "(c) NTP + KLAL, eager attentions",
}


def benchmark(
    arch: Literal["tiny", "3b", "7b"] = "tiny",
    family: str = "tiny",
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16"] = "float32",
    visual_tokens: PositiveInt = 100,
    batch: PositiveInt = 2,
    steps: PositiveInt = 5,
    layers: PositiveInt | None = None,
    gradient_checkpointing: bool = False,
    modes: list[str] | str = "ntp,measure,capture,eager",
    threads: PositiveInt | None = None,
    seed: int = 0,
) -> list[dict]:
    """Per-step time and memory of NTP only, NTP with attention measured, NTP + KLAL with capture, and NTP + KLAL
    with eager attentions.

    Args:
        arch: tiny model, or random weights at the published Qwen2.5-VL 3B / 7B sizes.
        family: with ``arch`` tiny, which family's tiny model (a tiny alias of :data:`klal.models.family.TINY_ALIASES`;
            ``tiny`` is Qwen2.5-VL); its inputs come from its own processor and klal's collator.
        device: torch device (cpu, cuda, cuda:1, ...).
        dtype: parameter dtype.
        visual_tokens: visual tokens per image; the tiny families' image side and pixel budget are chosen to reach it
            (refused, naming the family's maximum, when it cannot be reached within 10%); at 3B / 7B a square grid.
        batch: samples per step.
        steps: timed steps per mode (after one warm-up step each), in shuffled rounds.
        layers: language layers of the tiny model (e.g. 28 or 36: the real depth at tiny width); default: the tiny
            config's. The 3B / 7B architectures always have their published depth.
        gradient_checkpointing: non-reentrant gradient checkpointing.
        modes: which of ``ntp``, ``measure``, ``capture``, ``eager`` to run (comma-separated); eager materialises
            ``(B, H, S, S)`` per layer, too much at thousands of tokens and dozens of layers on a small machine.
        threads: torch threads (default: torch's); one thread per process keeps a shared machine from
            oversubscribing.
        seed: seed of the shuffled order.

    Returns:
        One dict per mode: ``mode``, ``time_s``, ``peak_bytes``, ``rss_bytes`` (None on CUDA), ``saved_bytes``,
        ``visual_tokens``, ``seq``, ``layers``.
    """
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    chosen = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    bad = [m for m in chosen if m not in MODES]
    if bad or not chosen:
        raise ValueError(f"--modes {modes!r}: choose from {', '.join(MODES)}")
    if arch == "tiny" and family not in TINY_ALIASES:
        raise ValueError(f"--family {family!r}: choose a tiny model, one of {', '.join(TINY_ALIASES)}")
    if arch != "tiny" and family != "tiny":
        raise ValueError(f"--arch {arch} builds Qwen2.5-VL at published sizes; --family {family} needs --arch tiny")
    if arch != "tiny" and layers:
        raise ValueError(f"--layers applies to the tiny models; --arch {arch} has its published depth")
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    name = register_capture_attention("sdpa")
    if arch == "tiny":
        inputs, cfg = collated_inputs(family, batch, visual_tokens, dev, layers)
        cfg.attn_implementation, cfg.dtype = name, dtype
        model, _ = load_model_and_processor(cfg)
        model = model.to(dev)
    else:
        model = build_tiny_model(tiny_config(**ARCH[arch]), attn_implementation=name, dtype=torch_dtype).to(dev)
    model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0)).train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if arch != "tiny":
        grid = max(int(visual_tokens**0.5), 1)
        inputs = build_inputs(model.config, batch, grid, prompt=24, answer=4, device=dev)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    n_visual = int(inputs["visual_mask"][0].sum())
    seq = int(inputs["input_ids"].shape[1])
    n_layers = int(text_config(model).num_hidden_layers)
    cuda = dev.type == "cuda"

    def run(mode: str) -> None:
        set_text_attn_implementation(model, "eager" if mode == "eager" else name)
        step(model, inputs, model.config, mode)
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {m: [] for m in chosen}
    memory: dict[str, tuple[int, int | None, int]] = {}
    for mode in chosen:
        run(mode)  # warm-up
        memory[mode] = (
            peak_tensor_bytes(lambda m=mode: run(m), dev),
            None if cuda else peak_rss_bytes(lambda m=mode: run(m)),
            saved_bytes(lambda m=mode: run(m)),
        )
    order = list(chosen)
    rng = random.Random(seed)
    for _ in range(steps):
        rng.shuffle(order)
        for mode in order:
            t0 = time.perf_counter()
            run(mode)
            times[mode].append(time.perf_counter() - t0)
    results = [
        {
            "mode": m,
            "time_s": statistics.median(times[m]),
            "peak_bytes": memory[m][0],
            "rss_bytes": memory[m][1],
            "saved_bytes": memory[m][2],
            "visual_tokens": n_visual,
            "seq": seq,
            "layers": n_layers,
        }
        for m in chosen
    ]
    print(
        f"arch={arch} family={family} device={device} dtype={dtype} batch={batch} visual_tokens={n_visual} seq={seq} "
        f"layers={n_layers} steps={steps} grad_ckpt={gradient_checkpointing} threads={torch.get_num_threads()}"
    )
    peak_kind = "peak allocated" if cuda else "peak tensor"
    print(f"| mode | visual tokens | seq | layers | step s | {peak_kind} MiB | peak RSS MiB | saved for backward MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rss = "n/a" if r["rss_bytes"] is None else f"{r['rss_bytes'] / 2**20:.1f}"
        print(
            f"| {LABELS[r['mode']]} | {n_visual} | {seq} | {n_layers} | {r['time_s']:.4f} | "
            f"{r['peak_bytes'] / 2**20:.1f} | {rss} | {r['saved_bytes'] / 2**20:.1f} |"
        )
    t = {r["mode"]: r for r in results}
    if "ntp" in t:
        ratios = []
        for m in ("measure", "capture", "eager"):
            if m in t:
                a, b = t[m], t["ntp"]
                rss = "" if a["rss_bytes"] is None else f", RSS {a['rss_bytes'] / max(b['rss_bytes'], 1):.3f}"
                ratios.append(
                    f"{m}/ntp: time {a['time_s'] / b['time_s']:.3f}, peak {a['peak_bytes'] / b['peak_bytes']:.3f}"
                    f"{rss}, saved {a['saved_bytes'] / b['saved_bytes']:.3f}"
                )
        print("ratios: " + "; ".join(ratios))
    return results


if __name__ == "__main__":
    main()
