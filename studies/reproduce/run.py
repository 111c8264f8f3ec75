"""Reproduction of the KLAL paper's table: Base vs NTP vs NTP + KLAL on the three synthetic tasks, with a lambda /
query-token sweep, investigation runs and the training-free probes. Trains the tiny random Qwen2.5-VL on the CPU; for
a real checkpoint (``backbone`` + ``adapter_pattern``) it evaluates, probes and reports adapters trained by train.py.

Run from the repository root::

    python -m studies.reproduce --config configs/repro/small.yaml --jobs 2              # every stage, 2 processes
    python -m studies.reproduce --config configs/repro/small.yaml --stages probes,report  # probes again, then report
    python -m studies.reproduce --config configs/repro/qwen2.5-vl-7b_study.yaml --stages eval,probes,report   # GPU

Stages (in this order; each reuses what earlier ones wrote, so any stage can be rerun alone):

* ``data``: generate each task's dataset (``data_dir``), unless it is there.
* ``train``: every run (task x arm x seed, the sweep, ``extra_runs``): train, log a learning curve, save the trained
  weights (``run_dir/<task>/<run>/trainable.pt``); a finished run with the same settings is skipped.
* ``eval``: test-split metrics of every run and of the untrained model (``Base``): answer accuracy (teacher-forced
  exact match and greedy generation), pointing game and attention mass inside the evidence cells.
* ``leak``: the wrong-answer diagnostic (:mod:`studies.reproduce.leak`) on the runs of ``leak_arms``: is the answer
  tokens' attention keyed on the teacher-forced answer?
* ``screen``: the testbed screen (:mod:`studies.reproduce.screen`): the base's readout on one-object images, the
  oracle's gain (and its control) on the NTP runs, the NTP gap; its own table, ``results_dir/screen.md``.
* ``probes``: the training-free methods of :mod:`klal.grounding` on the models named by ``probe_arms``.
* ``report``: ``results_dir/``: ``table.md``, ``results.json``, ``curves.png``, ``sweep.png``, and
  ``predictions/<task>.jsonl`` (every test item's gold answer, prediction and correctness per arm and seed). The table
  has reference rows (chance, most frequent answer, question-blind, question-only: :mod:`studies.reproduce.baselines`),
  tests over seeds and over items (:mod:`studies.reproduce.stats`) with the config's one primary test marked, and the
  answers' tokenization.

Before any stage runs, :mod:`studies.reproduce.protocol` checks the study: a confirmatory config must be committed in
git, unchanged, before any of its results (its blob hash and commit go into the report and every run's fingerprint); a
pilot must keep off the data seeds and dataset folders of every confirmatory config of its tasks.

``--jobs N`` runs the train, eval, leak and probes stages in N processes (``--shard i/N`` by hand: each takes every N-th
job; run a stage on all shards before the next stage starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import PositiveInt

from klal.cli import bare_bool_flags, expand_key_values, normalise_flags, parse_or_fail, user_errors
from studies.reproduce import pipeline as repro
from studies.reproduce.baselines import answer_tokens, baselines, render_baseline_rows, render_tokens
from studies.reproduce.leak import render_leak
from studies.reproduce.pipeline import RunSpec, StudyConfig
from studies.reproduce.protocol import protocol_record
from studies.reproduce.stats import (
    item_comparisons,
    paired_comparisons,
    primary_result,
    render_items,
    render_paired,
    render_primary,
)

REPO = Path(__file__).resolve().parents[2]

STAGES = ("data", "train", "eval", "leak", "screen", "probes", "report")
EVAL_QUERIES = ("last", "prompt_last")
# Which paper column an arm of the default config stands for.
PAPER_COLUMN = {"base": 0, "ntp": 1, "klal": 2}
# Grounding accuracy (%) the KLAL paper reports for Qwen2.5-VL: Base / NTP / NTP + KLAL.
PAPER = {
    "line_intersection": (47.6, 62.6, 70.2),
    "line_tracing": (49.6, 53.8, 62.2),
    "grid_patch": (6.1, 28.6, 44.9),
}


def visual_tokens(cfg: StudyConfig) -> int:
    """Visual tokens of one ``image_size`` square image for the study's model (its family's grid)."""
    from klal.geometry import DEFAULT_MIN_PIXELS
    from klal.models.config import ModelConfig
    from klal.models.family import family_for_name

    grids = family_for_name(ModelConfig(name_or_path=cfg.backbone).name_or_path).grids_for_size(
        cfg.image_size, cfg.image_size, DEFAULT_MIN_PIXELS, cfg.image_size * cfg.image_size
    )
    return sum(r * c for r, c in grids)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _shard(items: list, shard: tuple[int, int]) -> list:
    i, n = shard
    return items[i::n]


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must look like 0/2, got {text!r}") from e
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= index < count")
    return i, n


# -- stages ------------------------------------------------------------------------------------------------------------
def stage_train(
    cfg: StudyConfig, shard: tuple[int, int], force: bool, provenance: dict[str, Any] | None = None
) -> None:
    runs = _shard(repro.all_runs(cfg), shard)
    for k, spec in enumerate(runs):
        t0 = time.perf_counter()
        s = repro.train_run(cfg, spec, force=force, provenance=provenance)
        last = s["curve"][-1]
        _log(
            f"train {k + 1}/{len(runs)} {spec.task}/{spec.name}: {time.perf_counter() - t0:.0f} s, "
            f"val exact {last['exact_tf']:.3f}, evidence mass {last['evidence_mass']:.3f}"
        )


def _eval_fingerprint(cfg: StudyConfig, generate: bool, provenance: dict[str, Any] | None = None) -> str:
    d = {
        "test_samples": cfg.test_samples,
        "generate": generate,
        "max_new_tokens": cfg.max_new_tokens,
        "queries": EVAL_QUERIES,
        "evidence_cells": repro.evidence_cells_source(),
        "items": True,  # evaluations from before per-item results were kept are redone
    }
    if provenance:
        d["config_commit"] = provenance["commit"]
    return json.dumps(d, sort_keys=True)


def _evaluate_to(
    cfg: StudyConfig,
    module,
    task: str,
    path: Path,
    generate: bool,
    force: bool,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fp = _eval_fingerprint(cfg, generate, provenance)
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        if old.get("fingerprint") == fp:
            return old
    rows = repro.task_split(cfg, task, "test", cfg.test_samples)
    t0 = time.perf_counter()
    m = repro.evaluate_model(
        module,
        rows,
        batch_size=cfg.eval_batch_size,
        queries=EVAL_QUERIES,
        generate=generate,
        max_new_tokens=cfg.max_new_tokens,
    )
    m["eval_s"] = time.perf_counter() - t0
    m["fingerprint"] = fp
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m, indent=1))
    return m


def _can_generate(cfg: StudyConfig) -> bool:
    if not cfg.generate:
        return False
    try:
        from klal.eval.answers import answer_correct  # noqa: F401
    except ImportError:
        _log("klal.eval.answers is not available: generation accuracy skipped (rerun --stages eval later)")
        return False
    return True


def stage_eval(cfg: StudyConfig, shard: tuple[int, int], force: bool, provenance: dict[str, Any] | None = None) -> None:
    generate = _can_generate(cfg)
    main = set(repro.main_runs(cfg).values())
    jobs: list[tuple[str, RunSpec | None]] = [(t, None) for t in cfg.tasks]
    jobs += [(s.task, s) for s in repro.all_runs(cfg)]
    for task, spec in _shard(jobs, shard):
        if spec is None:
            module = repro.build_module(cfg, 0.0, "last", seed=0)
            path = Path(cfg.run_dir) / task / "base" / "eval.json"
            name = "base"
        else:
            if not cfg.adapter_pattern and not (repro.run_path(cfg, spec) / "trainable.pt").is_file():
                raise FileNotFoundError(f"run {task}/{spec.name} is not trained yet: run --stages train first")
            module = repro.load_trained(cfg, spec)
            path = repro.run_path(cfg, spec) / "eval.json"
            name = spec.name
        # Generation costs max_new_tokens passes; the sweep's extra runs are compared on the cheap metrics only.
        m = _evaluate_to(cfg, module, task, path, generate and (spec is None or spec in main), force, provenance)
        _log(
            f"eval {task}/{name}: exact {m['exact_tf']:.3f}, gen {m.get('answer_acc_gen', float('nan')):.3f}, "
            f"pointing {m['last/pointing']:.3f}, mass {m['last/evidence_mass']:.3f} ({m['eval_s']:.0f} s)"
        )


def _leak_runs(cfg: StudyConfig) -> list[tuple[str, str, RunSpec]]:
    """``(task, arm, run)`` of every run the wrong-answer diagnostic measures."""
    runs = repro.main_runs(cfg)
    seeds = cfg.leak_seeds if cfg.leak_seeds is not None else cfg.seeds
    return [(t, a, runs[(t, a, s)]) for t in cfg.tasks for a in cfg.leak_arms for s in seeds]


def stage_leak(cfg: StudyConfig, shard: tuple[int, int], force: bool, provenance: dict[str, Any] | None = None) -> None:
    from studies.reproduce.leak import leak_metrics

    tokenizer = repro.study_tokenizer(cfg)
    fp = json.dumps({"samples": cfg.leak_samples, "eval": _eval_fingerprint(cfg, False, provenance)}, sort_keys=True)
    for task, _, spec in _shard(_leak_runs(cfg), shard):
        path = repro.run_path(cfg, spec) / "leak.json"
        if path.is_file() and not force and json.loads(path.read_text()).get("fingerprint") == fp:
            continue
        if not (repro.run_path(cfg, spec) / "trainable.pt").is_file():
            raise FileNotFoundError(f"run {task}/{spec.name} is not trained yet: run --stages train first")
        t0 = time.perf_counter()
        rows = repro.task_split(cfg, task, "test", cfg.leak_samples)
        m = leak_metrics(
            repro.load_trained(cfg, spec),
            task,
            rows,
            lambda a: repro.render_answer(a, cfg.answer_render, tokenizer),
            cfg.eval_batch_size,
        )
        m["fingerprint"] = fp
        path.write_text(json.dumps(m, indent=1))
        _log(
            f"leak {task}/{spec.name}: last mass on gold {m['last/gold_fed']:.3f} (gold fed) vs "
            f"{m['last/wrong_fed']:.3f} (wrong fed) ({time.perf_counter() - t0:.0f} s)"
        )


def _probe_models(cfg: StudyConfig) -> list[tuple[str, str, RunSpec | None]]:
    """``(task, label, run)`` of every model the probes run on (run None: the untrained base)."""
    out: list[tuple[str, str, RunSpec | None]] = []
    runs = repro.main_runs(cfg)
    for task in cfg.tasks:
        for arm in cfg.probe_arms:
            if arm == "base":
                out.append((task, "base", None))
                continue
            if arm not in cfg.arms:
                raise ValueError(f"probe_arms: {arm!r} is neither 'base' nor an arm ({list(cfg.arms)})")
            for seed in cfg.probe_seeds:
                if seed not in cfg.seeds:
                    raise ValueError(f"probe_seeds: seed {seed} is not one of the study's seeds {cfg.seeds}")
                out.append((task, f"{arm}_s{seed}", runs[(task, arm, seed)]))
    return out


def _probe_specs(cfg: StudyConfig, available: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, method name, options)`` of each probe row."""
    entries = cfg.probe_methods if cfg.probe_methods is not None else available
    out = []
    for k, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, dict) or "name" not in e:
            raise ValueError(f"probe_methods[{k}]: give a method name or a mapping with name (and options, label)")
        if e["name"] not in available:
            raise ValueError(f"probe_methods[{k}]: {e['name']!r} is not registered; available: {available}")
        opts = dict(e.get("options") or {})
        label = e.get("label") or e["name"] + "".join(f" {k}={v}" for k, v in sorted(opts.items()))
        out.append((label, e["name"], opts))
    return out


