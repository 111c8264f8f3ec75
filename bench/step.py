"""Per-step cost of KLAL: (a) NTP only, (b) NTP + KLAL with klal's attention capture, (c) NTP + KLAL via eager
``output_attentions``, measured side by side in one run on the same model, inputs and LoRA.

Time: median wall time of a forward+backward step. Memory: on CUDA, peak allocated bytes above the model; on CPU,
the bytes of tensors autograd saves for backward (activation memory, the part that attention capture changes), since
CPU allocations have no peak counter.

Run::

    python -m bench.step                                   # tiny model, CPU, ~100 visual tokens, a minute
    python -m bench.step --visual-tokens 256 --steps 5
    python -m bench.step --arch 3b --device cuda --visual-tokens 1024 --dtype bfloat16   # GPU, random 3B weights
    python -m bench.step --family tiny-qwen3-vl            # another family's tiny model (real processor and collator)
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt

from klal.capture import CaptureRequest, register_capture_attention, select_queries
from klal.cli import run as run_command
from klal.data.collate import IGNORE_INDEX
from klal.loss import klal_loss
from klal.models.config import ModelConfig
from klal.models.family import family_of, nest_grids
from klal.models.loader import load_model_and_processor, set_text_attn_implementation
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


def collated_inputs(family_alias: str, batch: int, visual_tokens: int, device) -> dict[str, torch.Tensor]:
    """A batch made by the family's own processor and klal's collator: ``batch`` copies of a noise image whose side
    gives the visual-token count closest to ``visual_tokens`` (the family's grids), question and answer."""
    import numpy as np
    from PIL import Image

    from klal.data.collate import KLALCollator
    from klal.models.loader import load_processor, model_family

    cfg = ModelConfig(family_alias)
    family, processor = model_family(cfg), load_processor(cfg)
    sides = range(28, 449, 4)
    cells = {side: sum(r * c for r, c in family.processor_grids(processor, side, side)) for side in sides}
    side = min(sides, key=lambda x: (abs(cells[x] - visual_tokens), x))
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
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def target_for(inputs, cfg) -> torch.Tensor:
    vis = inputs["visual_mask"]
    v = int(vis.sum(-1).max())
    t = torch.zeros(vis.shape[0], v, device=vis.device)
    t[:, : max(v // 8, 1)] = 1.0 / max(v // 8, 1)
    return t


def step(model, inputs, cfg, mode: str) -> None:
    kw = {k: inputs[k] for k in (*family_of(model).input_keys, "labels") if k in inputs}
    vis = inputs["visual_mask"]
    query = select_queries(inputs["answer_mask"], "last")
    if mode == "ntp":
        loss = model(**kw, use_cache=False).loss
    elif mode == "capture":
        req = CaptureRequest.from_masks(query, vis)
        out = model(**kw, use_cache=False, klal_capture=req)
        res = klal_loss(
            req.stacked(),
            target_for(inputs, cfg),
            torch.ones(vis.shape[0], dtype=torch.bool, device=vis.device),
            req.query_valid,
            req.key_valid,
        )
        req.clear()
        loss = out.loss + res.klal
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
            target_for(inputs, cfg),
            torch.ones(vis.shape[0], dtype=torch.bool, device=vis.device),
            req.query_valid,
            req.key_valid,
        )
        loss = out.loss + res.klal
    loss.backward()
    model.zero_grad(set_to_none=True)


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


def benchmark(
    arch: Literal["tiny", "3b", "7b"] = "tiny",
    family: str = "tiny",
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16"] = "float32",
    visual_tokens: PositiveInt = 100,
    batch: PositiveInt = 2,
    steps: PositiveInt = 5,
    gradient_checkpointing: bool = False,
) -> list[dict]:
    """Per-step time and memory of NTP only, NTP + KLAL with capture, and NTP + KLAL with eager attentions.

    Args:
        arch: tiny model, or random weights at the published Qwen2.5-VL 3B / 7B sizes.
        family: with ``arch`` tiny, which family's tiny model (``tiny`` is Qwen2.5-VL; ``tiny-qwen2-vl``,
            ``tiny-qwen3-vl``, ``tiny-qwen3.5``, ``tiny-llava-onevision``); its inputs come from its own processor
            and klal's collator.
        device: torch device (cpu, cuda, cuda:1, ...).
        dtype: parameter dtype.
        visual_tokens: visual tokens per image, rounded down to a square grid.
        batch: samples per step.
        steps: timed steps per mode (after one warm-up step).
        gradient_checkpointing: non-reentrant gradient checkpointing.

    Returns:
        One ``{"mode", "time_s", "mem_bytes"}`` per mode.
    """
    torch.manual_seed(0)
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    if arch != "tiny" and family != "tiny":
        raise ValueError(f"--arch {arch} builds Qwen2.5-VL at published sizes; --family {family} needs --arch tiny")
    name = register_capture_attention("sdpa")
    if arch == "tiny":
        model, _ = load_model_and_processor(ModelConfig(family, attn_implementation=name, dtype=dtype))
        model = model.to(dev)
    else:
        model = build_tiny_model(tiny_config(**ARCH[arch]), attn_implementation=name, dtype=torch_dtype).to(dev)
    model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0)).train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if arch == "tiny":
        inputs = collated_inputs(family, batch, visual_tokens, dev)
    else:
        grid = max(int(visual_tokens**0.5), 1)
        inputs = build_inputs(model.config, batch, grid, prompt=24, answer=4, device=dev)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    n_visual = int(inputs["visual_mask"][0].sum())
    cuda = dev.type == "cuda"
    results = []
    for mode in ("ntp", "capture", "eager"):
        set_text_attn_implementation(model, "eager" if mode == "eager" else name)
        step(model, inputs, model.config, mode)  # warm-up
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(steps):
            t0 = time.perf_counter()
            step(model, inputs, model.config, mode)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        mem = (
            (torch.cuda.max_memory_allocated() - base)
            if cuda
            else saved_bytes(lambda m=mode: step(model, inputs, model.config, m))
        )
        results.append({"mode": mode, "time_s": statistics.median(times), "mem_bytes": mem})
    t = {r["mode"]: r for r in results}
    kind = "peak allocated above model" if cuda else "saved-for-backward"
    print(
        f"arch={arch} family={family} device={device} dtype={dtype} batch={batch} "
        f"visual_tokens={n_visual} seq={inputs['input_ids'].shape[1]} steps={steps} "
        f"grad_ckpt={gradient_checkpointing}"
    )
    print(f"{'mode':<34}{'step s':>10}{'memory MiB':>14}   ({kind})")
    labels = {"ntp": "(a) NTP only", "capture": "(b) NTP + KLAL, capture", "eager": "(c) NTP + KLAL, eager attentions"}
    for r in results:
        print(f"{labels[r['mode']]:<34}{r['time_s']:>10.4f}{r['mem_bytes'] / 2**20:>14.2f}")
    print(
        f"(b)/(a) time {t['capture']['time_s'] / t['ntp']['time_s']:.3f}   "
        f"(b)/(a) memory {t['capture']['mem_bytes'] / t['ntp']['mem_bytes']:.3f}   "
        f"(c)/(b) memory {t['eager']['mem_bytes'] / t['capture']['mem_bytes']:.3f}   "
        f"(c)/(b) time {t['eager']['time_s'] / t['capture']['time_s']:.3f}"
    )
    return results


if __name__ == "__main__":
    main()
