"""What a user would otherwise run, beside klal, on one model, LoRA and batch: (1) a plain PEFT loop (forward, NTP
loss, backward, AdamW), (2) klal NTP (``KLALModule.compute_losses`` with ``klal_weight 0``, attention measured for the
logs as by default), (3) klal NTP + KLAL, (4) TRL's ``SFTTrainer.training_step`` plus the same AdamW step (skipped
with a note where ``trl`` is not installed: ``pip install klal[peers]``), (5) NTP + KL from eager
``output_attentions``. Step time (median over shuffled rounds) and measured peak tensor memory (:mod:`bench.memory`)
as ratios to the plain loop, without and with gradient checkpointing.

Run::

    python -m bench.peers --visual_tokens 256 --steps 5 --threads 1
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt

from bench.memory import peak_tensor_bytes
from bench.step import collated_inputs, step_loss
from klal.cli import run as run_command
from klal.models.loader import set_text_attn_implementation
from klal.models.lora import LoraSettings
from klal.module import KLALModule

__all__ = ["benchmark", "main"]

ARMS = ("plain", "klal_ntp", "klal_klal", "trl", "eager")
LABELS = {
    "plain": "plain PEFT loop",
    "klal_ntp": "klal NTP (attention measured)",
    "klal_klal": "klal NTP + KLAL",
    "trl": "TRL SFTTrainer",
    "eager": "eager output_attentions + KL",
}


def _trl_step(module: KLALModule, inputs: dict, batch: int) -> tuple[Callable[[], None] | None, str]:
    """TRL's training step on ``module.model``, or None and why not."""
    try:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None, "trl is not installed (pip install klal[peers])"
    kw = {k: inputs[k] for k in (*module.family.input_keys, "labels") if k in inputs}
    try:
        args = SFTConfig(
            output_dir=tempfile.mkdtemp(prefix="klal-peers-"),
            per_device_train_batch_size=batch,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            max_steps=1,
            gradient_checkpointing=False,  # the arms share one model; checkpointing is switched on it directly
        )
        trainer = SFTTrainer(
            model=module.model,
            args=args,
            train_dataset=Dataset.from_list([{"text": "x"}] * batch),  # unused: the collator returns the batch
            data_collator=lambda rows: kw,
            processing_class=module.processor.tokenizer,
        )
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this calls step by step
    except Exception as e:  # a TRL version that will not take this setup: the row says why
        return None, f"TRL's SFTTrainer could not be set up here ({type(e).__name__}: {str(e).splitlines()[0]})"

    def run() -> None:
        trainer.training_step(module.model, dict(kw))
        trainer.optimizer.step()
        module.model.zero_grad(set_to_none=True)

    return run, ""


def benchmark(
    visual_tokens: PositiveInt = 256,
    layers: PositiveInt | None = None,
    batch: PositiveInt = 2,
    steps: PositiveInt = 5,
    gradient_checkpointing: Literal["off", "on", "both"] = "both",
    threads: PositiveInt | None = None,
    seed: int = 0,
) -> list[dict]:
    """Step time and peak memory of the five ways, as ratios to the plain PEFT loop.

    Args:
        visual_tokens: visual tokens per image (tiny Qwen2.5-VL, its own processor and klal's collator).
        layers: language layers of the tiny model (default: the tiny config's).
        batch: samples per step.
        steps: timed rounds; every round runs each arm once, in a shuffled order.
        gradient_checkpointing: off, on, or both (one table each).
        threads: torch threads (one per process keeps a shared machine from oversubscribing).
        seed: seed of the shuffled order.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    inputs, cfg = collated_inputs("tiny", batch, visual_tokens, torch.device("cpu"), layers)
    module = KLALModule(backbone=cfg, lora=LoraSettings(r=16, alpha=32, dropout=0.0))
    module.configure_model()
    capture_name = module.text_config._attn_implementation
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    kw = {k: inputs[k] for k in (*module.family.input_keys, "labels") if k in inputs}

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        module.model.zero_grad(set_to_none=True)

    def plain() -> None:
        finish(module.model(**kw, use_cache=False).loss)

    def klal(weight: float) -> Callable[[], None]:
        def run() -> None:
            module.klal_weight = weight
            finish(module.compute_losses(inputs)["loss"])

        return run

    def eager() -> None:
        set_text_attn_implementation(module.model, "eager")
        try:
            finish(step_loss(module.model, inputs, "eager"))  # NTP + KL of the output_attentions rows
        finally:
            set_text_attn_implementation(module.model, capture_name)

    arms: dict[str, Callable[[], None]] = {
        "plain": plain,
        "klal_ntp": klal(0.0),
        "klal_klal": klal(1.0),
        "eager": eager,
    }
    trl_run, why = _trl_step(module, inputs, batch)
    if trl_run is not None:
        arms["trl"] = trl_run
    rows = []
    settings = {"off": [False], "on": [True], "both": [False, True]}[gradient_checkpointing]
    n_vis, seq = int(inputs["visual_mask"][0].sum()), int(inputs["input_ids"].shape[1])
    n_layers = int(module.text_config.num_hidden_layers)
    for ckpt in settings:
        if ckpt:
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            module.model.enable_input_require_grads()
        else:
            module.model.gradient_checkpointing_disable()
        peaks = {}
        for name, run in arms.items():
            run()  # warm-up
            peaks[name] = peak_tensor_bytes(run)
        times: dict[str, list[float]] = {name: [] for name in arms}
        order = list(arms)
        rng = random.Random(seed)
        for _ in range(steps):
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                arms[name]()
                times[name].append(time.perf_counter() - t0)
        base_t, base_m = statistics.median(times["plain"]), peaks["plain"]
        print(
            f"visual_tokens={n_vis} seq={seq} layers={n_layers} batch={batch} steps={steps} "
            f"grad_ckpt={ckpt} threads={torch.get_num_threads()}"
        )
        print("| way | grad ckpt | step s | x plain time | peak tensor MiB | x plain memory |")
        print("|---|---|---:|---:|---:|---:|")
        for name in ARMS:
            if name not in arms:
                print(f"| {LABELS[name]} | {'on' if ckpt else 'off'} | skipped: {why} | | | |")
                continue
            t = statistics.median(times[name])
            rows.append({"arm": name, "ckpt": ckpt, "time_s": t, "peak_bytes": peaks[name]})
            print(
                f"| {LABELS[name]} | {'on' if ckpt else 'off'} | {t:.4f} | {t / base_t:.3f} | "
                f"{peaks[name] / 2**20:.1f} | {peaks[name] / base_m:.3f} |"
            )
    return rows


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[dict]:
    """``python -m bench.peers [options]``: :func:`benchmark`."""
    return run_command(benchmark, argv, prog or "python -m bench.peers")


if __name__ == "__main__":
    main()
