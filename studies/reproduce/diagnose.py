"""Diagnostics of trained lookup-testbed models (issue 21, item 4): where accuracy comes from and where it stops.

Run from the repository root, after the studies it reads have run (``--stages train,eval,report``)::

    python -m studies.reproduce.diagnose --configs configs/testbed/decisive.yaml configs/testbed/decisive_word.yaml \
        configs/testbed/decisive_long.yaml --out results/testbed/decisive/diagnose

It writes ``diagnose.json``, ``diagnose.md`` and ``diagnose.png`` into ``--out``:

* **Predictions by number of objects** (from each study's ``predictions/<task>.jsonl`` and the test split's meta):
  accuracy per arm for images with 3 and with 4 objects, and how often the prediction names a colour present in the
  image. A model that answers "some colour in the image" scores 1/n on an image of n objects (colours are distinct),
  so its accuracy falls from 3 to 4 objects while its present-colour rate stays near 100 %.
* **Attention per layer**: the share of the last prompt token's and the last answer token's attention inside the
  evidence cells, in each language layer separately (the study's tables average the layers).
* **Oracle attention**: at test time a bias ``beta`` is added, in every layer and head, to the last prompt token's
  attention scores on the visual tokens of the asked-for object (:attr:`klal.capture.CaptureRequest.key_bias`), and
  the answer is scored teacher-forced; ``beta = 1e4`` puts all of that token's visual attention there. The same bias
  on another object of the image is the control: if the model then answers that object's colour, what it looks at
  decides its answer. High accuracy under the oracle with low accuracy without it = the model cannot find the object
  (retrieval) but could read it; low accuracy under the oracle = it cannot read the answer from what it looks at
  (readout).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from studies.reproduce import pipeline as repro

BETAS = (0.0, 1.0, 3.0, 10.0, 1e4)
"""Oracle biases on the asked-for object's visual tokens (0 scores the model as it is: the eval's exact match)."""
QUERIES = ("prompt_last", "last")
"""Query tokens whose attention is measured per layer."""


def object_count_split(predictions: list[dict[str, Any]], rows: Any) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and number of objects in the image: items, accuracy, and what the greedy predictions name.

    Args:
        predictions: a study's per-item records (``arm``, ``seed``, ``id``, ``prediction``, ``exact_tf``), pooled
            over seeds.
        rows: the test split (its meta lists each image's objects).

    Returns:
        ``{arm: {"3": {"n", "accuracy", "present", "absent", "blind"}, ...}}``: ``present`` / ``absent`` the shares of
        predictions naming a colour of the image / a colour of the task that is not in it, ``blind`` the accuracy of
        the question-blind guess "a colour of the image, uniformly" (1/n: the colours of an image are distinct).
    """
    colours = {r["id"]: [o["colour"] for o in repro.parse_meta(r["meta"])["objects"]] for r in rows}
    names = {c for cs in colours.values() for c in cs}
    items: dict[str, dict[int, list[tuple[bool, bool, bool]]]] = defaultdict(lambda: defaultdict(list))
    for p in predictions:
        if p["id"] not in colours or p["arm"] == "base":
            continue
        pred, present = (p["prediction"] or "").strip(), colours[p["id"]]
        items[p["arm"]][len(present)].append(
            (bool(p["exact_tf"]), pred in present, pred in names and pred not in present)
        )
    return {
        arm: {
            str(n): {
                "n": len(v),
                "accuracy": float(np.mean([a for a, _, _ in v])),
                "present": float(np.mean([b for _, b, _ in v])),
                "absent": float(np.mean([c for _, _, c in v])),
                "blind": 1.0 / n,
            }
            for n, v in sorted(by_n.items())
        }
        for arm, by_n in items.items()
    }


