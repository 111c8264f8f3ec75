"""Paired comparison of two arms over seeds: every seed's numbers, the mean difference and three significance tests.

The arms of a study share everything but the KLAL setting, including the seeds (LoRA initialisation and data order),
so seed ``s`` of one arm is paired with seed ``s`` of the other and the tests look at the per-seed differences:

* **paired t-test** (two-sided): ``t = mean(d) / (std(d) / sqrt(n))`` with ``n - 1`` degrees of freedom;
* **exact sign-flip permutation test** (two-sided): under the null hypothesis each difference is as likely to have
  either sign, so the p-value is the share of the ``2**n`` sign assignments whose mean is at least as far from 0 as
  the observed one (no normality assumption; with 5 seeds the smallest possible p is ``2 / 32 = 0.0625``);
* **sign test** (two-sided binomial on wins against losses, ties dropped).

``python -m studies.reproduce`` puts :func:`paired_comparisons` into ``results.json`` (``paired``) and
:func:`render_paired` into ``table.md``.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np

from studies.reproduce import pipeline as repro
from studies.reproduce.pipeline import StudyConfig

PAIRED_KEYS = ("exact_tf", "answer_acc_gen", "last/evidence_mass", "prompt_last/evidence_mass")
"""Metrics compared between arms (those of ``eval.json``)."""


def paired_t_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired t-test on the differences (NaN for fewer than 2; 0 or 1 when all are equal)."""
    from scipy.stats import t as student_t

    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return float("nan")
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    stat = d.mean() / (sd / math.sqrt(len(d)))
    return float(2 * student_t.sf(abs(stat), df=len(d) - 1))


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean difference (NaN for no differences)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return float("nan")
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))  # (2**n, n)
    means = np.abs((signs * d).mean(1))
    # A relative tolerance keeps assignments whose mean equals the observed one up to rounding in the count.
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def sign_test_p(diffs: list[float]) -> float:
    """Two-sided binomial sign test on positive against negative differences, ties dropped (1 when all tie)."""
    from scipy.stats import binomtest

    pos = sum(x > 0 for x in diffs)
    neg = sum(x < 0 for x in diffs)
    if pos + neg == 0:
        return 1.0
    return float(binomtest(pos, pos + neg, 0.5).pvalue)


def compare(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired statistics of ``b - a`` (same seeds in the same order).

    Returns:
        ``{"n", "diffs", "mean_diff", "std_diff", "wins", "losses", "ties", "p_t", "p_sign_flip", "p_sign"}``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same seeds in both arms, got {len(a)} and {len(b)} values")
    d = [float(y - x) for x, y in zip(a, b)]
    return {
        "n": len(d),
        "diffs": d,
        "mean_diff": float(np.mean(d)) if d else float("nan"),
        "std_diff": float(np.std(d, ddof=1)) if len(d) > 1 else float("nan"),
        "wins": sum(x > 0 for x in d),
        "losses": sum(x < 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "p_t": paired_t_p(d),
        "p_sign_flip": sign_flip_p(d),
        "p_sign": sign_test_p(d),
    }


def per_seed(cfg: StudyConfig, task: str, arm: str) -> dict[int, dict[str, Any]]:
    """``seed -> eval.json`` of one arm's main runs that have been evaluated."""
    runs = repro.main_runs(cfg)
    out = {}
    for seed in cfg.seeds:
        p = repro.run_path(cfg, runs[(task, arm, seed)]) / "eval.json"
        if p.is_file():
            out[seed] = json.loads(p.read_text())
    return out


def paired_comparisons(cfg: StudyConfig, reference: str | None = None) -> dict[str, Any]:
    """Every arm against ``reference`` (default: the arm with ``klal_weight`` 0, else the first arm), per task.

    Only seeds evaluated in both arms are paired. Returns ``{task: {"reference", "seeds", "per_seed": {arm: {seed:
    {key: value}}}, "vs": {arm: {key: compare(...)}}}}``.
    """
    if reference is None:
        reference = next((a for a, v in cfg.arms.items() if float(v["klal_weight"]) == 0), next(iter(cfg.arms)))
    out: dict[str, Any] = {}
    for task in cfg.tasks:
        evals = {arm: per_seed(cfg, task, arm) for arm in cfg.arms}
        t: dict[str, Any] = {
            "reference": reference,
            "per_seed": {
                arm: {s: {k: e.get(k) for k in PAIRED_KEYS} for s, e in ev.items()} for arm, ev in evals.items()
            },
            "vs": {},
        }
        for arm in cfg.arms:
            if arm == reference:
                continue
            seeds = [s for s in cfg.seeds if s in evals[reference] and s in evals[arm]]
            t["vs"][arm] = {"seeds": seeds}
            for k in PAIRED_KEYS:
                a = [evals[reference][s].get(k) for s in seeds]
                b = [evals[arm][s].get(k) for s in seeds]
                if seeds and all(isinstance(v, (int, float)) for v in a + b):
                    t["vs"][arm][k] = compare(a, b)
        out[task] = t
    return out


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def render_paired(cfg: StudyConfig, paired: dict[str, Any]) -> list[str]:
    """Markdown lines: every seed of every arm, then each arm against the reference with the three tests."""
    if not paired or not any(t["per_seed"].get(a) for t in paired.values() for a in cfg.arms):
        return []
    lines = [
        "## Every seed, and paired tests against the reference arm",
        "",
        "Exact (TF) in % per seed (Gen in brackets when measured). Paired over the same seeds: mean ± std of the "
        "per-seed difference (arm - reference, points), wins / losses / ties, and two-sided p-values of the paired "
        "t-test, the exact sign-flip permutation test and the sign test (module `studies.reproduce.stats`).",
        "",
    ]
    for task, t in paired.items():
        ref = t["reference"]
        arms = [a for a in cfg.arms if t["per_seed"].get(a)]
        seeds = sorted({s for a in arms for s in t["per_seed"][a]})
        lines += [f"### {task}", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
        lines.append("|---|" + "---:|" * len(seeds))
        for a in arms:
            cells = []
            for s in seeds:
                v = t["per_seed"][a].get(s)
                if v is None:
                    cells.append("—")
                    continue
                gen = v.get("answer_acc_gen")
                cells.append(f"{100 * v['exact_tf']:.1f}" + (f" ({100 * gen:.1f})" if gen is not None else ""))
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"| arm vs {ref} | metric | n | diff (points) | wins / losses / ties | p (t) | p (sign-flip) | p (sign) |",
            "|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for a, v in t["vs"].items():
            for k in PAIRED_KEYS:
                c = v.get(k)
                if not c:
                    continue
                diff = f"{100 * c['mean_diff']:+.1f}" + (
                    f" ± {100 * c['std_diff']:.1f}" if not math.isnan(c["std_diff"]) else ""
                )
                lines.append(
                    f"| {a} | {k} | {c['n']} | {diff} | {c['wins']} / {c['losses']} / {c['ties']} | {_p(c['p_t'])} "
                    f"| {_p(c['p_sign_flip'])} | {_p(c['p_sign'])} |"
                )
        lines.append("")
    return lines
