"""Pretrain a small Qwen2.5-VL from random weights on the synthetic curriculum, and write it with its model card.

The model is the embedded tiny Qwen2.5-VL (:mod:`klal.models.qwen2_5_vl.tiny`: the real transformers classes, sized by
``model.tiny_overrides``), trained in full (every parameter, vision tower included) with next-token loss on the
answers, by a plain deterministic loop: the data (:mod:`studies.pretrain.curriculum`, written by the project's dataset
writer), the initial weights (``model.init_seed``), the sampler and the optimizer are all seeded, so the same
config on the same machine and thread count gives the same weights bit for bit.

Written to ``out`` (a folder ``load_model_and_processor`` and ``--model.name_or_path`` read offline):
``model.safetensors`` + ``config.json`` (transformers), the processor files (as :func:`klal.export.export` writes
them), ``README.md`` (the model card: data, steps, loss curve, held-out accuracy per skill beside chance, the most
frequent answer and the question-only baseline, what it can and cannot do), ``loss_curve.png`` and
``pretrain.json`` (every number).

Run from the repository root::

    python -m studies.pretrain --config configs/pretrain/tiny_base.yaml
    python -m studies.pretrain --config configs/pretrain/tiny_base.yaml --train.steps 20 --out runs/pretrain/quick
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import PositiveInt

from studies.pretrain.curriculum import CurriculumConfig, CurriculumTask, heldout_question

MAX_MB = 30.0
"""Largest model.safetensors the recipe writes (the weights are committed to the repository)."""


@dataclass
class CurriculumData:
    """The curriculum dataset."""

    num: int = 24000
    """Samples in all splits."""
    splits: tuple[float, float, float] = (0.95, 0.01, 0.04)
    """train / validation (the learning curve) / test (the held-out accuracy of the card) fractions."""
    seed: int = 0
    """Dataset seed."""
    folder: str = "data/pretrain/curriculum"
    """Where the dataset is written (reused when it is there with the same settings)."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """The generator's settings (skills, shapes, colours, sizes)."""
    answer_render: Literal["as_generated", "leading_space", "fewest_tokens"] = "fewest_tokens"
    """How answers are written (as in the study configs): ``fewest_tokens`` gives " blue" (one token) for "blue"."""


@dataclass
class BaseModel:
    """The model that is pretrained."""

    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    """Size of the tiny Qwen2.5-VL (:func:`klal.models.qwen2_5_vl.tiny.tiny_config` keyword overrides)."""
    init_seed: int = 0
    """Seed of the random initial weights."""


@dataclass
class Schedule:
    """Full fine-tuning: AdamW over every parameter, gradient clipping, linear warmup, cosine decay to
    ``min_lr_ratio``."""

    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 16
    """Samples per step."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    loss: Literal["per_sample", "per_token"] = "per_sample"
    """``per_sample``: each sample's mean next-token loss over its answer tokens, averaged over the batch, so every
    skill weighs the same whatever its answer length; ``per_token``: the mean over all answer tokens of the batch (the
    transformers default), where the long captions outweigh the one-word answers several times over."""
    grad_clip: float | None = 1.0
    """Largest global gradient norm (None: no clipping); a model trained from random weights spikes without it."""
    first_skills: list[str] = field(default_factory=list)
    """Skills of a first phase (empty: none): the first ``first_steps`` steps train on a curriculum of these skills
    only (its own dataset, ``<data.folder>_first``), then the rest on every skill. A model trained from random weights
    on the whole mix learns the answers' language prior and stays blind (measured: validation colour and shape at
    chance after 1000 steps); one-object colour and shape questions teach it to look first."""
    first_steps: int = 0
    """Steps of the first phase."""
    seed: int = 0
    """Seed of the data order."""
    eval_every: int = 250
    """Steps between the learning curve's held-out points (validation split); step 0 and the last step always."""
    eval_samples: int = 240
    """Validation samples of each learning-curve point."""
    eval_batch_size: int = 32
    """Batch size of every evaluation."""
    flat_skill: str | None = None
    """Skill whose validation accuracy is watched for a flat learning curve (None: the run always takes ``steps``)."""
    flat_after_minutes: float = 60.0
    """Minutes of the training loop (wall clock, ``threads`` torch threads) after which the run ends at the first
    learning-curve point where ``flat_skill`` has risen by less than ``flat_gain`` over the last ``flat_points``
    points. The weights then depend on the machine's speed; the record gives the step it stopped at."""
    flat_gain: float = 0.05
    """Least rise of ``flat_skill``'s validation accuracy that counts as not flat."""
    flat_points: int = 2
    """Learning-curve points the rise is measured over."""


