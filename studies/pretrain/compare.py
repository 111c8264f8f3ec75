"""Pretrained bases side by side on the same held-out curriculum items, per skill, as trained and with new phrasings:
what decides whether a new base reads more than ``tiny-base`` (issue 30: ship it beside tiny-base only if it does).

Each config's curriculum (``data`` of a ``python -m studies.pretrain`` config) is made, or reused, exactly as its
pretraining made it, and its test split is scored by every base (teacher-forced exact match,
:func:`studies.pretrain.recipe.skill_accuracy`), so every base meets every base's own held-out items::

    python -m studies.pretrain.compare '[tiny-base, runs/pretrain/tiny-base-v2]' \\
        '[configs/pretrain/tiny_base.yaml, configs/pretrain/tiny_base_v2.yaml]' results/pretrain_v2
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def compare(
    bases: list[str], configs: list[str], out: str, max_items: int | None = None, batch_size: int = 32
) -> dict[str, Any]:
    """Score every base on every config's curriculum test split; write ``compare.md`` and ``compare.json`` to ``out``.

    Args:
        bases: model names or folders (``tiny-base``, a pretraining ``out``).
        configs: pretraining configs whose curricula give the test items (their ``data`` settings).
        out: folder of the table.
        max_items: score the first this many test items of each split (None: all).
        batch_size: evaluation batch size.

    Returns:
        ``{config: {base: {"trained": {skill: acc, "n": ...}, "new": {...}}}}``.
    """
    import yaml

    from klal.data.io import load_split
    from klal.models.config import ModelConfig
    from klal.models.loader import load_model_and_processor
    from studies.pretrain.curriculum import CurriculumConfig
    from studies.pretrain.recipe import CurriculumData, make_curriculum, rephrased, skill_accuracy

    models = {b: load_model_and_processor(ModelConfig(name_or_path=b, dtype="float32")) for b in bases}
    tokenizer = next(iter(models.values()))[1].tokenizer  # renders the curricula's answers, as pretraining did
    scores: dict[str, Any] = {}
    for config in configs:
        raw = yaml.safe_load(Path(config).read_text())["data"]
        cur = CurriculumConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("curriculum").items()})
        data = CurriculumData(**{**raw, "splits": tuple(raw["splits"])}, curriculum=cur)
        rows = load_split(make_curriculum(data, 2, tokenizer), "test", max_items)
        asked_anew = rephrased(rows)
        scores[config] = {}
        for base, (model, processor) in models.items():
            model.eval()
            scores[config][base] = {
                "trained": skill_accuracy(model, processor, rows, batch_size),
                "new": skill_accuracy(model, processor, asked_anew, batch_size),
            }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "compare.json").write_text(
        json.dumps({"bases": bases, "configs": configs, "scores": scores}, indent=1)
    )
    (Path(out) / "compare.md").write_text(table(bases, configs, scores))
    return scores


def table(bases: list[str], configs: list[str], scores: dict[str, Any]) -> str:
    """The comparison as Markdown: per config's test items, a row per skill, a column per base (as trained / new
    phrasings), in %."""
    lines = [
        "# Pretrained bases on the same held-out items",
        "",
        "Made by `python -m studies.pretrain.compare`. Teacher-forced exact match (= greedy exact match), %, on each "
        "config's curriculum test split; *new*: the same items asked with phrasings no pretraining used "
        "(`curriculum.HELDOUT_TEMPLATES`).",
    ]
    for config in configs:
        first = scores[config][bases[0]]["trained"]
        skills = sorted(first["n"])
        lines += ["", f"## Test items of `{config}`", ""]
        lines.append("| skill | items | " + " | ".join(f"`{b}` | `{b}`, new" for b in bases) + " |")
        lines.append("|---|---:|" + "---:|---:|" * len(bases))
        for skill in [*skills, "all"]:
            n = sum(first["n"].values()) if skill == "all" else first["n"][skill]
            cells = []
            for b in bases:
                for kind in ("trained", "new"):
                    cells.append(f"{100 * scores[config][b][kind][skill]:.1f}")
            lines.append(f"| {skill} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point (``python -m studies.pretrain.compare``)."""
    from klal.cli import run

    return run(compare, argv, "python -m studies.pretrain.compare")


if __name__ == "__main__":
    main()