def stage_probes(cfg: StudyConfig, shard: tuple[int, int], force: bool) -> None:
    try:
        from klal.grounding import GroundingModel, available_methods, build_method
    except ImportError as e:
        _log(f"probes skipped: klal.grounding is not importable ({e})")
        return
    from klal.eval.engine import run_method
    from klal.eval.metrics import GroundingMetrics, pooled

    specs = _probe_specs(cfg, available_methods())
    for task, label, spec in _shard(_probe_models(cfg), shard):
        path = (repro.run_path(cfg, spec) if spec is not None else Path(cfg.run_dir) / task / "base") / "probes.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        done = json.loads(path.read_text()) if path.is_file() and not force else {}
        rows = repro.task_split(cfg, task, "test", cfg.probe_samples)
        prep_rows = [dict(r) for r in repro.task_split(cfg, task, "train", cfg.probe_prepare_samples)]
        module = repro.load_trained(cfg, spec) if spec is not None else repro.build_module(cfg)
        gm = GroundingModel(module.model, module.processor)
        for row_label, name, opts in specs:
            if row_label in done and done[row_label].get("n") == len(rows) and not done[row_label].get("error"):
                continue
            # The evaluation engine's loop: prepared once on training images (localization-head discovery), as
            # evaluate.py does, then scored by the same metrics.
            metrics = GroundingMetrics()
            secs: list[float] = []
            err = None
            try:
                run = run_method(gm, row_label, build_method(name, **opts), {task: rows}, metrics, prep_rows)
                secs = [s["seconds"] for s in run.samples]
            except Exception as e:  # one failing method must not hide the others' results; the error is reported
                err = f"{type(e).__name__}: {e}"
            scores = metrics.compute()
            point, mass, answer = (
                pooled(scores, row_label, m) for m in ("pointing_game", "evidence_mass", "answer_accuracy")
            )
            done[row_label] = {
                "method": name,
                "options": opts,
                "n": len(rows),
                "pointing": point["value"] if point["count"] else float("nan"),
                "evidence_mass": mass["value"] if mass["count"] else float("nan"),
                "answer_acc": answer["value"] if answer["count"] else None,
                "s_per_sample": float(np.mean(secs)) if secs else float("nan"),
                "error": err,
            }
            _log(f"probe {task}/{label} {row_label}: {done[row_label]}")
            path.write_text(json.dumps(done, indent=1))


