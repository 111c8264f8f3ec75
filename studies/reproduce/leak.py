"""The wrong-answer diagnostic: does an answer token's attention key on the teacher-forced answer it already holds?

Under teacher forcing an answer position sees (part of) the gold answer, so a query there can find the evidence by
matching the answer (the colour "red" -> the red object) instead of reading what the question asks for. This feeds
every test question once with its gold answer and once with a WRONG answer, and measures, per query choice, the
attention mass on the gold evidence, and on the evidence of the fed wrong answer where the task has one:

* ``colour_lookup`` and the marked lookups (``ring_colour``, ...): the colour of another object of the image (object 1,
  a distractor of another colour); its box;
* ``grid_patch``: another occupied cell, ``(row, column)``; that cell;
* ``line_intersection``: the gold count plus one; no evidence of its own;
* ``line_tracing``: the other of Yes / No; no evidence of its own.

An attention that reads the question keeps its mass on the gold evidence whatever answer is fed; one keyed on the
answer moves to the fed answer's evidence (``on_fed``) and off the gold evidence. ``prompt_last`` sees no answer
token, so its numbers are identical under both feeds: the control that the diagnostic measures what it claims.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from studies.reproduce import pipeline as repro
from studies.reproduce.wrong_answer import WRONG_ANSWER

QUERIES = ("last", "all", "prompt_last")
"""Query choices measured: the answer's last token, every answer token, and the last prompt token (the control)."""


def wrong_answer_rows(task: str, rows: Any, render: Callable[[str], str]) -> tuple[list[dict], list[dict], list[dict]]:
    """The rows three ways: as they are; with a wrong answer fed (evidence unchanged: the gold evidence); with the
    wrong answer fed and its own evidence (empty for a task whose wrong answer has none).

    Args:
        task: a task of :data:`WRONG_ANSWER`.
        rows: dataset rows (answers as the study renders them).
        render: how the study writes an answer (:func:`studies.reproduce.pipeline.render_answer` bound to its mode).

    Raises:
        ValueError: a task without a wrong-answer rule.
    """
    if task not in WRONG_ANSWER:
        raise ValueError(f"wrong-answer diagnostic: no rule for task {task!r}; rules: {list(WRONG_ANSWER)}")
    gold, wrong, on_fed = [], [], []
    for r in rows:
        r = dict(r)
        answer, box = WRONG_ANSWER[task](repro.parse_meta(r["meta"]), r["answer"].strip())
        fed = render(answer)
        if fed.strip() == r["answer"].strip():
            raise ValueError(f"wrong-answer diagnostic: the wrong answer of {r['id']} equals the gold one ({fed!r})")
        gold.append(r)
        wrong.append({**r, "answer": fed})
        ev = {"boxes": [box] if box is not None else [], "points": [], "polylines": []}
        on_fed.append({**r, "answer": fed, "evidence": ev})
    return gold, wrong, on_fed


def leak_metrics(module: Any, task: str, rows: Any, render: Callable[[str], str], batch_size: int) -> dict[str, Any]:
    """Attention mass per query choice with the gold and a wrong answer fed (module docstring).

    Returns:
        ``{"n", "<query>/gold_fed" (mass on the gold evidence, gold answer fed), "<query>/wrong_fed" (mass on the gold
        evidence, wrong answer fed), "<query>/on_fed" (mass on the wrong answer's evidence, wrong answer fed; absent
        for a task whose wrong answer has no evidence), "<query>/shift" (gold_fed - wrong_fed)}``.
    """
    gold, wrong, on_fed = wrong_answer_rows(task, rows, render)
    has_fed = any(r["evidence"]["boxes"] for r in on_fed)
    g = repro.evaluate_model(module, gold, batch_size=batch_size, queries=QUERIES)
    w = repro.evaluate_model(module, wrong, batch_size=batch_size, queries=QUERIES)
    f = repro.evaluate_model(module, on_fed, batch_size=batch_size, queries=QUERIES) if has_fed else None
    out: dict[str, Any] = {"n": len(gold)}
    for q in QUERIES:
        out[f"{q}/gold_fed"] = g[f"{q}/evidence_mass"]
        out[f"{q}/wrong_fed"] = w[f"{q}/evidence_mass"]
        out[f"{q}/shift"] = g[f"{q}/evidence_mass"] - w[f"{q}/evidence_mass"]
        if f is not None:
            out[f"{q}/on_fed"] = f[f"{q}/evidence_mass"]
    return out


def render_leak(cfg: Any, leak: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Markdown lines: per task and arm, mean ± std over seeds of :func:`leak_metrics`.

    Args:
        cfg: the study config.
        leak: ``{task: {arm: [per-seed result]}}``.
    """
    if not leak:
        return []
    lines = [
        "## Wrong-answer diagnostic: is the attention keyed on the teacher-forced answer?",
        "",
        "Each test question fed once with its gold answer and once with a wrong one (`studies/reproduce/leak.py`: "
        "another object's colour, another occupied cell, the count plus one, the other of Yes/No). Attention mass "
        "(%) on the gold evidence with the gold answer fed / with the wrong answer fed, and on the wrong answer's "
        "own evidence (where it has one), for the answer's last token, every answer token, and the last prompt token "
        "(which sees no answer: equal under both feeds by construction). Keyed on the answer = the mass leaves the "
        f"gold evidence for the fed answer's. Mean ± std over seeds {cfg.leak_seeds or cfg.seeds}; "
        f"{cfg.leak_samples} test items each.",
        "",
        "| task | arm | last: gold fed | last: wrong fed | last: on fed | all: gold fed | all: wrong fed | all: on fed "
        "| prompt_last: gold fed | prompt_last: wrong fed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, arms in leak.items():
        for arm, per_seed in arms.items():
            cells = []
            for key in (
                "last/gold_fed",
                "last/wrong_fed",
                "last/on_fed",
                "all/gold_fed",
                "all/wrong_fed",
                "all/on_fed",
                "prompt_last/gold_fed",
                "prompt_last/wrong_fed",
            ):
                vals = [float(s[key]) for s in per_seed if key in s]
                cells.append(repro.fmt(*repro.mean_std(vals)) if vals else "—")
            lines.append(f"| {task} | {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines
