"""The testbed screen (issue 30): what every candidate task passes before a confirmatory study of it.

A study of KLAL against NTP can only show an effect where (1) the base can read the answer from the object at all,
(2) looking at the right object is what the fine-tuned model lacks, and (3) NTP alone leaves room. The ``screen`` stage
of ``python -m studies.reproduce`` measures each, per task, with the thresholds of
:class:`studies.reproduce.pipeline.ScreenSettings` (the config's ``screen:``):

1. **Readout**: the untrained base, on one-object images drawn by the task's generator with ``readout_overrides`` and
   asked in the task's phrasing, scored by teacher-forced exact match (= greedy exact match); the greedy answers are
   kept, with the share naming a colour the task answers and the share naming the marker / selector colour.
2. **Oracle gain and control**: on each NTP model of the study (the reference arm, every seed), the oracle of
   :func:`studies.reproduce.diagnose.oracle` adds ``beta`` to the last prompt token's attention scores on the
   asked-for object's visual tokens (every layer and head) and scores the first ``samples`` test items; the control
   adds it on another object of the image instead. ``beta`` 0 is the model as it is. The oracle's beta is the one of
   ``betas`` with the best mean accuracy over seeds; the control is read at that beta.
3. **NTP gap**: the NTP models' test accuracy from the ``eval`` stage (``test_samples`` items) against the oracle's.

With the oracle run on the NTP models themselves, (2) and (3) compare the same oracle with the same models, on
``samples`` items in (2) and on the eval's ``test_samples`` in (3); both are reported. It writes
``results_dir/screen.md`` (its own table: every number, each criterion's verdict, the reference rows) and
``screen.json``, and per item the base's readout answers and the NTP runs' test answers
(``screen_predictions/<task>.jsonl``); each run's oracle is cached in its folder (``screen.json``), the readout in
the run folder of Base.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from studies.reproduce import pipeline as repro
from studies.reproduce.baselines import baselines
from studies.reproduce.pipeline import ScreenSettings, StudyConfig


def readout_path(cfg: StudyConfig, task: str) -> Path:
    """Folder of the task's one-object images (beside its dataset)."""
    return repro.data_path(cfg, task).with_name(repro.data_path(cfg, task).name + "_readout")