def layer_masses(module: Any, rows: Any, batch_size: int, queries: tuple[str, ...] = QUERIES) -> dict[str, list[float]]:
    """Per query: the evidence mass of its attention in each language layer alone (test rows)."""
    from klal.eval.attention import TeacherForcedAttention
    from klal.eval.engine import run_method
    from klal.eval.metrics import GroundingMetrics, pooled
    from klal.grounding import GroundingModel

    gm = GroundingModel(module.model, module.processor)
    out: dict[str, list[float]] = {}
    with gm.borrowed():
        for q in queries:
            out[q] = []
            for layer in range(gm.num_layers):
                metrics, label = GroundingMetrics(), f"{q}/L{layer}"
                method = TeacherForcedAttention(query=q, layers=[layer])
                run_method(gm, label, method, {"rows": rows}, metrics, batch_size=batch_size)
                out[q].append(pooled(metrics.compute(), label, "evidence_mass")["value"])
    return out


def oracle(
    module: Any, rows: Any, betas: tuple[float, ...] = BETAS, render: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Teacher-forced accuracy with the last prompt token's attention pushed onto the asked-for object, and, as the
    control, onto another object of the image, for each ``beta`` (added to that token's attention scores on the
    object's visual tokens, in every layer and head).

    ``render`` writes a colour as the dataset's answers are written (the study's ``answer_render``; None: as the
    generator wrote it), so that the control's first token is compared with the token the model would answer.

    Returns:
        ``{"betas", "exact"`` (asked-for colour, bias on it), ``"control_exact"`` (asked-for colour, bias on the other
        object), ``"control_other"`` (bias on the other object: the first predicted token is the other object's
        colour's), ``"first"`` (bias on the asked-for object: the predicted first answer token of each row, to tell a
        model that answers one constant), ``"n"}``, one value (or list) per beta.
    """
    from klal.capture import CaptureRequest, select_queries
    from klal.data.targets import evidence_cells
    from klal.eval.attention import teacher_forced_exact
    from klal.grounding import GroundingModel

    gm = GroundingModel(module.model, module.processor)
    exact, control_exact, control_other = defaultdict(list), defaultdict(list), defaultdict(list)
    first: dict[float, list[int]] = defaultdict(list)
    with gm.borrowed(), torch.no_grad():
        for row in rows:
            target, other = repro.parse_meta(row["meta"])["objects"][:2]
            other_first = gm.collator.answer_ids(render(other["colour"]) if render else other["colour"])[0][0]
            # One collated row serves every bias: only the request changes.
            batch = gm.collator([row])
            kw = {k: batch[k].to(gm.device) for k in gm.family.input_keys if k in batch}
            visual = gm.family.visual_token_mask(kw["input_ids"], gm.image_token_id, [batch["grids"][0]])
            query = select_queries(batch["answer_mask"], "prompt_last")
            pos = int(query[0].nonzero())
            labels = batch["labels"].to(gm.device)
            for obj, is_target in ((target, True), (other, False)):
                cells = evidence_cells({"boxes": [obj["box"]]}, (row["height"], row["width"]), batch["grids"][0][0])
                cells = torch.as_tensor(cells.reshape(1, 1, -1), dtype=torch.float32, device=gm.device)
                for beta in betas:
                    req = CaptureRequest.from_masks(query, visual)
                    req.key_bias = beta * cells
                    logits = gm.model(**kw, klal_capture=req, use_cache=False).logits
                    ok = bool(teacher_forced_exact(logits, labels)[0])
                    if is_target:
                        exact[beta].append(ok)
                        first[beta].append(int(logits[0, pos].argmax()))
                    else:
                        control_exact[beta].append(ok)
                        control_other[beta].append(int(logits[0, pos].argmax()) == other_first)
    return {
        "betas": list(betas),
        "exact": [float(np.mean(exact[b])) for b in betas],
        "control_exact": [float(np.mean(control_exact[b])) for b in betas],
        "control_other": [float(np.mean(control_other[b])) for b in betas],
        "first": [first[b] for b in betas],
        "n": len(rows),
    }


def diagnose_run(cfg: repro.StudyConfig, spec: repro.RunSpec, rows: Any, force: bool = False) -> dict[str, Any]:
    """Per-layer masses and the oracle of one trained run, cached in its folder (``diagnose.json``)."""
    path = repro.run_path(cfg, spec) / "diagnose.json"
    # Datasets whose meta names the question's object word get that token measured too (the `word` KLAL query).
    queries = QUERIES + (("word",) if "query_word" in repro.parse_meta(rows[0]["meta"]) else ())
    fp = {"n": len(rows), "betas": list(BETAS), "queries": list(queries)}
    if path.is_file() and not force:
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fp:
            return cached
    t0 = time.perf_counter()
    module = repro.load_trained(cfg, spec)
    out = {
        "layers": layer_masses(module, rows, cfg.eval_batch_size, queries),
        "oracle": oracle(module, rows),
        "fingerprint": fp,
    }
    path.write_text(json.dumps(out, indent=1))
    exact = [round(x, 3) for x in out["oracle"]["exact"]]
    print(f"diagnose {spec.task}/{spec.name}: oracle exact {exact} ({time.perf_counter() - t0:.0f} s)")
    return out


def _pct(values: list[float]) -> str:
    return repro.fmt(*repro.mean_std(values))


def main(
    configs: list[str], out: str = "results/testbed/decisive/diagnose", samples: int = 200, force: bool = False
) -> Path:
    """Diagnose every trained run of the given lookup studies (module docstring); returns ``diagnose.md``.

    Args:
        configs: study configs (``configs/testbed/decisive*.yaml``) whose runs are trained and reported.
        out: output folder.
        samples: test items of the per-layer masses and the oracle (the first ones of the test split); the split by
            object count reads every scored prediction.
        force: recompute cached per-run results.
    """
    result: dict[str, Any] = {"split": {}, "runs": []}
    done: dict[str, dict[str, Any]] = {}
    for path in configs:
        cfg = repro.load_config(path)
        for task in cfg.tasks:
            rows = repro.task_split(cfg, task, "test", cfg.test_samples)
            pred_file = Path(cfg.results_dir) / "predictions" / f"{task}.jsonl"
            preds = [json.loads(line) for line in pred_file.read_text().splitlines() if line.strip()]
            result["split"][path] = object_count_split(preds, rows)
            runs = [(arm, spec) for (t, arm, _), spec in repro.main_runs(cfg).items() if t == task]
            runs += [(f"{s.klal_query} L{s.klal_layers}", s) for s in repro.extra_runs(cfg) if s.task == task]
            some = rows.select(range(min(samples, len(rows))))
            worded = "query_word" in repro.parse_meta(some[0]["meta"])
            for arm, spec in runs:
                # A run another study trained with the same settings (its NTP arm) is the same model; measured
                # again where the data name the object word, whose token is measured too.
                key = repro._fingerprint(cfg, spec) + str(worded)
                if key not in done:
                    done[key] = diagnose_run(cfg, spec, some, force)
                d = done[key]
                result["runs"].append({"config": path, "arm": arm, "seed": spec.seed, "run": spec.name, **d})
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "diagnose.json").write_text(json.dumps(result, indent=1))
    (dest / "diagnose.md").write_text("\n".join(render(result)) + "\n")
    plot(result, dest / "diagnose.png")
    return dest / "diagnose.md"


def _groups(result: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in result["runs"]:
        groups[(Path(r["config"]).stem, r["arm"])].append(r)
    return groups


def render(result: dict[str, Any]) -> list[str]:
    """Markdown tables of :func:`main`'s result (percent; mean ± std over seeds where there are several)."""
    lines = ["# Lookup testbed diagnostics (`python -m studies.reproduce.diagnose`)", ""]
    lines += [
        "## Predictions by number of objects in the image",
        "",
        "Pooled over seeds. *present* / *absent*: greedy predictions naming a colour of the image / a colour that is "
        "not in it. *blind*: the question-blind guess, a colour of the image uniformly (1/n).",
        "",
        "| study | arm | objects | items x seeds | accuracy | present | absent | blind |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path, arms in result["split"].items():
        for arm, by_n in arms.items():
            for n, v in by_n.items():
                lines.append(
                    f"| {Path(path).stem} | {arm} | {n} | {v['n']} | {100 * v['accuracy']:.1f} | "
                    f"{100 * v['present']:.1f} | {100 * v['absent']:.1f} | {100 * v['blind']:.1f} |"
                )
    n_layers = len(result["runs"][0]["layers"]["prompt_last"]) if result["runs"] else 0
    head = " | ".join(f"L{i}" for i in range(n_layers))
    lines += [
        "",
        "## Attention inside the evidence, per language layer",
        "",
        "Share (%) of the query token's attention over the visual tokens that falls in the asked-for object's cells, "
        "each layer alone (chance: one cell of 64 = 1.6 %).",
        "",
        f"| study | arm | seeds | prompt_last: {head} | last: {head} |",
        "|---|---|---:|" + "---:|" * (2 * n_layers),
    ]
    groups = _groups(result)
    for (study, arm), runs in groups.items():
        cells = [_pct([r["layers"][q][i] for r in runs]) for q in QUERIES for i in range(n_layers)]
        lines.append(f"| {study} | {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    worded = {k: v for k, v in groups.items() if all("word" in r["layers"] for r in v)}
    if worded:
        lines += [
            "",
            "The question's object word (the `word` query: the last token of the shape the question names), on the "
            "studies whose data name it:",
            "",
            f"| study | arm | seeds | word: {head} |",
            "|---|---|---:|" + "---:|" * n_layers,
        ]
        for (study, arm), runs in worded.items():
            cells = [_pct([r["layers"]["word"][i] for r in runs]) for i in range(n_layers)]
            lines.append(f"| {study} | {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    betas = result["runs"][0]["oracle"]["betas"] if result["runs"] else []
    lines += [
        "",
        "## Oracle attention",
        "",
        "Teacher-forced exact match (%) with beta added to the last prompt token's attention scores on one object's "
        "visual tokens (every layer and head); beta 0 is the model as it is. *asked*: bias on the asked-for object, "
        "scored on its colour. Control, bias on another object of the image: *ctrl asked* = still the asked-for "
        "colour, *ctrl other* = the first answer token is the other object's colour's.",
        "",
        "| study | arm | seeds | measure | " + " | ".join(f"beta {b:g}" for b in betas) + " |",
        "|---|---|---:|---|" + "---:|" * len(betas),
    ]
    for (study, arm), runs in groups.items():
        o = [r["oracle"] for r in runs]
        for key, name in (("exact", "asked"), ("control_exact", "ctrl asked"), ("control_other", "ctrl other")):
            cells = [_pct([x[key][i] for x in o]) for i in range(len(betas))]
            lines.append(f"| {study} | {arm} | {len(runs)} | {name} | " + " | ".join(cells) + " |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-layer prompt_last evidence mass and oracle accuracy against beta, one line per study arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for (study, arm), runs in _groups(result).items():
        label = f"{study}: {arm} (n={len(runs)})"
        layers = np.array([r["layers"]["prompt_last"] for r in runs], dtype=float).mean(0)
        a1.plot(range(len(layers)), 100 * layers, marker="o", label=label)
        exact = np.array([r["oracle"]["exact"] for r in runs], dtype=float).mean(0)
        a2.plot(range(len(exact)), 100 * exact, marker="o", label=label)
    a1.set(
        xlabel="language layer", ylabel="prompt_last mass on the asked-for object (%)", title="Where the question looks"
    )
    a1.axhline(100 / 64, color="grey", ls=":", lw=1)
    betas = result["runs"][0]["oracle"]["betas"] if result["runs"] else []
    a2.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    a2.set(xlabel="oracle bias beta on the asked-for object", ylabel="test exact match (%)", title="Oracle attention")
    a2.axhline(25, color="grey", ls=":", lw=1)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