# -- report ------------------------------------------------------------------------------------------------------------
def collect(cfg: StudyConfig) -> dict[str, Any]:
    """Everything the report shows, from the run directories."""
    out: dict[str, Any] = {"tasks": {}, "sweep": {}, "evidence_cells": repro.evidence_cells_source()}
    main = repro.main_runs(cfg)
    keys = (
        "exact_tf",
        "answer_acc_gen",
        "last/pointing",
        "last/evidence_mass",
        "prompt_last/pointing",
        "prompt_last/evidence_mass",
    )
    for task in cfg.tasks:
        base_rows = baselines(cfg, task)
        t: dict[str, Any] = {
            "arms": {},
            "curves": {},
            "probes": {},
            "baselines": base_rows,
            "majority": base_rows["majority"] if base_rows else None,
        }
        base_p = Path(cfg.run_dir) / task / "base" / "eval.json"
        if base_p.is_file():
            b = json.loads(base_p.read_text())
            t["arms"]["base"] = {k: {"mean": b.get(k, float("nan")), "std": None, "values": [b.get(k)]} for k in keys}
            t["n_test"] = b["n"]
        for arm in cfg.arms:
            evals, curves, times = [], [], []
            for seed in cfg.seeds:
                d = repro.run_path(cfg, main[(task, arm, seed)])
                if (d / "eval.json").is_file():
                    evals.append(json.loads((d / "eval.json").read_text()))
                if (d / "run.json").is_file():
                    r = json.loads((d / "run.json").read_text())
                    curves.append(r["curve"])
                    times.append(r["train_s"])
            if evals:
                t["arms"][arm] = {}
                for k in keys:
                    vals = [e.get(k, float("nan")) for e in evals]
                    m, s = repro.mean_std(vals)
                    t["arms"][arm][k] = {"mean": m, "std": s, "values": vals}
            if curves:
                t["curves"][arm] = curves
                t.setdefault("train_s", {})[arm] = times
        for _, label, spec in (x for x in _probe_models(cfg) if x[0] == task):
            p = (repro.run_path(cfg, spec) if spec is not None else Path(cfg.run_dir) / task / "base") / "probes.json"
            if p.is_file():
                t["probes"][label] = json.loads(p.read_text())
        out["tasks"][task] = t
    out["leak"] = {}
    for task, arm, spec in _leak_runs(cfg):
        p = repro.run_path(cfg, spec) / "leak.json"
        if p.is_file():
            result = {"seed": spec.seed, **json.loads(p.read_text())}
            out["leak"].setdefault(task, {}).setdefault(arm, []).append(result)
    out["extra"] = []
    for spec in repro.extra_runs(cfg):
        d = repro.run_path(cfg, spec)
        if (d / "eval.json").is_file():
            e = json.loads((d / "eval.json").read_text())
            out["extra"].append(
                {
                    "task": spec.task,
                    "run": spec.name,
                    "lambda": spec.klal_weight,
                    "query": spec.klal_query,
                    "layers": spec.klal_layers or cfg.klal_layers,
                    "seed": spec.seed,
                    "exact_tf": e["exact_tf"],
                    "pointing": e["last/pointing"],
                    "evidence_mass": e["last/evidence_mass"],
                    "prompt_pointing": e["prompt_last/pointing"],
                    "prompt_mass": e["prompt_last/evidence_mass"],
                }
            )
    for (w, q, s), spec in repro.sweep_runs(cfg).items():
        d = repro.run_path(cfg, spec)
        if (d / "eval.json").is_file() and (d / "run.json").is_file():
            e = json.loads((d / "eval.json").read_text())
            r = json.loads((d / "run.json").read_text())
            out["sweep"][f"{w:g}/{q}/{s}"] = {
                "lambda": w,
                "query": q,
                "seed": s,
                "exact_tf": e["exact_tf"],
                "pointing": e["last/pointing"],
                "evidence_mass": e["last/evidence_mass"],
                "prompt_last_mass": e["prompt_last/evidence_mass"],
                "curve": r["curve"],
            }
    return out


