"""Does the supervised answer token's attention key on the gold answer itself? (lookup testbed diagnostic)

Under teacher forcing the last answer token of ``colour_lookup`` *is* the colour ("red"), so a query at that position
can find the target by matching the colour it already holds, without the shape lookup the question asks for. This
feeds each test question with a WRONG answer, the colour of another object in the image, and measures where the
answer token's attention goes: on the object of the fed colour (keying on the answer) or on the asked-for object.

Run from the repository root after the testbed's train stage::

    python -m studies.lookup_leak --config configs/testbed/lookup.yaml --runs ntp_s0 klal_w1_last_s0 \
        --out results/testbed/lookup/leak.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from studies.reproduce import pipeline as repro


def swapped_rows(rows) -> tuple[list[dict], list[dict]]:
    """Per test row: (gold answer, gold evidence) and (a distractor's colour as answer, the distractor's box)."""
    gold, swapped = [], []
    for r in rows:
        meta = json.loads(r["meta"]) if isinstance(r["meta"], str) else r["meta"]
        objs = meta["objects"]
        other = objs[1]  # object 0 is the target; 1 is a distractor with another colour (unique colours)
        r = dict(r)
        gold.append(r)
        ev = {"boxes": [other["box"]], "points": [], "polylines": []}
        swapped.append({**r, "answer": other["colour"], "evidence": ev})
    return gold, swapped


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m studies.lookup_leak", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="run names under run_dir/colour_lookup/")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cfg = repro.load_config(a.config)
    task = "colour_lookup"
    rows = repro.task_split(cfg, task, "test", a.samples)
    gold, swapped = swapped_rows(rows)
    by_name = {s.name: s for s in repro.all_runs(cfg) if s.task == task}
    out = {}
    for name in a.runs:
        module = repro.load_trained(cfg, by_name[name])
        g = repro.evaluate_model(module, gold, batch_size=16, queries=("last", "prompt_last"))
        s = repro.evaluate_model(module, swapped, batch_size=16, queries=("last", "prompt_last"))
        # With the wrong colour fed, mass on the target = 1 - mass elsewhere; measure it directly too.
        tgt = [{**r, "evidence": g_r["evidence"]} for r, g_r in zip(swapped, gold)]
        t = repro.evaluate_model(module, tgt, batch_size=16, queries=("last",))
        out[name] = {
            "gold_answer/last_mass_on_target": g["last/evidence_mass"],
            "gold_answer/prompt_last_mass_on_target": g["prompt_last/evidence_mass"],
            "fed_distractor_colour/last_mass_on_distractor": s["last/evidence_mass"],
            "fed_distractor_colour/last_mass_on_target": t["last/evidence_mass"],
            "fed_distractor_colour/prompt_last_mass_on_distractor": s["prompt_last/evidence_mass"],
            "n": len(gold),
        }
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in out[name].items()}, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