def readout_rows(cfg: StudyConfig, task: str):
    """The task's one-object images (``screen.readout_samples``, test split), generated unless they are on disk with
    the same generator settings, seed and answer rendering."""
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset, read_manifest
    from klal.data.io import load_split

    s = cfg.screen
    base = repro.generator(cfg, task)
    config = {**dataclasses.asdict(base.config), **s.readout_overrides}
    gen = build_task(task, overrides={k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    path = readout_path(cfg, task)
    # Two items go to the train and validation splits the writer needs; the rest is the test split that is scored.
    num = s.readout_samples + 2
    splits = (1 / num, 1 / num, 1 - 2 / num)
    want = {"config": json.loads(json.dumps(dataclasses.asdict(gen.config))), "seed": s.readout_seed, "num": num}
    fresh = (
        (path / "dataset_dict.json").is_file()
        and all(read_manifest(path).get(k) == v for k, v in want.items())
        and read_manifest(path).get("answer_render", "as_generated") == cfg.answer_render
    )
    if not fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        generate_dataset(gen, num=num, seed=s.readout_seed, out=path, splits=splits, progress=False, overwrite=True)
        if cfg.answer_render != "as_generated":
            repro.render_dataset_answers(path, cfg.answer_render, repro.study_tokenizer(cfg))
    return load_split(path, "test", s.readout_samples)


def readout(cfg: StudyConfig, task: str, force: bool = False) -> dict[str, Any]:
    """Criterion 1 on the untrained base (cached in ``run_dir/<task>/base/readout.json``).

    Returns:
        ``{"n", "exact" (teacher-forced exact match), "answers_a_fill" / "names_selector" (shares of the greedy answers
        naming one of the task's answers / the object's selector colour, the meta's ``query_word``), "items",
        "phrasings": {phrasing: the same numbers, the images asked with ``screen.readout_phrasings``}}``.
    """
    path = Path(cfg.run_dir) / task / "base" / "readout.json"
    fp = {"screen": dataclasses.asdict(cfg.screen), "render": cfg.answer_render, "backbone": cfg.backbone, "v": 2}
    if path.is_file() and not force:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fp:
            return cached
    rows = readout_rows(cfg, task)
    module = repro.build_module(cfg)
    answers = {a.strip() for a in repro.generator(cfg, task).answer_classes() or []}
    # The selector colour of each image, read before a phrasing without it drops it from the meta.
    selectors = [str(repro.parse_meta(x).get("query_word", "")) for x in rows["meta"]]
    out = {**_readout_scores(cfg, module, rows, answers, selectors), "fingerprint": fp, "phrasings": {}}
    for phrasing in cfg.screen.readout_phrasings.get(task, []):
        asked = rows.map(lambda r, q=phrasing: _rephrase(r, q))
        out["phrasings"][phrasing] = _readout_scores(cfg, module, asked, answers, selectors)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def _rephrase(row: dict[str, Any], phrasing: str) -> dict[str, Any]:
    """``row`` asked with ``phrasing`` (``{selector}``: the meta's ``query_word``, which is dropped from the meta when
    the phrasing does not name it, as the collator looks for it in the question)."""
    meta = repro.parse_meta(row["meta"])
    selector = meta.get("query_word", "")
    if "{selector}" not in phrasing:
        meta.pop("query_word", None)
    return {"question": phrasing.format(selector=selector), "meta": json.dumps(meta)}


def _readout_scores(cfg: StudyConfig, module: Any, rows: Any, answers: set[str], selector: list[str]) -> dict[str, Any]:
    """Teacher-forced exact match of ``rows`` and what the greedy answers name (see :func:`readout`); ``selector``: each
    image's selector colour."""
    m = repro.evaluate_model(module, rows, batch_size=cfg.eval_batch_size, generate=True, max_new_tokens=4)
    first = [(it["prediction"] or "").strip().split(" ")[0] for it in m["items"]]
    return {
        "n": m["n"],
        "exact": m["exact_tf"],
        "answers_a_fill": float(np.mean([f in answers for f in first])),
        "names_selector": float(np.mean([bool(q) and f == q for f, q in zip(first, selector)])),
        "items": m["items"],
    }


def run_oracle(cfg: StudyConfig, spec: repro.RunSpec, force: bool = False) -> dict[str, Any]:
    """Criterion 2 on one trained NTP run: :func:`studies.reproduce.diagnose.oracle` at beta 0 and ``screen.betas``
    on the first ``screen.samples`` test items (cached in the run's folder, ``screen.json``)."""
    from studies.reproduce.diagnose import oracle

    path = repro.run_path(cfg, spec) / "screen.json"
    betas = (0.0, *(float(b) for b in cfg.screen.betas))
    fp = {"samples": cfg.screen.samples, "betas": list(betas), "render": cfg.answer_render, "first": True}
    if path.is_file() and not force:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fp:
            return cached
    if not (repro.run_path(cfg, spec) / "trainable.pt").is_file():
        raise FileNotFoundError(f"run {spec.task}/{spec.name} is not trained yet: run --stages train first")
    rows = repro.task_split(cfg, spec.task, "test", cfg.screen.samples)
    tokenizer = repro.study_tokenizer(cfg)
    out = oracle(
        repro.load_trained(cfg, spec),
        rows,
        betas,
        render=lambda a: repro.render_answer(a, cfg.answer_render, tokenizer),
    )
    out["fingerprint"] = fp
    path.write_text(json.dumps(out, indent=1))
    return out


def judge(readout_exact: float, gain: float, control_gain: float, gap: float, s: ScreenSettings) -> dict[str, Any]:
    """Each criterion's verdict and the task's (all three must hold).

    Returns:
        ``{"readout", "oracle_gain", "control", "ntp_gap"}`` booleans and ``"passed"``, plus ``"failed"``: the names
        of the criteria that did not hold.
    """
    checks = {
        "readout": readout_exact >= s.min_readout,
        "oracle_gain": gain >= s.min_gain,
        "control": control_gain < s.max_control_gain,
        "ntp_gap": gap >= s.min_gap,
    }
    return {**checks, "passed": all(checks.values()), "failed": [k for k, ok in checks.items() if not ok]}


def screen_task(cfg: StudyConfig, task: str, force: bool = False) -> dict[str, Any]:
    """Every number of the screen for one task, and its verdict (module docstring)."""
    ref = repro.reference_arm(cfg)
    specs = [spec for (t, arm, _), spec in repro.main_runs(cfg).items() if t == task and arm == ref]
    t0 = time.perf_counter()
    base = readout(cfg, task, force)
    per_seed = [run_oracle(cfg, spec, force) for spec in specs]
    betas = per_seed[0]["betas"]
    acc = np.array([o["exact"] for o in per_seed])  # (seeds, betas)
    ctrl = np.array([o["control_exact"] for o in per_seed])
    other = np.array([o["control_other"] for o in per_seed])
    best = 1 + int(np.argmax(acc[:, 1:].mean(0)))  # index into betas; 0 is the unbiased model
    evals = []
    for spec in specs:
        p = repro.run_path(cfg, spec) / "eval.json"
        if not p.is_file():
            raise FileNotFoundError(f"run {task}/{spec.name} has no evaluation: run --stages eval first")
        evals.append(json.loads(p.read_text())["exact_tf"])
    # What the models answer: the share of the screen items given each run's most frequent first answer token, without
    # and with the oracle (a model that answers one constant cannot show any oracle effect).
    top = [
        max(np.unique(o["first"][i], return_counts=True)[1]) / len(o["first"][i]) for o in per_seed for i in (0, best)
    ]
    gain = float(np.mean(acc[:, best] - acc[:, 0]))
    control_gain = float(np.mean(ctrl[:, best] - acc[:, 0]))
    gap = float(np.mean(acc[:, best]) - np.mean(evals))
    out = {
        "task": task,
        "arm": ref,
        "seeds": [s.seed for s in specs],
        "refs": baselines(cfg, task),
        "readout": {
            **{k: v for k, v in base.items() if k not in ("items", "phrasings")},
            "phrasings": {q: {k: v for k, v in x.items() if k != "items"} for q, x in base["phrasings"].items()},
        },
        "betas": betas,
        "beta": betas[best],
        "plain": acc[:, 0].tolist(),
        "oracle": acc[:, best].tolist(),
        "control": ctrl[:, best].tolist(),
        "control_names_other": other[:, best].tolist(),
        "per_beta": {"exact": acc.tolist(), "control_exact": ctrl.tolist(), "control_other": other.tolist()},
        "ntp_test": evals,
        "top_answer_share": top[0::2],
        "top_answer_share_oracle": top[1::2],
        "oracle_gain": gain,
        "control_gain": control_gain,
        "ntp_gap": gap,
        "samples": per_seed[0]["n"],
        "test_samples": cfg.test_samples,
        "verdict": judge(base["exact"], gain, control_gain, gap, cfg.screen),
        "screen_s": time.perf_counter() - t0,
    }
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(xs: list[float]) -> str:
    return repro.fmt(*repro.mean_std(list(xs)))


def _table(intro: str, columns: list[str], text_columns: int = 1) -> list[str]:
    """Markdown lines: a paragraph, then a table head (the first ``text_columns`` left-aligned, numbers right)."""
    aligns = ["---"] * text_columns + ["---:"] * (len(columns) - text_columns)
    return ["", intro, "", "| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|"]


def render(cfg: StudyConfig, result: dict[str, dict[str, Any]], command: str) -> str:
    """``screen.md``: the screen's table (one row per task) and the oracle per beta."""
    s = cfg.screen
    ok = lambda b: "pass" if b else "**fail**"  # noqa: E731
    lines = [
        "# Testbed screen (`studies/reproduce/screen.py`)",
        "",
        f"Command: `{command}`. Base `{cfg.backbone}`; NTP arm `{repro.reference_arm(cfg)}` trained on each task's "
        f"training split (seeds {cfg.seeds}).",
        "",
        f"Criteria: (1) the untrained base's teacher-forced exact match on {s.readout_samples} one-object images "
        f"(generator overrides {s.readout_overrides}, the task's phrasing) >= {_pct(s.min_readout)} %; (2) the "
        f"oracle (bias beta on the last prompt token's scores over the asked-for object's visual tokens, every "
        f"layer; best beta of {s.betas} by mean over seeds) raises the NTP models' accuracy on the first "
        f"{s.samples} test items by >= {_pct(s.min_gain)} points over the same models without it, and the same "
        f"bias on another object (control) by < {_pct(s.max_control_gain)}; (3) the NTP models' test accuracy "
        f"({cfg.test_samples} items, stage eval) is >= {_pct(s.min_gap)} points below the oracle's. *NTP's most "
        "frequent answer*: the share of the screen items given each NTP model's most frequent first answer token "
        "(100 %: one constant answer). Accuracies in %, mean ± std over seeds.",
        "",
        "| task | chance | most frequent | question-blind | (1) base readout | NTP (test) | NTP, screen items | "
        "NTP's most frequent answer | oracle | (2) oracle gain | control | control gain | control answers the other "
        "object | (3) NTP gap | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, r in result.items():
        refs, v = r["refs"] or {}, r["verdict"]
        qb = refs.get("question_blind") or {}
        verdict = "**pass**" if v["passed"] else "fail: " + ", ".join(v["failed"])
        lines.append(
            f"| {task} | {_pct(refs['chance']['accuracy']) if refs else '—'} | "
            f"{_pct(refs['majority']['accuracy']) if refs else '—'} | "
            f"{_pct(qb['accuracy']) if qb else '—'} | {_pct(r['readout']['exact'])} ({ok(v['readout'])}) | "
            f"{_mean_std(r['ntp_test'])} | {_mean_std(r['plain'])} | {_mean_std(r['top_answer_share'])} | "
            f"{_mean_std(r['oracle'])} (beta {r['beta']:g}) | "
            f"{100 * r['oracle_gain']:+.1f} ({ok(v['oracle_gain'])}) | {_mean_std(r['control'])} | "
            f"{100 * r['control_gain']:+.1f} ({ok(v['control'])}) | {_mean_std(r['control_names_other'])} | "
            f"{100 * r['ntp_gap']:+.1f} ({ok(v['ntp_gap'])}) | {verdict} |"
        )
    lines += _table(
        "Base readout on the one-object images: with the task's phrasing (criterion 1) and with the other phrasings of "
        "`screen.readout_phrasings` (`{selector}` = the named colour; not a criterion: they tell a phrasing the base "
        "does not follow from a colour it does not read). Greedy answers naming one of the task's answers / the "
        "selector colour the question gives (the marker's):",
        ["task", "phrasing", "items", "exact", "answers a fill colour", "names the selector"],
        text_columns=2,
    )
    for task, r in result.items():
        b = r["readout"]
        for q, v in [("the task's (criterion 1)", b), *(b.get("phrasings") or {}).items()]:
            lines.append(
                f"| {task} | {q} | {v['n']} | {_pct(v['exact'])} | {_pct(v['answers_a_fill'])} | "
                f"{_pct(v['names_selector'])} |"
            )
    lines += _table(
        "Oracle per beta (mean over seeds; beta 0 = the model as it is): accuracy with the bias on the asked-for "
        "object / on another object (still the asked-for answer) / on another object, first answer token = that "
        "object's colour:",
        ["task", "beta", "asked", "control", "control answers the other"],
    )
    for task, r in result.items():
        pb = r["per_beta"]
        for i, b in enumerate(r["betas"]):
            cells = [_mean_std([x[i] for x in pb[k]]) for k in ("exact", "control_exact", "control_other")]
            lines.append(f"| {task} | {b:g} | " + " | ".join(cells) + " |")
    dropped = [t for t, r in result.items() if not r["verdict"]["passed"]]
    lines += [
        "",
        f"Passed: {', '.join(t for t in result if t not in dropped) or 'none'}. Dropped (not studied): "
        f"{', '.join(dropped) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def stage_screen(cfg: StudyConfig, command: str, force: bool = False) -> Path:
    """Screen every task of the study; writes ``results_dir/screen.md`` and ``screen.json``; returns the table."""
    result = {}
    for task in cfg.tasks:
        result[task] = screen_task(cfg, task, force)
        r = result[task]
        print(
            f"screen {task}: readout {r['readout']['exact']:.3f}, oracle gain {r['oracle_gain']:+.3f} "
            f"(beta {r['beta']:g}), control gain {r['control_gain']:+.3f}, NTP gap {r['ntp_gap']:+.3f}: "
            f"{'pass' if r['verdict']['passed'] else 'fail ' + ','.join(r['verdict']['failed'])}",
            flush=True,
        )
    out = Path(cfg.results_dir)
    (out / "screen_predictions").mkdir(parents=True, exist_ok=True)
    for task in cfg.tasks:
        # Per item: the base's readout answers, and the NTP runs' test answers the gap is computed from.
        base = readout(cfg, task)
        lines = [{"part": "readout", "arm": "base", "seed": None, **it} for it in base["items"]]
        for q, x in base["phrasings"].items():
            lines += [{"part": f"readout: {q}", "arm": "base", "seed": None, **it} for it in x["items"]]
        ref = repro.reference_arm(cfg)
        for (t, arm, seed), spec in repro.main_runs(cfg).items():
            if t == task and arm == ref:
                items = json.loads((repro.run_path(cfg, spec) / "eval.json").read_text())["items"]
                lines += [{"part": "test", "arm": arm, "seed": seed, **it} for it in items]
        text = "".join(json.dumps({"task": task, **x}) + "\n" for x in lines)
        (out / "screen_predictions" / f"{task}.jsonl").write_text(text)
    (out / "screen.json").write_text(json.dumps({"command": command, "screen": result}, indent=1))
    (out / "screen.md").write_text(render(cfg, result, command))
    return out / "screen.md"
