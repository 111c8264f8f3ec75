"""The evaluation engine (klal.eval.engine) on the tiny model: batched and per-row runs agree, every method runs on base
and adapter weights, text-only rows are skipped and counted, and evaluate(), the probe callback and the study's
evaluation give the same grounding numbers on the same rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from klal.grounding import GroundingModel, available_methods
from tests.eval_data import ALL_METHODS, QUICK_OPTIONS, text_record

pytest_plugins = ["tests.eval_data"]


def test_every_method_is_registered():
    assert set(ALL_METHODS) <= set(available_methods())


def test_generate_with_cache_equals_the_plain_greedy_loop(task_data):
    from klal.data.io import load_split
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    row = load_split(task_data["grid_patch"], "test", 1)[0]
    inputs = gm.inputs([row["image"]], row["question"])
    assert gm.generate(inputs, 6) == gm.generate(inputs, 6, logits_fn=lambda logits, _: logits)


def test_batched_evaluation_equals_one_sample_at_a_time(tmp_path, task_data):
    from klal.eval.config import EvalConfig, MethodSpec
    from klal.eval.engine import evaluate as run_eval
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    methods = [
        # 4-token answers: batched and one-at-a-time decoding are still compared (the random model never stops, so
        # the default 16 tokens only made it slower).
        MethodSpec("attention_probe", "prompt attention", options={"query": "prompt_last", "max_new_tokens": 4}),
        MethodSpec("attention_probe", "answer attention", options={"query": "answer_last", "max_new_tokens": 4}),
        MethodSpec("localization_heads", options={"top_k": 3, "floor": 0.0}),
    ]
    data = [task_data["grid_patch"], task_data["line_tracing"]]
    runs = {}
    for bs in (1, 2):  # 5 samples per dataset: chunks of 2, 2 and a partial 1
        cfg = EvalConfig(
            data=data,
            split="train",
            max_samples=5,
            methods=methods,
            prepare_samples=4,
            batch_size=bs,
            gallery_size=0,
            out=str(tmp_path / f"bs{bs}"),
            progress=False,
        )
        runs[bs] = run_eval(cfg, gm)
    one, two = runs[1], runs[2]
    for row in one["metrics"]:
        for task, ms in one["metrics"][row].items():
            for name, stats in ms.items():
                got = two["metrics"][row][task][name]
                assert got["count"] == stats["count"] and got["skipped"] == stats["skipped"], (row, task, name)
                assert got["value"] == pytest.approx(stats["value"], rel=1e-6, abs=1e-9), (row, task, name)
        assert two["cost"][row]["forward_per_sample"] == one["cost"][row]["forward_per_sample"] == 1.0
        assert [s["boxes"] for s in two["samples"][row]] == [s["boxes"] for s in one["samples"][row]]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        run_eval(EvalConfig(data=data, batch_size=0, out=str(tmp_path / "bad")), gm)


def test_every_method_runs_on_base_and_adapter_with_a_non_square_grid(adapter_dir):
    """Each method on one 280 x 168 image: the 6 x 10 token grid (hand-worked: both sides are multiples of 28 and the
    area is under max_pixels, so the processor keeps the size), on the base weights and with the LoRA adapter."""
    from klal.eval.engine import adapter_weights
    from klal.grounding import build_method
    from klal.models.loader import ModelConfig
    from tests.conftest import make_row

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224), adapter=adapter_dir)
    row = make_row(7, 280, 168, [56.0, 28.0, 140.0, 84.0])
    prep = [make_row(10 + i, 280, 168, None) for i in range(3)]
    options = QUICK_OPTIONS
    assert set(options) == set(ALL_METHODS)
    for name, opts in options.items():
        maps = {}
        for weights in ("base", "adapter"):
            method = build_method(name, **opts)
            with adapter_weights(gm, weights):
                method.prepare(gm, prep)
                res = method.run(gm, row)
            assert res.maps[0].shape == (6, 10), (name, weights)
            assert np.all(np.isfinite(res.maps[0])) and res.maps[0].min() >= 0, (name, weights)
            for x0, y0, x1, y1 in res.boxes:
                assert 0 <= x0 < x1 <= 280 and 0 <= y0 < y1 <= 168, (name, weights, res.boxes)
            maps[weights] = res.maps[0]
        # the adapter reaches every method: its map differs from the base model's on the same sample
        assert not np.allclose(maps["base"], maps["adapter"], rtol=1e-4, atol=1e-7), name


def test_text_only_rows_are_refused_by_methods_with_a_clear_error(task_data):
    from klal.grounding import GroundingError, build_method
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    with pytest.raises(GroundingError, match="sample 'text-0' is text-only"):
        build_method("attention_probe", query="answer_last").run(gm, text_record(0))
    # Every method relies on sample_images for this check (none repeats it), so each must give the same error.
    for name in ("entropy_gradient", "vicrop_rel_att", "vicrop_grad_att", "laser"):
        with pytest.raises(GroundingError, match="sample 'text-0' is text-only"):
            build_method(name).run(gm, text_record(0))


def test_evaluate_skips_text_only_rows_and_counts_them(tmp_path, mixed_data, caplog):
    """Mixed in text-only rows change nothing: the same metrics, samples and costs as the image rows alone (batched
    over image rows only, localization heads discovered on image rows only, no 0 x 0 crop-size refusal), and the
    number skipped is in results.json, results.md and the log."""
    import logging

    from klal.eval.config import EvalConfig, MethodSpec
    from klal.eval.engine import evaluate as run_eval
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    methods = [
        MethodSpec("attention_probe", "answer attention", options={"query": "answer_last"}),
        MethodSpec("localization_heads", options={"top_k": 3, "floor": 0.0}),
        MethodSpec("vicrop_rel_att", options={"max_new_tokens": 2}),
    ]
    runs = {}
    for name in ("image_only", "mixed"):
        cfg = EvalConfig(
            data=[mixed_data[name]],
            methods=methods,
            prepare_samples=3,
            batch_size=2,
            gallery_size=2,
            out=str(tmp_path / name),
            progress=False,
        )
        with caplog.at_level(logging.WARNING, logger="klal.eval.engine"):
            caplog.clear()
            runs[name] = run_eval(cfg, gm)
        runs[name]["log"] = caplog.text
    alone, mixed = runs["image_only"], runs["mixed"]
    assert mixed["metrics"] == alone["metrics"]
    assert mixed["metrics"]["answer attention"]["grid_patch"]["evidence_mass"]["count"] == 4
    assert mixed["cost"].keys() == alone["cost"].keys()
    for row in alone["samples"]:
        assert [s["id"] for s in mixed["samples"][row]] == [s["id"] for s in alone["samples"][row]]
        assert [s["boxes"] for s in mixed["samples"][row]] == [s["boxes"] for s in alone["samples"][row]]
        assert [s["answer"] for s in mixed["samples"][row]] == [s["answer"] for s in alone["samples"][row]]
        assert mixed["cost"][row]["forward_per_sample"] == alone["cost"][row]["forward_per_sample"]
    assert alone["text_only_skipped"] == {mixed_data["image_only"]: 0}
    assert mixed["text_only_skipped"] == {mixed_data["mixed"]: 4}
    on_disk = json.loads((tmp_path / "mixed" / "results.json").read_text())
    assert on_disk["text_only_skipped"] == {mixed_data["mixed"]: 4}
    table = (tmp_path / "mixed" / "results.md").read_text()
    assert f"Text-only rows skipped (no image to ground; in no count above): {mixed_data['mixed']}: 4." in table
    assert "Text-only" not in (tmp_path / "image_only" / "results.md").read_text()
    assert (
        f"{mixed_data['mixed']} [test]: skipping 4 text-only row(s) of 8 (no image to ground); evaluating 4"
        in (mixed["log"])
    )
    assert "text-only" not in alone["log"]

    # max_samples caps the rows read; the text rows among them are skipped and counted.
    capped = run_eval(
        EvalConfig(
            data=[mixed_data["mixed"]],
            methods=methods[:1],
            max_samples=4,
            gallery_size=0,
            out=str(tmp_path / "capped"),
            progress=False,
        ),
        gm,
    )
    assert capped["text_only_skipped"] == {mixed_data["mixed"]: 2}
    assert capped["metrics"]["answer attention"]["grid_patch"]["evidence_mass"]["count"] == 2


def test_evaluate_callback_and_study_give_the_same_grounding_numbers(tmp_path, task_data):
    """The three callers share the engine: on the same rows and weights, the answer token's attention gives the same
    pointing game and evidence mass through evaluate() (attention_probe, answer_last), the GroundingProbes callback
    (the same row) and the study's evaluate_model (the teacher-forced attention of the last answer token)."""
    import lightning as L

    from klal.callbacks import GroundingProbes
    from klal.data.io import load_split
    from klal.eval.config import EvalConfig, MethodSpec
    from klal.eval.engine import evaluate as run_eval
    from klal.models.loader import ModelConfig
    from klal.models.lora import LoraSettings
    from klal.module import KLALModule
    from studies.reproduce.pipeline import evaluate_model

    module = KLALModule(backbone=ModelConfig(max_pixels=224 * 224), lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    path, n = task_data["grid_patch"], 5
    spec = MethodSpec("attention_probe", "answer attention", options={"query": "answer_last"})

    gm = GroundingModel(module.model, module.processor)
    cfg = EvalConfig(data=path, split="train", max_samples=n, methods=[spec], gallery_size=0, progress=False)
    cfg.out = str(tmp_path / "eval")
    via_eval = run_eval(cfg, gm)["metrics"]["answer attention"]["grid_patch"]

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path / "cb"))
    probes = GroundingProbes(methods=[spec], data=path, split="train", num_samples=n, gallery_size=0)
    probes.setup(trainer, module, "fit")
    via_callback = probes.probe(trainer, module)["answer attention"]["grid_patch"]

    via_study = evaluate_model(module, load_split(path, "train", n), batch_size=2, queries=("last",))

    assert via_eval["evidence_mass"]["count"] == via_callback["evidence_mass"]["count"] == via_study["last/n_evidence"]
    assert via_study["last/n_evidence"] == n  # every grid_patch row has a box
    for name, key in (("evidence_mass", "last/evidence_mass"), ("pointing_game", "last/pointing")):
        want = via_eval[name]["value"]
        assert 0.0 < want <= 1.0
        assert via_callback[name]["value"] == pytest.approx(want, rel=1e-5, abs=1e-7), name
        assert via_study[key] == pytest.approx(want, rel=1e-5, abs=1e-7), name