def is_flat(curve: list[dict[str, Any]], skill: str, points: int, gain: float) -> bool:
    """Whether ``skill``'s accuracy at the last learning-curve point is less than ``gain`` above its value ``points``
    points earlier (False while the curve is shorter than that, or the validation items lack the skill)."""
    if len(curve) <= points or skill not in curve[-1] or skill not in curve[-1 - points]:
        return False
    return curve[-1][skill] - curve[-1 - points][skill] < gain


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (answer) positions, per token or per sample (``Schedule.loss``).

    Args:
        logits: ``(B, T, V)`` model outputs.
        labels: ``(B, T)`` token ids, ``IGNORE_INDEX`` off the answers.
        mode: ``per_token`` or ``per_sample``.
    """
    from klal.data.collate import IGNORE_INDEX

    target = labels[:, 1:]  # (B, T-1): position t predicts token t + 1
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1), zero off the answers
    mask = (target != IGNORE_INDEX).float()
    if mode == "per_token":
        return nll.sum() / mask.sum().clamp_min(1)
    per_sample = nll.sum(1) / mask.sum(1).clamp_min(1)  # (B,)
    return per_sample[mask.sum(1) > 0].mean()


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier of optimizer step ``step``: ``(step + 1) / (warmup + 1)`` during warmup, then a
    cosine from 1 down to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_curriculum(data: CurriculumData, workers: int, tokenizer: Any) -> Path:
    """Generate the curriculum dataset unless it is on disk with these settings; returns its folder.

    Raises:
        ValueError: the folder holds a dataset made with other settings.
    """
    from data_gen.writer import generate_dataset, read_manifest
    from studies.reproduce.pipeline import render_dataset_answers

    path = Path(data.folder)
    task = CurriculumTask(data.curriculum)
    want = {"seed": data.seed, "num": data.num, "config": json.loads(json.dumps(dataclasses.asdict(task.config)))}
    want["answer_render"] = data.answer_render
    if not (path / "dataset_dict.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        generate_dataset(task, num=data.num, seed=data.seed, out=path, workers=workers, splits=data.splits)
        if data.answer_render != "as_generated":
            render_dataset_answers(path, data.answer_render, tokenizer)
    got = read_manifest(path)
    got["answer_render"] = got.get("answer_render", "as_generated")
    bad = [k for k, v in want.items() if got.get(k) != v]
    if bad:
        raise ValueError(f"{path} holds a curriculum made with other {', '.join(bad)}; delete it or set data.folder")
    return path


def rephrased(rows: Any) -> Any:
    """Curriculum rows asked with phrasings training never used (:func:`studies.pretrain.curriculum.heldout_question`),
    so a score tells a skill from one phrasing learnt by heart."""
    return rows.map(
        lambda row, i: {"question": heldout_question(json.loads(row["meta"]), i)},
        with_indices=True,
        keep_in_memory=True,
    )


def skill_accuracy(model: torch.nn.Module, processor: Any, rows: Any, batch_size: int) -> dict[str, Any]:
    """Held-out exact match (teacher-forced, equal to greedy exact) per skill, through the study's evaluation
    (:func:`studies.reproduce.pipeline.evaluate_model`), with the attention mass of the last prompt token on the
    objects. Returns ``{"all": acc, "<skill>": acc, ..., "n": {skill: count}, "prompt_mass": value}``."""
    from studies.reproduce.pipeline import evaluate_model

    was_training = model.training
    m = evaluate_model(SimpleNamespace(model=model, processor=processor), rows, batch_size, queries=("prompt_last",))
    model.train(was_training)
    skills = [json.loads(x)["skill"] if isinstance(x, str) else x["skill"] for x in rows["meta"]]
    right: Counter[str] = Counter()
    total: Counter[str] = Counter(skills)
    for skill, item in zip(skills, m["items"]):
        right[skill] += item["exact_tf"]
    out: dict[str, Any] = {"all": m["exact_tf"], "prompt_mass": m["prompt_last/evidence_mass"]}
    out.update({s: right[s] / total[s] for s in sorted(total)})
    out["n"] = dict(sorted(total.items()))
    return out


def pretrain(
    out: str = "models/tiny-base",
    data: CurriculumData = CurriculumData(),  # noqa: B008 - read-only default, jsonargparse needs an instance
    model: BaseModel = BaseModel(),  # noqa: B008
    train: Schedule = Schedule(),  # noqa: B008
    workers: PositiveInt = 1,
    threads: PositiveInt = 1,
    loader_workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain the tiny Qwen2.5-VL on the curriculum (full fine-tuning) and write it with its model card.

    Args:
        out: output folder (new, or replaced with ``--overwrite``).
        data: the curriculum dataset.
        model: the model's size and initial weights.
        train: the schedule.
        workers: data-generation processes.
        threads: torch CPU threads of the training step (the weights are reproducible for the same count).
        loader_workers: DataLoader processes that read and collate batches (image processing) beside the training
            step; 0 collates in the training process. The data order does not depend on it.
        overwrite: replace an existing ``out``.

    Returns:
        The record written to ``pretrain.json``.

    Raises:
        ValueError: ``out`` exists without ``--overwrite``, the weights would exceed 30 MB, a bad schedule, or a
            dataset folder made with other settings.
    """
    from klal.atomic import atomic_save_dir
    from klal.data.io import load_split
    from klal.datamodule import KLALDataModule
    from klal.geometry import DEFAULT_MIN_PIXELS
    from klal.models.qwen2_5_vl import FAMILY
    from klal.models.qwen2_5_vl.tiny import build_tiny_model, build_tiny_processor, tiny_config

    if os.path.exists(out) and not overwrite:
        raise ValueError(f"--out {out!r} exists; pass --overwrite to replace it")
    for key in ("steps", "batch_size", "eval_every", "eval_samples", "eval_batch_size"):
        if getattr(train, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    # The processor resizes nothing the curriculum draws: its pixel bound is the images' size (224: 8 x 8 tokens).
    image_size = data.curriculum.image_size
    processor = build_tiny_processor(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=image_size * image_size)
    net = build_tiny_model(tiny_config(processor.tokenizer, **model.tiny_overrides), seed=model.init_seed)
    n_params = sum(p.numel() for p in net.parameters())
    mb = n_params * 4 / 2**20
    if mb > MAX_MB:
        raise ValueError(f"model.tiny_overrides give {n_params} parameters = {mb:.1f} MB of float32; at most {MAX_MB}")

    t0 = time.perf_counter()
    path = make_curriculum(data, workers, processor.tokenizer)
    first = None
    if train.first_steps > 0:
        cur = dataclasses.replace(data.curriculum, skills=tuple(train.first_skills))
        first = make_curriculum(
            dataclasses.replace(data, folder=f"{data.folder}_first", curriculum=cur), workers, processor.tokenizer
        )
    data_s = time.perf_counter() - t0
    if loader_workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {loader_workers}")

    def endless(folder: Path) -> Iterator[dict[str, Any]]:
        dm = KLALDataModule(
            paths=[str(folder)], batch_size=train.batch_size, num_workers=loader_workers, seed=train.seed
        )
        dm.processor = processor
        dm.setup("fit")
        loader = dm.train_dataloader()
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    stream = endless(path)
    if first is not None:
        stream = itertools.chain(itertools.islice(endless(first), train.first_steps), stream)
    curve_rows = load_split(path, "validation", train.eval_samples)

    net.train()
    for p in net.parameters():
        p.requires_grad_(True)  # full fine-tuning: every parameter, the vision tower's included
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, train.warmup_steps, train.steps, train.min_lr_ratio)
    )
    torch.manual_seed(train.seed)
    losses: list[float] = []
    curve: list[dict[str, Any]] = [{"step": 0, **skill_accuracy(net, processor, curve_rows, train.eval_batch_size)}]
    step, train_s = 0, 0.0
    stopped: dict[str, Any] | None = None
    if train.flat_skill is not None and train.flat_skill not in data.curriculum.skills:
        raise ValueError(f"train.flat_skill={train.flat_skill!r} is not one of data.curriculum.skills")
    t_loop = time.perf_counter()
    for batch in stream:
        t1 = time.perf_counter()
        logits = net(**{k: batch[k] for k in FAMILY.input_keys if k in batch}).logits
        loss = answer_loss(logits, batch["labels"], train.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {loss.item()} (lower train.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), train.grad_clip)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t1
        losses.append(float(loss.detach()))
        step += 1
        if step % train.eval_every == 0 or step == train.steps:
            curve.append({"step": step, **skill_accuracy(net, processor, curve_rows, train.eval_batch_size)})
            elapsed = time.perf_counter() - t_loop
            _progress(curve[-1], losses, elapsed, train.steps)
            if (
                train.flat_skill is not None
                and step < train.steps
                and elapsed >= 60 * train.flat_after_minutes
                and is_flat(curve, train.flat_skill, train.flat_points, train.flat_gain)
            ):
                stopped = {"step": step, "minutes": elapsed / 60, "skill": train.flat_skill}
                print(f"pretrain: {train.flat_skill} flat after {elapsed / 60:.0f} min; stopped at step {step}")
                break
        if step == train.steps:
            break
    loop_s = time.perf_counter() - t_loop
    net.eval()
    test_rows = load_split(path, "test")
    heldout = skill_accuracy(net, processor, test_rows, train.eval_batch_size)
    heldout_new = skill_accuracy(net, processor, rephrased(test_rows), train.eval_batch_size)
    record = {
        "command": "python -m studies.pretrain",
        "out": out,
        "parameters": n_params,
        "architecture": _architecture(net),
        "data": json.loads(json.dumps(dataclasses.asdict(data), default=str)),
        "image_size": image_size,
        "model": dataclasses.asdict(model),
        "train": dataclasses.asdict(train),
        "threads": threads,
        "loader_workers": loader_workers,
        "data_s": data_s,
        "train_s": train_s,
        "s_per_step": train_s / max(step, 1),
        "loop_s": loop_s,
        "wall_s_per_step": loop_s / max(step, 1),
        "losses": losses,
        "curve": curve,
        "heldout": heldout,
        "heldout_new_phrasings": heldout_new,
        "stopped_early": stopped,
        "references": references(path),
        "machine": _machine(),
    }

    def write(tmp: str) -> None:
        net.save_pretrained(tmp)
        FAMILY.save_stock_processor(processor, tmp)
        weights = Path(tmp) / "model.safetensors"
        record["weights_bytes"] = weights.stat().st_size
        record["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        plot_curve(record, Path(tmp) / "loss_curve.png")
        (Path(tmp) / "pretrain.json").write_text(json.dumps(record, indent=1))
        (Path(tmp) / "README.md").write_text(model_card(record))

    atomic_save_dir(write, out)
    return record


def _progress(point: dict[str, Any], losses: list[float], elapsed: float, steps: int) -> None:
    """One stderr line per learning-curve point, so a long run shows where it is."""
    import sys

    step = point["step"]
    skills = " ".join(f"{k} {100 * v:.0f}" for k, v in point.items() if k not in ("step", "all", "n", "prompt_mass"))
    eta = elapsed / step * (steps - step) / 60
    print(
        f"pretrain step {step}/{steps}: loss {np.mean(losses[-50:]):.3f}, validation exact {100 * point['all']:.1f} % "
        f"({skills}), {elapsed / 60:.1f} min, ~{eta:.0f} min left",
        file=sys.stderr,
        flush=True,
    )


def references(path: Path) -> dict[str, dict[str, Any]]:
    """Per skill, the reference accuracies of the test split (chance, most frequent training answer, question-only:
    :func:`studies.reproduce.baselines.reference_accuracies`)."""
    from klal.data.io import load_split
    from studies.reproduce.baselines import reference_accuracies

    cols = ("question", "answer", "meta")
    train, test = (load_split(path, split).select_columns(list(cols)) for split in ("train", "test"))

    def by_skill(ds: Any) -> dict[str, list[tuple[str, str, str]]]:
        out: dict[str, list[tuple[str, str, str]]] = {}
        for q, a, m in zip(ds["question"], ds["answer"], ds["meta"]):
            out.setdefault(json.loads(m)["skill"], []).append((q, a, m))
        return out

    tr, te = by_skill(train), by_skill(test)
    out = {}
    for skill in sorted(te):
        tq, ta, _ = zip(*tr[skill])
        eq, ea, em = zip(*te[skill])
        out[skill] = reference_accuracies("curriculum", tq, ta, eq, ea, em)
    return out


def _architecture(net: torch.nn.Module) -> dict[str, Any]:
    text, vision = net.config.text_config, net.config.vision_config
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {
        "class": type(net).__name__,
        "text": {k: getattr(text, k) for k in (*text_keys, "vocab_size")},
        "vision": {k: getattr(vision, k) for k in ("depth", "hidden_size", "num_heads", "intermediate_size")},
    }


def _machine() -> dict[str, str]:
    from studies.reproduce.run import package_versions

    return {**package_versions(), "python": platform.python_version(), "cpus": str(os.cpu_count())}


def plot_curve(record: dict[str, Any], path: Path) -> None:
    """``loss_curve.png``: the training loss per step (and its 50-step mean) and held-out exact match per skill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = np.asarray(record["losses"], dtype=float)
    steps = np.arange(1, len(losses) + 1)
    a.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    k = min(50, len(losses))
    if k > 1:
        a.plot(
            steps[k - 1 :], np.convolve(losses, np.ones(k) / k, mode="valid"), color="tab:blue", label=f"{k}-step mean"
        )
    a.set_xlabel("step")
    a.set_ylabel("training loss (answer tokens, nats)")
    a.legend(fontsize=8)
    xs = [p["step"] for p in record["curve"]]
    for skill in record["curve"][0]["n"]:
        b.plot(xs, [p[skill] for p in record["curve"]], marker="o", ms=3, label=skill)
    b.plot(xs, [p["all"] for p in record["curve"]], color="black", lw=2, label="all")
    b.set_xlabel("step")
    b.set_ylabel("validation exact match")
    b.set_ylim(-0.02, 1.02)
    b.legend(fontsize=7, ncol=2)
    fig.suptitle("Curriculum pretraining (full fine-tuning of the tiny Qwen2.5-VL)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CAN_MARGIN = 0.10
"""A skill counts as learned when its held-out accuracy beats its best reference accuracy by this much."""


def model_card(record: dict[str, Any]) -> str:
    """The model card (README.md) of a pretrained base: data, steps, loss curve, held-out accuracy per skill."""
    arch, data, tr = record["architecture"], record["data"], record["train"]
    cur = data["curriculum"]
    rows, can, cannot = [], [], []
    for skill, refs in record["references"].items():
        acc = record["heldout"][skill]
        best = max(refs["chance"]["accuracy"], refs["majority"]["accuracy"], refs["question_only"]["accuracy"])
        (can if acc >= best + CAN_MARGIN else cannot).append(f"{skill} ({100 * acc:.1f} % vs {100 * best:.1f} %)")
        new = record.get("heldout_new_phrasings", {}).get(skill)
        rows.append(
            f"| {skill} | {record['heldout']['n'][skill]} | {100 * acc:.1f} | "
            f"{'-' if new is None else f'{100 * new:.1f}'} | {100 * refs['chance']['accuracy']:.1f} | "
            f"{100 * refs['majority']['accuracy']:.1f} (`{refs['majority']['answer']}`) | "
            f"{100 * refs['question_only']['accuracy']:.1f} |"
        )
    m = record["machine"]
    return "\n".join(
        [
            f"# {Path(record['out']).name}: a small Qwen2.5-VL pretrained by klal on a synthetic curriculum",
            "",
            f"Made by `python -m studies.pretrain` (`studies/pretrain/recipe.py`), out `{record['out']}`. "
            f"`{arch['class']}` (real transformers classes): language model {arch['text']}, vision tower "
            f"{arch['vision']}; {record['parameters']:,} parameters, **all trained** from random weights (seed "
            f"{record['model']['init_seed']}), vision tower included; float32 `model.safetensors` "
            f"{record['weights_bytes'] / 2**20:.1f} MB (sha256 {record['weights_sha256'][:16]}...). Tokenizer: the "
            "embedded tiny byte-level BPE (`klal.models.qwen2_5_vl.tiny`). Load it with "
            "`--model.name_or_path <this folder> --model.dtype float32` (a folder's `auto` dtype is bfloat16); the "
            f"copy shipped with klal is `--model.name_or_path {Path(record['out']).name}` (float32 under `auto`).",
            "",
            "## Data",
            "",
            f"The curriculum of `studies/pretrain/curriculum.py`: {data['num']} images of {record['image_size']} px "
            f"(splits {data['splits']}, seed {data['seed']}), skills {cur['skills']} in equal shares; shapes "
            f"{cur['shapes']}, colours {cur['colours']}, 1-{cur['max_objects']} objects of {cur['diameter']} px; "
            f"answers `{data['answer_render']}`. Not in it, by construction: grids and cell coordinates "
            "(grid_patch), lines, crossings, nodes and letters (line_intersection, line_tracing), and questions that "
            "pick one object of several by one attribute and ask for another (the lookup tasks and the marked "
            "lookups: the `marked` skill shows one object and its marker and never names the marker)."
            + (
                f" {100 * cur['suffix_share']:.0f} % of the one-word questions end with an instruction "
                "(`curriculum.SUFFIXES`)."
                if cur.get("suffix_share")
                else ""
            ),
            "",
            "## Training",
            "",
            f"{len(record['losses'])} steps of batch {tr['batch_size']}"
            + (
                f", the first {tr['first_steps']} on a curriculum of {tr['first_skills']} questions only (same "
                "settings, its own dataset), the rest on every skill"
                if tr.get("first_steps")
                else ""
            )
            + f" (full fine-tuning, AdamW lr {tr['lr']:g}, "
            f"weight decay {tr['weight_decay']:g}, gradient norm clipped at {tr.get('grad_clip')}, loss "
            f"{tr.get('loss', 'per_token')}, "
            f"{tr['warmup_steps']} warm-up steps, cosine to "
            f"{tr['min_lr_ratio']:g} x lr; data-order seed {tr['seed']}), next-token loss on the answers; "
            f"{record['loop_s'] / 60:.1f} min of training ({record['wall_s_per_step']:.2f} s per step with the "
            f"learning-curve points, {record['s_per_step']:.2f} s in the optimizer step itself)"
            + (
                f"; stopped at step {record['stopped_early']['step']} ({record['stopped_early']['skill']} flat after "
                f"{record['stopped_early']['minutes']:.0f} min)"
                if record.get("stopped_early")
                else ""
            )
            + f" and {record['data_s'] / 60:.1f} min of data generation (torch threads: {record['threads']}) on "
            f"{m.get('cpu', '?')}; torch {m.get('torch')}, transformers {m.get('transformers')}. Final training loss "
            f"(mean of the last 50 steps): {np.mean(record['losses'][-50:]):.3f} nats.",
            "",
            "![loss curve](loss_curve.png)",
            "",
            "## Held-out accuracy per skill",
            "",
            "Test split, exact match (teacher-forced, which equals greedy exact match), %, with the reference "
            "accuracies on the same items (`studies.reproduce.baselines`). *New phrasings*: the same items asked with "
            "phrasings training never used (`curriculum.HELDOUT_TEMPLATES`).",
            "",
            "| skill | items | accuracy | new phrasings | chance | most frequent training answer | question-only |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"All skills: {100 * record['heldout']['all']:.1f} %. Attention mass of the last prompt token on the "
            f"objects: {100 * record['heldout']['prompt_mass']:.1f} %.",
            "",
            "## What it can and cannot do",
            "",
            f"* Learned (held-out accuracy at least {100 * CAN_MARGIN:.0f} points above the best reference): "
            f"{', '.join(can) or 'none'}.",
            f"* Not learned (within {100 * CAN_MARGIN:.0f} points of a reference): {', '.join(cannot) or 'none'}.",
            "* Never seen: real photographs, text in images, lines, grids, letters, more than "
            f"{cur['max_objects']} objects, overlapping objects, any question outside the curriculum's phrasings. "
            "It is a base for the synthetic studies, not a general vision-language model.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Command line entry point (``python -m studies.pretrain``)."""
    from klal.cli import run

    return run(pretrain, argv, prog or "python -m studies.pretrain")