def _cell(d: dict[str, Any] | None, key: str) -> str:
    if not d or key not in d:
        return "—"
    v = d[key]
    return repro.fmt(v["mean"], v["std"])


def render_table(cfg: StudyConfig, res: dict[str, Any], command: str, study_command: str | None = None) -> str:
    """The markdown report (``study_command``: the command that runs every stage; default ``command``)."""
    study_command = study_command or command
    if cfg.backbone == "tiny":
        model = f"tiny random Qwen2.5-VL, tiny_seed {cfg.tiny_seed}, overrides {cfg.tiny_overrides or 'none'}"
    elif repro.trains_here(cfg):
        import klal
        from klal.models.config import BUNDLED

        card = BUNDLED[cfg.backbone] if cfg.backbone in BUNDLED else Path(cfg.backbone)
        with contextlib.suppress(ValueError):
            card = card.resolve().relative_to(Path(klal.__file__).resolve().parents[1])
        model = f"{cfg.backbone}: a pretrained Qwen2.5-VL (model card {card.as_posix()}/README.md), LoRA trained here"
    else:
        model = f"{cfg.backbone}, adapters {cfg.adapter_pattern} trained with train.py"
    lora = {k: v for k, v in dataclasses.asdict(cfg.lora).items() if v is not None}
    target = repro.non_default_fields(cfg.target) or "default"
    lines = [
        f"# KLAL reproduction: Base vs NTP vs NTP + KLAL ({model})",
        "",
        f"Produced by: `{study_command}` (all stages; `--jobs 2` runs them in two processes). This report: "
        f"`{command}`.  ",
        f"Seeds: {cfg.seeds} (training: LoRA init and data order; the base model and the data are fixed). "
        f"{cfg.steps} steps x batch {cfg.batch_size}, lr {cfg.lr:g}, LoRA {lora}, also trained: "
        f"{cfg.train_extra or 'nothing'}; KLAL layers {cfg.klal_layers}, target maps {target}. "
        f"Images {cfg.image_size} px ({visual_tokens(cfg)} visual tokens).",
        f"Evidence cells: {res['evidence_cells']}.",
        "",
        *render_protocol(res.get("protocol")),
        *render_primary(res.get("primary")),
        "Mean ± sample std over seeds, in %. Reference rows (chance, most frequent, question-blind, question-only: "
        "`studies.reproduce.baselines`) are scored on the same test items. *Exact (TF)*: greedy exact match "
        "computed teacher-forced (one pass); "
        "*Gen*: real greedy generation scored with the normalised answer match; *Point* / *Mass*: pointing game and "
        "share of attention inside the evidence cells, for the answer's last token (the supervised query, gold "
        "answer teacher-forced) and for the last prompt token (`prompt_last`, what a model looks at before "
        "answering). Paper: grounding accuracy of Qwen2.5-VL in the KLAL paper (a 7B-class pretrained model; "
        "not comparable in level, only in direction).",
        "",
        "| task | model | Exact (TF) | Gen | Point (answer) | Mass (answer) | Point (prompt) | Mass (prompt) | paper |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = "Base (untrained)" if cfg.backbone == "tiny" else "Base (not fine-tuned)"
    labels = {"base": base, "ntp": "NTP", "klal": "NTP + KLAL"}
    for task, t in res["tasks"].items():
        paper = PAPER.get(task, (None, None, None))
        lines += render_baseline_rows(task, t.get("baselines"), empty_cells=6)
        for arm in ["base", *cfg.arms]:
            d = t["arms"].get(arm)
            p = paper[PAPER_COLUMN[arm]] if arm in PAPER_COLUMN else None
            lines.append(
                f"| {task} | {labels.get(arm, arm)} | {_cell(d, 'exact_tf')} | {_cell(d, 'answer_acc_gen')} | "
                f"{_cell(d, 'last/pointing')} | {_cell(d, 'last/evidence_mass')} | {_cell(d, 'prompt_last/pointing')} "
                f"| {_cell(d, 'prompt_last/evidence_mass')} | {p if p is not None else '—'} |"
            )
    lines += [
        "",
        "Test samples per task: " + ", ".join(f"{k} {v.get('n_test', '?')}" for k, v in res["tasks"].items()),
        "",
    ]
    if res["sweep"]:
        lines += [
            f"## Sweep on {cfg.sweep_task}: lambda x supervised query (seeds {cfg.sweep_seeds})",
            "",
            "Test split, %. Attention metrics of the last answer token (`last`) as in the table; `all` supervises the "
            "mean of every answer token's KL. lambda = 0 is the NTP run.",
            "",
            "| lambda | query | Exact (TF) | Point (answer) | Mass (answer) | Mass (prompt) |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
        for v in res["sweep"].values():
            groups.setdefault((v["lambda"], v["query"]), []).append(v)
        for (w, q), vs in sorted(groups.items()):
            cells = [
                repro.fmt(*repro.mean_std([v[k] for v in vs]))
                for k in ("exact_tf", "pointing", "evidence_mass", "prompt_last_mass")
            ]
            lines.append(f"| {w:g} | {q} | " + " | ".join(cells) + " |")
        lines.append("")
    if res.get("extra"):
        lines += [
            "## Investigation runs",
            "",
            "Test split, %, one seed each; compare with the runs of the same task and seed in the sweep (lambda 0 is "
            f"NTP; lambda 1 / `last` is NTP + KLAL; directories under `{cfg.run_dir}/`).",
            "",
            "| task | run | lambda | query | layers | Exact (TF) | Point (answer) | Mass (answer) | Point (prompt) "
            "| Mass (prompt) |",
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for v in res["extra"]:
            lines.append(
                f"| {v['task']} | {v['run']} | {v['lambda']:g} | {v['query']} | {v['layers']} | "
                + " | ".join(
                    repro.fmt(v[k]) for k in ("exact_tf", "pointing", "evidence_mass", "prompt_pointing", "prompt_mass")
                )
                + " |"
            )
        lines.append("")
    probe_lines = []
    for task, t in res["tasks"].items():
        for label, methods in t["probes"].items():
            for name, m in methods.items():
                acc = "—" if m.get("answer_acc") is None else f"{100 * m['answer_acc']:.1f}"
                err = f" ({m['error'][:60]})" if m.get("error") else ""
                probe_lines.append(
                    f"| {task} | {label} | {name}{err} | {repro.fmt(m['pointing'])} | {repro.fmt(m['evidence_mass'])} "
                    f"| {acc} | {m['s_per_sample']:.2f} |"
                )
    lines += render_paired(cfg, res.get("paired") or {})
    lines += render_items(cfg, res.get("items") or {})
    lines += render_tokens(res.get("tokens") or {})
    lines += render_leak(cfg, res.get("leak") or {})
    lines += ["## Training-free probes", ""]
    if probe_lines:
        lines += [
            f"Models: {cfg.probe_arms} (trained seeds {cfg.probe_seeds}). Test samples per row: {cfg.probe_samples}. "
            "Maps (image 0) scored like the table (pointing game, mass inside the evidence cells); answer accuracy for "
            "methods that answer; wall seconds per sample on this CPU.",
            "",
            "| task | model | method | Point | Mass | answer acc | s/sample |",
            "|---|---|---|---:|---:|---:|---:|",
            *probe_lines,
            "",
        ]
    else:
        lines += [
            "Not run yet: `--stages probes,report`."
            if cfg.probe_arms
            else "Not part of this study (`probe_arms: []`).",
            "",
        ]
    times = [x for t in res["tasks"].values() for v in t.get("train_s", {}).values() for x in v]
    if times:
        lines.append(f"Training time per run: {np.mean(times):.0f} s mean (CPU, {platform.machine()}).")
    if res.get("packages"):
        pkgs = ", ".join(f"{k} {v}" for k, v in res["packages"].items() if k != "cpu")
        lines.append(f"Report written on: {res['packages'].get('cpu', '?')}; {pkgs}.")
    return "\n".join(lines) + "\n"


def render_protocol(record: dict[str, Any] | None) -> list[str]:
    """Markdown lines: the protocol this study ran under (:mod:`studies.reproduce.protocol`)."""
    if not record:
        return []
    if record["confirmatory"]:
        return [
            f"**Confirmatory study.** Config `{record['config']}`, git blob {record['blob']}, committed in "
            f"{record['commit']} ({record['commit_date']}), a commit without any result of this study; checked "
            f"unchanged at {record['checked_at']}.",
            "",
        ]
    against = ", ".join(f"`{p}`" for p in record["checked_against"]) or "none shares a task with it"
    return [
        f"Pilot (not confirmatory): its data seeds and dataset folders differ from every confirmatory config of its "
        f"tasks ({against}).",
        "",
    ]


def write_predictions(cfg: StudyConfig, out: Path) -> list[Path]:
    """Per-item predictions of every evaluated main run and of Base: ``predictions/<task>.jsonl``, one line per
    (arm, seed, item) with ``task, arm, seed, run, id, gold, prediction, exact_tf, correct_gen``."""
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    main = repro.main_runs(cfg)
    paths = []
    for task in cfg.tasks:
        models = [("base", None, Path(cfg.run_dir) / task / "base")]
        models += [(arm, seed, repro.run_path(cfg, main[(task, arm, seed)])) for arm in cfg.arms for seed in cfg.seeds]
        lines = []
        for arm, seed, run in models:
            p = run / "eval.json"
            items = json.loads(p.read_text()).get("items") if p.is_file() else None
            for it in items or []:
                lines.append(json.dumps({"task": task, "arm": arm, "seed": seed, "run": run.name, **it}))
        path = folder / f"{task}.jsonl"
        path.write_text("".join(x + "\n" for x in lines))
        paths.append(path)
    return paths


def plot(cfg: StudyConfig, res: dict[str, Any], out_dir: Path) -> list[Path]:
    """``curves.png`` (accuracy and evidence mass vs steps, both arms, per task) and ``sweep.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = list(res["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.5), squeeze=False)
    colors = {"ntp": "tab:blue", "klal": "tab:red"}
    for j, task in enumerate(tasks):
        for arm, curves in res["tasks"][task]["curves"].items():
            steps = [p["step"] for p in curves[0]]
            for i, key in enumerate(("exact_tf", "evidence_mass")):
                vals = np.array([[p[key] for p in c] for c in curves if len(c) == len(steps)], dtype=float)
                m, s = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(steps))
                ax = axes[i, j]
                ax.plot(steps, m, color=colors.get(arm), label=f"{arm} (n={len(vals)})")
                ax.fill_between(steps, m - s, m + s, color=colors.get(arm), alpha=0.2)
        maj = res["tasks"][task].get("majority")
        if maj:
            axes[0, j].axhline(maj["accuracy"], color="grey", ls=":", label="most frequent answer (test)")
        axes[0, j].set_title(task)
        axes[0, j].set_ylabel("validation exact match (TF)")
        axes[1, j].set_ylabel("answer-token attention mass in evidence")
        axes[1, j].set_xlabel("training step")
        axes[0, j].legend(fontsize=8)
    title = (
        f"NTP vs NTP + KLAL, mean ± std over seeds {cfg.seeds} ({Path(cfg.results_dir).name}: LoRA + "
        f"{', '.join(cfg.train_extra) or 'nothing else'} trained)"
    )
    # One task column is too narrow for the title on one line.
    fig.suptitle(textwrap.fill(title, width=int(48 * len(tasks))), fontsize=11 if len(tasks) > 1 else 9)
    fig.tight_layout()
    p = out_dir / "curves.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    if res["sweep"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for q, style in (("last", "o-"), ("all", "s--")):
            pts = sorted(
                (v["lambda"], v["exact_tf"], v["evidence_mass"]) for v in res["sweep"].values() if v["query"] == q
            )
            if not pts:
                continue
            lam = sorted({x[0] for x in pts})
            acc = [np.mean([x[1] for x in pts if x[0] == w]) for w in lam]
            mass = [np.mean([x[2] for x in pts if x[0] == w]) for w in lam]
            xs = [w if w > 0 else 0.03 for w in lam]  # lambda 0 drawn at the left edge of the log axis
            axes[0].plot(xs, acc, style, label=f"query {q}")
            axes[1].plot(xs, mass, style, label=f"query {q}")
        maj = res["tasks"].get(cfg.sweep_task, {}).get("majority")
        if maj:
            axes[0].axhline(maj["accuracy"], color="grey", ls=":", label="most frequent answer")
        for ax, lab in zip(axes, ("test exact match (TF)", "answer-token mass in evidence")):
            ax.set_xscale("log")
            ax.set_xlabel("lambda (0 drawn at 0.03)")
            ax.set_ylabel(lab)
            ax.legend(fontsize=8)
        fig.suptitle(f"Sweep on {cfg.sweep_task}")
        fig.tight_layout()
        p = out_dir / "sweep.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def stage_report(
    cfg: StudyConfig, command: str, study_command: str | None = None, protocol: dict[str, Any] | None = None
) -> Path:
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = collect(cfg)
    res["protocol"] = protocol
    res["paired"] = paired_comparisons(cfg)
    res["items"] = item_comparisons(cfg)
    res["primary"] = primary_result(cfg, res["paired"], res["items"])
    res["tokens"], tokenizer = {}, None
    for task in cfg.tasks:
        if (repro.data_path(cfg, task) / "dataset_dict.json").is_file():  # a report without the data skips the rows
            tokenizer = tokenizer or repro.study_tokenizer(cfg)
            res["tokens"][task] = answer_tokens(cfg, task, tokenizer)
    write_predictions(cfg, out)
    res["command"] = command
    res["study_command"] = study_command or command
    res["config"] = _jsonable(cfg)
    res["packages"] = package_versions()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=_nan_safe))
    (out / "table.md").write_text(render_table(cfg, res, command, study_command))
    plot(cfg, res, out)
    _log(
        f"report written to {out}/ (table.md, results.json, predictions/, curves.png"
        f"{', sweep.png' if res['sweep'] else ''})"
    )
    return out / "table.md"


def package_versions() -> dict[str, str]:
    """The CPU and the versions of the packages whose numerics the runs depend on (training the tiny random model is
    chaotic enough that another CPU or release changes individual runs)."""
    from importlib.metadata import PackageNotFoundError, version

    from bench.throughput import cpu_name

    out = {"cpu": cpu_name()}
    for name in ("torch", "transformers", "peft", "lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(cfg: StudyConfig) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _nan_safe(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def _fan_out(stage: str, args: StudyRun, argv: list[str]) -> None:
    """Run one stage in ``args.jobs`` child processes (``--shard i/N``) and wait for all of them."""
    import subprocess

    if args.shard != "0/1":
        raise ValueError("--jobs and --shard cannot be combined")
    base = []
    skip = False
    for a in argv:  # drop the options the children get their own values of
        if skip:
            skip = False
            continue
        if a in ("--stages", "--jobs", "--shard"):
            skip = True
            continue
        if a.startswith(("--stages=", "--jobs=", "--shard=")):
            continue
        base.append(a)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "studies.reproduce",
                *base,
                "--stages",
                stage,
                "--shard",
                f"{i}/{args.jobs}",
            ],
            cwd=os.getcwd(),
        )
        for i in range(args.jobs)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"stage {stage}: shard exit codes {codes}")


# -- entry point -------------------------------------------------------------------------------------------------------
DEFAULT_CONFIG = str(REPO / "configs" / "repro" / "small.yaml")


@dataclass
class StudyRun:
    """Which stages to run and how; the study itself is the ``--config`` YAML (:class:`StudyConfig`)."""

    stages: str = ",".join(s for s in STAGES if s != "screen")
    """Comma-separated subset of data, train, eval, leak, screen, probes, report (they run in that order; the default
    is every stage but screen)."""
    shard: str = "0/1"
    """I/N: this process takes every N-th job of the train, eval and probes stages."""
    threads: PositiveInt = 1
    """Torch CPU threads per process."""
    workers: PositiveInt = 1
    """Data-generation processes."""
    jobs: PositiveInt = 1
    """Run the train, eval and probes stages in this many processes (shards)."""
    force: bool = False
    """Redo runs and evaluations that are already on disk."""


def study_parser(prog: str) -> Any:
    """The command line: the :class:`StudyRun` options plus every :class:`StudyConfig` key as an option, so
    ``--config FILE.yaml`` is the study file and ``--steps 10`` (or ``--set steps=10``) overrides one of its keys."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action="config", help=f"the study YAML (default {DEFAULT_CONFIG})")
    parser.add_class_arguments(StudyRun, nested_key=None, as_group=True)
    parser.add_class_arguments(StudyConfig, nested_key=None, as_group=True)
    bare_bool_flags(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> Path | None:
    """Run the chosen stages; returns the table path when the report stage ran."""
    prog = prog or "python -m studies.reproduce"
    given = list(sys.argv[1:] if argv is None else argv)
    args = normalise_flags(given)
    if not any(a == "--config" or a.startswith("--config=") for a in args) and not {"-h", "--help"} & set(args):
        args = ["--config", DEFAULT_CONFIG, *args]
    with user_errors(prog):
        keys = [f.name for f in dataclasses.fields(StudyConfig)]
        parser = study_parser(prog)
        ns = parser.instantiate(
            parse_or_fail(parser, expand_key_values(args, "--set", "", keys, "the study config"), prog)
        )
        run = StudyRun(**{f.name: ns[f.name] for f in dataclasses.fields(StudyRun)})
        config_path = next((str(c) for c in ns.get("config") or [] if c), DEFAULT_CONFIG)
        try:
            cfg = StudyConfig(**{k: ns[k] for k in keys})
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        stages = [s.strip() for s in run.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ValueError(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
        shard = _parse_shard(run.shard)
        return _run_stages(cfg, run, stages, shard, given, config_path)


def _run_stages(
    cfg: StudyConfig, run: StudyRun, stages: list[str], shard: tuple[int, int], argv: list[str], config_path: str
) -> Path | None:
    # Before anything runs: a confirmatory config committed before its results, a pilot off its data.
    protocol = protocol_record(config_path, cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    provenance = protocol if protocol and protocol["confirmatory"] else None
    torch.set_num_threads(max(1, run.threads))
    command = "python -m studies.reproduce " + " ".join(argv)
    table = None
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        if stage == "data":
            repro.make_data(cfg, workers=run.workers)
        elif stage in ("train", "eval", "leak", "probes") and run.jobs > 1:
            _fan_out(stage, run, argv)
        elif stage == "train":
            stage_train(cfg, shard, run.force, provenance)
        elif stage == "eval":
            stage_eval(cfg, shard, run.force, provenance)
        elif stage == "leak":
            stage_leak(cfg, shard, run.force, provenance)
        elif stage == "screen":
            from studies.reproduce.screen import stage_screen

            stage_screen(cfg, command, run.force)
        elif stage == "probes":
            stage_probes(cfg, shard, run.force)
        elif stage == "report":
            table = stage_report(cfg, command, f"python -m studies.reproduce --config {config_path}", protocol)
        _log(f"stage {stage} done in {time.perf_counter() - t0:.0f} s")
    return table


if __name__ == "__main__":
    main()
