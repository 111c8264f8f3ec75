"""The reference rows of every study table, and the answers' tokenization: what a model must beat before a number
means anything.

Scored on the same test items as the models (the first ``test_samples`` of the test split), from the dataset alone:

* **chance**: ``1 / K``, K the number of distinct answers of the training split (a uniform guess over the answers the
  task gives);
* **most frequent answer**: always the training split's most frequent answer;
* **question-blind** (image only): the best guess from the image without the question, per task
  (:data:`QUESTION_BLIND`), as an expected accuracy (a uniform guess among the candidates the image offers);
* **question-only**: for each question text of the training split its most frequent training answer (the overall
  most frequent one for a question the training split lacks): the best answer from the question alone, learned from
  the training split.

Tokenization (:func:`answer_tokens`): how many tokens each test answer takes for the model's tokenizer, tokenised as
the collator does (``klal.data.collate.KLALCollator.answer_ids``: the answer text alone, then the end of turn). With an
``n``-token answer the queries ``last``/``first``/``all`` read answer tokens that, under teacher forcing, already hold
(part of) the answer; ``prompt_last`` is the only position that predicts the answer without seeing any of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from studies.reproduce import pipeline as repro
from studies.reproduce.pipeline import StudyConfig


def _uniform_among(candidates: set[str], gold: str) -> float:
    """Expected accuracy of a uniform guess among ``candidates``."""
    return 1.0 / len(candidates) if gold in candidates else 0.0


def _objects_attribute(attribute: str) -> Callable[[dict[str, Any], str], float]:
    def guess(meta: dict[str, Any], gold: str) -> float:
        return _uniform_among({o[attribute] for o in meta["objects"]}, gold)

    return guess


def _occupied_cell(meta: dict[str, Any], gold: str) -> float:
    cells = {f"({r + 1}, {c + 1})" for r, row in enumerate(meta["cells"]) for c, x in enumerate(row) if x is not None}
    return _uniform_among(cells, gold)


def _total_crossings(meta: dict[str, Any], gold: str) -> float:
    return float(gold == str(len(meta["crossings"])))


def _connected_pair_majority(meta: dict[str, Any], gold: str) -> float:
    """Answer what most node pairs of the image are: "Yes" when more than half are connected (a tie: either)."""
    labels = [n["label"] for n in meta["nodes"]]
    parent = {x: x for x in labels}

    def root(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x

    for e in meta["edges"]:
        parent[root(e["nodes"][0])] = root(e["nodes"][1])
    sizes = Counter(root(x) for x in labels)
    n = len(labels)
    share = sum(k * (k - 1) / 2 for k in sizes.values()) / (n * (n - 1) / 2)
    if share == 0.5:
        return 0.5
    return float(gold == ("Yes" if share > 0.5 else "No"))


QUESTION_BLIND: dict[str, tuple[str, Callable[[dict[str, Any], str], float]]] = {
    "colour_lookup": ("a colour present in the image, uniformly", _objects_attribute("colour")),
    "ring_colour": ("a fill colour present in the image, uniformly", _objects_attribute("colour")),
    "outline_colour": ("a fill colour present in the image, uniformly", _objects_attribute("colour")),
    "beside_colour": ("a fill colour present in the image, uniformly", _objects_attribute("colour")),
    "shape_lookup": ("a shape present in the image, uniformly", _objects_attribute("shape")),
    "neighbour_lookup": ("a shape present in the image, uniformly", _objects_attribute("shape")),
    "grid_patch": ("a cell that holds a shape, uniformly", _occupied_cell),
    "line_intersection": (
        "the image's total number of crossings (exact whenever the question asks for all of them or the image has "
        "two lines)",
        _total_crossings,
    ),
    "line_tracing": ("Yes when most node pairs of the image are connected, else No", _connected_pair_majority),
}
"""Task -> (the rule, the expected accuracy of one test item from its generator meta and gold answer). The guess uses
the image only (what the meta records about the drawing), never which object, pair or node the question names."""


def _norm_question(q: str) -> str:
    return " ".join(q.lower().split())


def baselines(cfg: StudyConfig, task: str) -> dict[str, Any] | None:
    """:func:`reference_accuracies` of ``task`` on the scored test items (None before the data stage)."""
    try:
        train = repro.task_split(cfg, task, "train")
        test = repro.task_split(cfg, task, "test", cfg.test_samples)
    except (FileNotFoundError, KeyError):
        return None
    return reference_accuracies(
        task, train["question"], train["answer"], test["question"], test["answer"], test["meta"]
    )


def reference_accuracies(
    task: str,
    train_questions: Sequence[str],
    train_answers: Sequence[str],
    test_questions: Sequence[str],
    test_answers: Sequence[str],
    test_meta: Sequence[Any],
) -> dict[str, Any]:
    """The four reference accuracies on the test items (module docstring), from the rows' text and generator meta.

    Returns:
        ``{"n_test", "chance": {"accuracy", "answers"}, "majority": {"answer", "accuracy"}, "question_blind":
        {"accuracy", "rule"} (None for a task without a rule), "question_only": {"accuracy", "questions"}}``.
    """
    n = max(len(test_answers), 1)
    counts = Counter(train_answers)
    top, _ = counts.most_common(1)[0]
    by_question: dict[str, Counter[str]] = {}
    for q, a in zip(train_questions, train_answers):
        by_question.setdefault(_norm_question(q), Counter())[a] += 1
    # Counter.most_common keeps first-seen order among ties, so a tie goes to the answer met first in training.
    guess = [
        by_question[k].most_common(1)[0][0] if k in by_question else top for k in map(_norm_question, test_questions)
    ]
    out: dict[str, Any] = {
        "n_test": len(test_answers),
        "chance": {"accuracy": 1.0 / len(counts), "answers": len(counts)},
        "majority": {"answer": top, "accuracy": sum(a == top for a in test_answers) / n},
        "question_only": {
            "accuracy": sum(p == a for p, a in zip(guess, test_answers)) / n,
            "questions": len(by_question),
        },
        "question_blind": None,
    }
    if task in QUESTION_BLIND:
        rule, blind = QUESTION_BLIND[task]
        # Answers may carry the leading space of answer_render; the meta records the generator's words.
        acc = [blind(repro.parse_meta(m), a.strip()) for m, a in zip(test_meta, test_answers)]
        out["question_blind"] = {"accuracy": float(np.mean(acc)) if acc else float("nan"), "rule": rule}
    return out


def answer_tokens(cfg: StudyConfig, task: str, tokenizer: Any, top: int = 12) -> dict[str, Any] | None:
    """Tokens per answer of the scored test items for ``tokenizer`` (None before the data stage).

    Returns:
        ``{"n_test", "tokens": {n: share of items}, "answers": [{"answer", "pieces", "share"}] (the ``top`` most
        frequent)}``.
    """
    try:
        answers = repro.task_split(cfg, task, "test", cfg.test_samples)["answer"]
    except (FileNotFoundError, KeyError):
        return None
    counts = Counter(answers)
    pieces = {a: tokenizer.convert_ids_to_tokens(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in counts}
    n = max(len(answers), 1)
    per_len: Counter[int] = Counter()
    for a, k in counts.items():
        per_len[len(pieces[a])] += k
    return {
        "n_test": len(answers),
        "tokens": {int(k): v / n for k, v in sorted(per_len.items())},
        "answers": [{"answer": a, "pieces": pieces[a], "share": k / n} for a, k in counts.most_common(top)],
    }


def render_baseline_rows(task: str, b: dict[str, Any] | None, empty_cells: int) -> list[str]:
    """The table rows of :func:`baselines` (accuracy in the first metric column, ``empty_cells`` dashes after)."""
    if not b:
        return []
    rest = " | —" * empty_cells
    rows = [
        f"| {task} | chance: uniform over the {b['chance']['answers']} training answers | "
        f"{repro.fmt(b['chance']['accuracy'])}{rest} |",
        f"| {task} | always `{b['majority']['answer']}` (most frequent training answer) | "
        f"{repro.fmt(b['majority']['accuracy'])}{rest} |",
    ]
    if b.get("question_blind"):
        qb = b["question_blind"]
        rows.append(f"| {task} | question-blind, image only: {qb['rule']} | {repro.fmt(qb['accuracy'])}{rest} |")
    rows.append(
        f"| {task} | question-only: most frequent training answer per question text | "
        f"{repro.fmt(b['question_only']['accuracy'])}{rest} |"
    )
    return rows


def render_tokens(tokens: dict[str, Any]) -> list[str]:
    """Markdown lines of :func:`answer_tokens` for every task (``{task: result}``)."""
    tokens = {k: v for k, v in tokens.items() if v}
    if not tokens:
        return []
    lines = [
        "## Answer tokenization",
        "",
        "Tokens per answer for the model's tokenizer, as the collator tokenises answers (the answer text alone; the "
        "end-of-turn token not counted), over the scored test items. Under teacher forcing the answer positions "
        "(`last`, `first`, `all`) read answer tokens that already hold the answer when it has one token, and its "
        "earlier pieces when it has several; `prompt_last` predicts the answer's first token without seeing any.",
        "",
        "| task | tokens per answer (share of items) | most frequent answers (pieces) |",
        "|---|---|---|",
    ]
    bar = " \\| "  # a literal | inside a markdown table cell
    for task, t in tokens.items():
        per = ", ".join(f"{k}: {100 * v:.0f} %" for k, v in t["tokens"].items())
        ans = ", ".join(f"`{a['answer']!r}` = {bar.join(a['pieces'])}" for a in t["answers"][:6])
        lines.append(f"| {task} | {per} | {ans} |")
    return [*lines, ""]
