"""Paired comparison of two arms: over seeds (three tests) and over test items (McNemar and a bootstrap).

The arms of a study share everything but the KLAL setting, including the seeds (LoRA initialisation and data order),
so seed ``s`` of one arm is paired with seed ``s`` of the other and the tests look at the per-seed differences:

* **paired t-test** (two-sided): ``t = mean(d) / (std(d) / sqrt(n))`` with ``n - 1`` degrees of freedom;
* **exact sign-flip permutation test** (two-sided): under the null hypothesis each difference is as likely to have
  either sign, so the p-value is the share of the ``2**n`` sign assignments whose mean is at least as far from 0 as
  the observed one (no normality assumption; with 5 seeds the smallest possible p is ``2 / 32 = 0.0625``);
* **sign test** (two-sided binomial on wins against losses, ties dropped).

Over items (the same test items scored by both arms, seed ``s`` paired with seed ``s``):

* **McNemar's exact test** (two-sided) on the pooled per-item correctness: of the (seed, item) pairs on which the two
  arms disagree, ``b`` are right only for the reference and ``c`` only for the arm; under the null hypothesis each
  disagreement goes either way with probability 1/2, so the p-value is the two-sided binomial test of ``c`` out of
  ``b + c`` (the sign test over items). Pooling over seeds treats a seed's item as a fresh pair, which the shared items
  make only approximately true: read it next to the bootstrap.
* **paired bootstrap over items**: per item, the arm's correctness minus the reference's, averaged over the seeds;
  items are resampled with replacement (a fixed seed, so the report is reproducible), giving a 95 % percentile
  interval of the mean difference and the two-sided p-value ``(1 + #{|mean* - mean| >= |mean|}) / (B + 1)`` of the
  resampled means ``mean*`` centred on the observed one.

A study config names ONE of these tests as its primary test (``primary``); the report marks it.
``python -m studies.reproduce`` puts :func:`paired_comparisons` and :func:`item_comparisons` into ``results.json``
(``paired``, ``items``) and :func:`render_paired` / :func:`render_items` into ``table.md``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
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


def mcnemar(reference: Sequence[Sequence[bool]], arm: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """McNemar's exact test on per-item correctness pooled over seeds (``reference[s][i]``: seed ``s``, item ``i``).

    Returns:
        ``{"n_pairs", "b" (right only for the reference), "c" (right only for the arm), "p"}``; ``p`` is the two-sided
        binomial test of ``c`` out of ``b + c`` (1 when the arms never disagree).

    Raises:
        ValueError: the arms have different numbers of seeds or items.
    """
    if len(reference) != len(arm):
        raise ValueError(f"McNemar needs the same seeds in both arms, got {len(reference)} and {len(arm)}")
    b = c = n = 0
    for ref_s, arm_s in zip(reference, arm):
        if len(ref_s) != len(arm_s):
            raise ValueError(f"McNemar needs the same items in both arms, got {len(ref_s)} and {len(arm_s)}")
        for r, a in zip(ref_s, arm_s):
            n += 1
            b += bool(r) and not a
            c += bool(a) and not r
    # The exact McNemar test is the sign test on the discordant pairs.
    return {"n_pairs": n, "b": b, "c": c, "p": sign_test_p([1.0] * c + [-1.0] * b)}


def bootstrap_items(
    reference: Sequence[Sequence[bool]], arm: Sequence[Sequence[bool]], samples: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap over items of the mean accuracy difference (arm - reference), seeds averaged per item.

    Returns:
        ``{"n_items", "mean_diff", "ci_low", "ci_high" (95 % percentile interval), "p", "samples", "seed"}``.

    Raises:
        ValueError: the arms have different numbers of seeds or items, or no items.
    """
    ref, alt = np.asarray(reference, dtype=np.float64), np.asarray(arm, dtype=np.float64)
    if ref.shape != alt.shape or ref.ndim != 2 or ref.shape[1] == 0:
        raise ValueError(f"bootstrap needs (seeds, items) arrays of one shape, got {ref.shape} and {alt.shape}")
    d = (alt - ref).mean(0)
    observed = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // len(d))  # resample in chunks: samples x items indices at once can be large
    for start in range(0, samples, chunk):
        k = min(chunk, samples - start)
        means[start : start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(1)
    # The tolerance keeps resampled means equal to the observed one up to rounding in the count (as sign_flip_p).
    far = np.abs(means - observed) >= abs(observed) - 1e-12 * max(1.0, abs(observed))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "n_items": len(d),
        "mean_diff": observed,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p": float((1 + far.sum()) / (samples + 1)),
        "samples": samples,
        "seed": seed,
    }


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
    """Every arm against ``reference`` (default: :func:`studies.reproduce.pipeline.reference_arm`), per task.

    Only seeds evaluated in both arms are paired. Returns ``{task: {"reference", "seeds", "per_seed": {arm: {seed:
    {key: value}}}, "vs": {arm: {key: compare(...)}}}}``.
    """
    reference = reference or repro.reference_arm(cfg)
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


ITEM_FIELDS = {"exact_tf": "exact_tf", "answer_acc_gen": "correct_gen"}
"""Metric -> the per-item field of ``eval.json``'s ``items`` that says whether the item was answered right."""


def item_comparisons(cfg: StudyConfig, reference: str | None = None) -> dict[str, Any]:
    """Every arm against ``reference`` over the test items: McNemar (pooled over seeds) and the paired bootstrap.

    Uses the seeds whose evaluation holds per-item results in both arms. Returns ``{task: {"reference", "vs": {arm:
    {"seeds", metric: {"n_items", "accuracy": [reference, arm], "mcnemar": ..., "bootstrap": ...}}}}}``.

    Raises:
        ValueError: the two arms were scored on different items (ids differ).
    """
    reference = reference or repro.reference_arm(cfg)
    out: dict[str, Any] = {}
    for task in cfg.tasks:
        evals = {arm: per_seed(cfg, task, arm) for arm in cfg.arms}
        t: dict[str, Any] = {"reference": reference, "vs": {}}
        for arm in cfg.arms:
            if arm == reference:
                continue
            seeds = [s for s in cfg.seeds if all("items" in evals[a].get(s, {}) for a in (reference, arm))]
            if not seeds:
                continue
            v: dict[str, Any] = {"seeds": seeds}
            for s in seeds:
                ids = [[it["id"] for it in evals[a][s]["items"]] for a in (reference, arm)]
                if ids[0] != ids[1]:
                    raise ValueError(f"{task}: seed {s} of {arm} and {reference} were scored on different test items")
            for metric, key in ITEM_FIELDS.items():
                ref = [[it.get(key) for it in evals[reference][s]["items"]] for s in seeds]
                alt = [[it.get(key) for it in evals[arm][s]["items"]] for s in seeds]
                if any(x is None for row in ref + alt for x in row) or not ref[0]:
                    continue  # not measured (generation switched off)
                v[metric] = {
                    "n_items": len(ref[0]),
                    "accuracy": [float(np.mean(ref)), float(np.mean(alt))],
                    "mcnemar": mcnemar(ref, alt),
                    "bootstrap": bootstrap_items(ref, alt, cfg.bootstrap_samples, cfg.bootstrap_seed),
                }
            t["vs"][arm] = v
        out[task] = t
    return out


SEED_TESTS = {"t": "p_t", "sign_flip": "p_sign_flip", "sign": "p_sign"}
"""Over-seeds test name (``primary.test``) -> its p-value key in :func:`compare`'s result."""


