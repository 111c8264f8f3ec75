"""The benchmarks end to end: public layouts read, evaluated on the tiny model with every method, scored, browsed.

One module-scoped evaluation (two runs on one loaded model: V* + POPE on ``test``, TextVQA + RefCOCO on ``validation``)
feeds every test here. The scores are recomputed from the recorded answers by hand-written counts, and the report is
loaded in headless Chromium (skipped, with the reason, where no Chromium is installed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from klal.eval.benchmark_scores import mc_letter, parse_answer_box, pope_label, vqa_soft_accuracy
from tests.eval_data import ALL_METHODS, QUICK_OPTIONS

pytest_plugins = ["tests.bench_data"]

ANSWERING = ["entropy_gradient", "vicrop_rel_att", "vicrop_grad_att", "laser"]


@pytest.fixture(scope="module")
def bench_eval(bench_datasets, tmp_path_factory) -> dict[str, Path]:
    from klal.eval.config import EvalConfig, MethodSpec
    from klal.eval.engine import evaluate
    from klal.grounding import GroundingModel
    from klal.models.config import ModelConfig

    model = ModelConfig(max_pixels=224 * 224)
    gm = GroundingModel.load(model, None)
    methods = [MethodSpec(m, options=dict(QUICK_OPTIONS[m])) for m in ALL_METHODS]
    root = tmp_path_factory.mktemp("bench_eval")
    # Two rows of V* and POPE, one of TextVQA and RefCOCO: every method on every benchmark, at the least cost.
    runs = {
        "test": ([bench_datasets["vstar"], bench_datasets["pope"]], 2),
        "validation": ([bench_datasets["textvqa"], bench_datasets["refcoco"]], 1),
    }
    out = {}
    for split, (data, n) in runs.items():
        cfg = EvalConfig(
            model=model,
            data=data,
            split=split,
            methods=methods,
            out=str(root / split),
            progress=False,
            gallery_size=0,
            prepare_samples=2,
            max_samples=n,
        )
        evaluate(cfg, gm)
        out[split] = root / split
    return out


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_every_method_scored_on_every_benchmark(bench_eval) -> None:
    test, val = _results(bench_eval["test"]), _results(bench_eval["validation"])
    assert test["benchmarks"] == {"vstar": "vstar", "pope": "pope"}
    assert val["benchmarks"] == {"textvqa": "textvqa", "refcoco": "refcoco"}
    for m in ANSWERING:
        assert test["benchmark_metrics"][m]["vstar"]["acc"]["count"] == 2
        assert test["benchmark_metrics"][m]["pope"]["f1"]["count"] == 2
        assert val["benchmark_metrics"][m]["textvqa"]["vqa_acc"]["count"] == 1
        assert val["benchmark_metrics"][m]["refcoco"]["acc@0.5"]["count"] == 1
    for m in ("attention_probe", "localization_heads"):  # they give no answer: no benchmark score, not a zero
        assert m not in test["benchmark_metrics"]
    # Every method still has its grounding metrics where the benchmark has boxes (V*, TextVQA OCR, RefCOCO).
    for m in ALL_METHODS:
        assert test["metrics"][m]["vstar"]["pointing_game"]["count"] == 2
        assert val["metrics"][m]["refcoco"]["evidence_mass"]["count"] == 1
    md = (bench_eval["test"] / "results.md").read_text()
    assert md.startswith("| method | pope: accuracy") and "| chance |" in md and "| most frequent answer |" in md


def test_scores_equal_counts_from_the_recorded_answers(bench_eval) -> None:
    from klal.models.family import family_for_type

    test, val = _results(bench_eval["test"]), _results(bench_eval["validation"])
    fam = family_for_type("qwen2_5_vl")
    for m in ANSWERING:
        recs = test["samples"][m]
        vstar = [r for r in recs if r["task"] == "vstar"]
        acc = sum(mc_letter(r["answer"]) == r["gold"] for r in vstar) / len(vstar)
        assert test["benchmark_metrics"][m]["vstar"]["acc"]["value"] == pytest.approx(acc)
        pope = [(pope_label(r["answer"]), r["gold"]) for r in recs if r["task"] == "pope"]
        tp = sum(p == g == "yes" for p, g in pope)
        yes = sum(p == "yes" for p, _ in pope)
        got = test["benchmark_metrics"][m]["pope"]
        assert got["accuracy"]["value"] == pytest.approx(sum(p == g for p, g in pope) / len(pope))
        assert got["yes_ratio"]["value"] == pytest.approx(yes / len(pope))
        assert got["precision"]["value"] == pytest.approx(tp / yes if yes else 0.0)
        recs = val["samples"][m]
        tv = [r for r in recs if r["task"] == "textvqa"]
        # The ten answers come from the dataset, read here without klal.
        answers = {r["id"]: None for r in tv}
        for r in tv:
            answers[r["id"]] = _dataset_meta(val, r["dataset"], r["id"])["answers"]
        want = sum(vqa_soft_accuracy(r["answer"], answers[r["id"]]) for r in tv) / len(tv)
        assert val["benchmark_metrics"][m]["textvqa"]["vqa_acc"]["value"] == pytest.approx(want)
        ious = []
        for r in (r for r in recs if r["task"] == "refcoco"):
            row = _dataset_row(r["dataset"], r["id"])
            box = parse_answer_box(r["answer"])
            if box is None:
                ious.append(0.0)
                continue
            rh, rw = fam.resized_hw(row["height"], row["width"], 56 * 56, 224 * 224)
            x0, x1 = sorted((box[0] * row["width"] / rw, box[2] * row["width"] / rw))
            y0, y1 = sorted((box[1] * row["height"] / rh, box[3] * row["height"] / rh))
            g = row["evidence"]["boxes"][0]
            inter = max(0.0, min(x1, g[2]) - max(x0, g[0])) * max(0.0, min(y1, g[3]) - max(y0, g[1]))
            union = (x1 - x0) * (y1 - y0) + (g[2] - g[0]) * (g[3] - g[1]) - inter
            ious.append(inter / union if union > 0 else 0.0)
        assert val["benchmark_metrics"][m]["refcoco"]["iou"]["value"] == pytest.approx(sum(ious) / len(ious))


def _dataset_row(path: str, sample_id: str) -> dict:
    import datasets

    ds = datasets.load_from_disk(path)
    for split in ds:
        for r in ds[split].remove_columns("image"):
            if r["id"] == sample_id:
                return r
    raise KeyError(sample_id)


def _dataset_meta(results: dict, path: str, sample_id: str) -> dict:
    return json.loads(_dataset_row(path, sample_id)["meta"])


def test_report_is_self_contained_with_one_card_per_sample(bench_eval) -> None:
    page = (bench_eval["test"] / "report.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    res = _results(bench_eval["test"])
    assert len(data["samples"]) == len(res["samples"]["laser"]) == 4
    assert data["methods"] == [m["row"] for m in res["methods"]]
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser(url: str, profile: Path, *extra: str) -> str:
    exe = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=1500",
    ]
    done = subprocess.run([exe, *flags, *extra, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _shown(dom: str) -> int:
    return int(re.search(r'id="shown" data-count="(\d+)"', dom).group(1))


@pytest.mark.skipif(_chromium() is None, reason="no Chromium: install Debian's 'chromium' package (.ci/run does)")
def test_report_in_headless_chromium(bench_eval, tmp_path) -> None:
    report = bench_eval["test"] / "report.html"
    res = _results(bench_eval["test"])
    url = report.resolve().as_uri()
    dom = _browser(url + "#method=laser", tmp_path / "p1", "--dump-dom")
    assert dom.count('class="card"') == 4 and _shown(dom) == 4
    # The table the browser shows holds results.json's values.
    cells = re.findall(r'<tr data-row="([^"]+)">(.*?)</tr>', dom, re.S)
    checked = 0
    for row, body in cells:
        for key, value in re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', body):
            kind, group, metric = key.split("|")
            source = res["benchmark_metrics" if kind == "bench" else "metrics"]
            assert float(value) == pytest.approx(source[row][group][metric]["value"], abs=1e-12)
            checked += 1
    assert checked >= 4 * 5 + 2  # POPE's five and V*'s columns for the answering rows, at least
    # A filter changes what is shown, and shows what results.json says.
    wrong = sum(r["bench"]["correct"] is False for r in res["samples"]["laser"])
    dom = _browser(url + "#method=laser&filter=wrong", tmp_path / "p2", "--dump-dom")
    assert _shown(dom) == wrong
    dom = _browser(url + "#method=attention_probe&filter=unscored", tmp_path / "p3", "--dump-dom")
    assert _shown(dom) == 4  # the probe gives no answers
    dom = _browser(url + "#method=attention_probe&filter=wrong", tmp_path / "p4", "--dump-dom")
    assert _shown(dom) == 0
    shot = tmp_path / "report.png"
    _browser(
        url + "#method=laser", tmp_path / "p5", "--hide-scrollbars", "--window-size=1400,1100", f"--screenshot={shot}"
    )
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("KLAL_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "report.png")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium: install Debian's 'chromium' package (.ci/run does)")
def test_report_with_1000_cards_filters_and_sorts(tmp_path) -> None:
    """A page of 1000 cards x 3 methods (tiny images) loads, counts, filters and sorts in the browser."""
    import numpy as np
    from PIL import Image

    from klal.eval.html_report import _map_payload, _thumb, render_html

    rng = np.random.default_rng(0)
    uri, _ = _thumb(Image.new("RGB", (16, 12), (90, 120, 200)))
    methods = ["a", "b", "c"]
    samples = []
    for i in range(1000):
        per = {}
        for m in methods:
            score = float(rng.random())
            res = type("R", (), {"maps": [rng.random((3, 4))]})()
            per[m] = {
                "answer": "x",
                "score": score,
                "correct": score >= 0.5,
                "pointing": score,
                "mass": score,
                "boxes": [],
                "map": _map_payload(res),
            }
        samples.append(
            {
                "id": f"s{i}",
                "dataset": "d",
                "task": "t",
                "question": "q?",
                "gold": "x",
                "img": uri,
                "boxes": [[1, 1, 5, 5]],
                "points": [],
                "per": per,
            }
        )
    results = {
        "model": "m",
        "methods": [{"row": m} for m in methods],
        "metrics": {},
        "benchmark_metrics": {},
        "benchmarks": {},
    }
    page = tmp_path / "report.html"
    page.write_text(render_html(results, samples))
    url = page.resolve().as_uri()
    dom = _browser(url + "#method=b&sort=score-desc", tmp_path / "p1", "--dump-dom")
    assert dom.count('class="card"') == 1000 and _shown(dom) == 1000
    order = re.findall(r'class="card" data-index="(\d+)"', dom)
    scores = [samples[int(i)]["per"]["b"]["score"] for i in order]
    assert scores == sorted(scores, reverse=True)
    right = sum(s["per"]["c"]["correct"] for s in samples)
    dom = _browser(url + "#method=c&filter=right", tmp_path / "p2", "--dump-dom")
    assert _shown(dom) == right
    disagree = sum(len({s["per"][m]["correct"] for m in methods}) > 1 for s in samples)
    dom = _browser(url + "#method=a&disagree=1", tmp_path / "p3", "--dump-dom")
    assert _shown(dom) == disagree