def primary_result(cfg: StudyConfig, paired: dict[str, Any], items: dict[str, Any]) -> dict[str, Any] | None:
    """The outcome of the config's one primary test (None without ``primary``; ``p`` None until both arms are
    evaluated)."""
    pt = cfg.primary
    if pt is None:
        return None
    task = repro.primary_task(cfg)
    out: dict[str, Any] = {
        "task": task,
        "arm": pt.arm,
        "reference": repro.reference_arm(cfg),
        "metric": pt.metric,
        "test": pt.test,
        "alpha": pt.alpha,
        "p": None,
        "mean_diff": None,
    }
    if pt.test in SEED_TESTS:
        c = paired.get(task, {}).get("vs", {}).get(pt.arm, {}).get(pt.metric)
        if c:
            out.update(p=c[SEED_TESTS[pt.test]], mean_diff=c["mean_diff"], n=c["n"])
    else:
        c = items.get(task, {}).get("vs", {}).get(pt.arm, {}).get(pt.metric)
        if c:
            out.update(p=c[pt.test]["p"], mean_diff=c["bootstrap"]["mean_diff"], n=c["n_items"])
    if out["p"] is not None and not math.isnan(out["p"]):
        out["significant"] = bool(out["p"] < pt.alpha)
    return out


def _mark(cfg: StudyConfig, task: str, arm: str, metric: str, test: str) -> str:
    """`` **(primary)**`` on the cell of the config's primary test."""
    pt = cfg.primary
    if pt is not None and (repro.primary_task(cfg), pt.arm, pt.metric, pt.test) == (task, arm, metric, test):
        return " **(primary)**"
    return ""


def render_primary(res: dict[str, Any] | None) -> list[str]:
    """Markdown lines stating the primary test and its outcome."""
    if res is None:
        return ["Primary test: none declared (`primary` in the study config); every p-value below is exploratory.", ""]
    head = (
        f"**Primary test** (declared in the config): {res['test']} on `{res['metric']}`, {res['arm']} vs "
        f"{res['reference']}, task {res['task']}, two-sided, alpha {res['alpha']:g}: "
    )
    if res["p"] is None:
        return [head + "not evaluated yet.", ""]
    verdict = "significant" if res.get("significant") else "not significant"
    return [head + f"difference {100 * res['mean_diff']:+.2f} points, p = {_p(res['p'])} ({verdict}).", ""]


def render_items(cfg: StudyConfig, items: dict[str, Any]) -> list[str]:
    """Markdown lines: each arm against the reference over the test items (McNemar and bootstrap)."""
    rows = []
    for task, t in items.items():
        for arm, v in t["vs"].items():
            for metric in ITEM_FIELDS:
                c = v.get(metric)
                if not c:
                    continue
                m, b = c["mcnemar"], c["bootstrap"]
                rows.append(
                    f"| {task} | {arm} vs {t['reference']} | {metric} | {c['n_items']} x {len(v['seeds'])} | "
                    f"{100 * c['accuracy'][0]:.1f} | {100 * c['accuracy'][1]:.1f} | {m['b']} / {m['c']} | "
                    f"{_p(m['p'])}{_mark(cfg, task, arm, metric, 'mcnemar')} | {100 * b['mean_diff']:+.2f} | "
                    f"[{100 * b['ci_low']:+.2f}, {100 * b['ci_high']:+.2f}] | "
                    f"{_p(b['p'])}{_mark(cfg, task, arm, metric, 'bootstrap')} |"
                )
    if not rows:
        return []
    return [
        "## Over test items: McNemar and paired bootstrap",
        "",
        "Per-item correctness of the same test items (files under `predictions/`). *b / c*: (seed, item) pairs right "
        "only for the reference / only for the arm, pooled over the seeds; McNemar's exact two-sided p. Bootstrap: "
        f"per item the arm's correctness minus the reference's, averaged over seeds; {cfg.bootstrap_samples} "
        f"resamples of the items (seed {cfg.bootstrap_seed}), 95 % percentile interval and two-sided p "
        "(`studies.reproduce.stats`).",
        "",
        "| task | comparison | metric | items x seeds | reference % | arm % | b / c | p (McNemar) | diff (points) "
        "| 95 % CI | p (bootstrap) |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---|---:|",
        *rows,
        "",
    ]


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
                cells = [f"{_p(c[key])}{_mark(cfg, task, a, k, test)}" for test, key in SEED_TESTS.items()]
                lines.append(
                    f"| {a} | {k} | {c['n']} | {diff} | {c['wins']} / {c['losses']} / {c['ties']} | "
                    + " | ".join(cells)
                    + " |"
                )
        lines.append("")
    return lines
