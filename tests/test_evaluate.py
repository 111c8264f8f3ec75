"""evaluate.py and the grounding-probe callback end to end on the tiny model: every method over a few samples of each
synthetic task, the files it writes, metric ranges, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import evaluate
from klal.grounding import GroundingModel, available_methods

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = [
    "attention_probe",
    "localization_heads",
    "entropy_gradient",
    "vicrop_rel_att",
    "vicrop_grad_att",
    "laser",
]
MODEL_FLAGS = ["--model.max_pixels", str(224 * 224)]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict[str, str]:
    """Tiny datasets of the three synthetic tasks (224 px images)."""
    from data_gen.tasks import build_task
    from data_gen.writer import generate_dataset

    root = tmp_path_factory.mktemp("evaldata")
    specs = {
        "grid_patch": ("easy", {"image_size": 224}),
        "line_intersection": ("easy", {"image_size": 224}),
        "line_tracing": ("easy", {"image_size": 224, "line_width": 2, "node_radius": 8, "num_nodes": (6, 8)}),
    }
    out = {}
    for name, (preset, over) in specs.items():
        task = build_task(name, preset=preset, overrides=over)
        generate_dataset(task, num=20, seed=1, out=str(root / name), progress=False)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> str:
    """A LoRA adapter on the tiny model with non-zero weights (a fresh LoRA is the identity)."""
    from klal.models.loader import ModelConfig, load_model_and_processor
    from klal.models.lora import LoraSettings, apply_lora

    model, _ = load_model_and_processor(ModelConfig(max_pixels=224 * 224))
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(str(path))
    return str(path)


def test_every_method_is_registered():
    assert set(ALL_METHODS) <= set(available_methods())


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_eval_configs_parse_and_name_their_command(path):
    assert path.read_text().splitlines()[0].startswith("# python evaluate.py --config ")
    ns = evaluate.build_parser().parse_args(["--config", str(path)])
    from klal.evaluation import MethodSpec
    from klal.grounding import build_method

    for m in ns.methods:
        spec = MethodSpec(**vars(m)) if not isinstance(m, MethodSpec) else m
        build_method(spec.name, **spec.options)


def test_generate_with_cache_equals_the_plain_greedy_loop(task_data):
    from klal.evaluation import load_split
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    row = load_split(task_data["grid_patch"], "test", 1)[0]
    inputs = gm.inputs([row["image"]], row["question"])
    assert gm.generate(inputs, 6) == gm.generate(inputs, 6, logits_fn=lambda logits, _: logits)


def test_evaluate_every_method_on_every_task(tmp_path, task_data, adapter_dir):
    methods = [
        {"name": "attention_probe", "label": "base model attention", "options": {"query": "generated_last"}},
        {
            "name": "attention_probe",
            "label": "KLAL fine-tuned attention",
            "weights": "adapter",
            "options": {"query": "generated_last", "max_new_tokens": 4},
        },
        {"name": "localization_heads", "options": {"floor": 0.0}},
        {"name": "entropy_gradient", "options": {"max_rounds": 2}},
        {"name": "vicrop_rel_att", "options": {}},
        {"name": "vicrop_grad_att", "options": {}},
        {"name": "laser", "options": {}},
    ]
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": list(task_data.values()),
                "max_samples": 2,
                "prepare_samples": 4,
                "methods": methods,
                "gallery_size": 3,
                "out": str(tmp_path / "out"),
                "progress": False,
            }
        )
    )
    res = evaluate.main(["--config", str(cfg), "--adapter", adapter_dir, *MODEL_FLAGS])
    out = tmp_path / "out"
    on_disk = json.loads((out / "results.json").read_text())
    rows = [m.get("label") or m["name"] for m in methods]
    assert set(on_disk["metrics"]) == set(rows)
    from klal.evaluation import check_ranges, slug

    assert check_ranges(on_disk["metrics"]) == []
    for row in rows:
        per_task = on_disk["metrics"][row]
        assert set(per_task) == set(task_data), row
        for task, ms in per_task.items():
            # every method gives a map for every sample that has evidence
            assert ms["evidence_mass"]["count"] + ms["evidence_mass"].get("skipped", 0) == 2, (row, task)
            assert ms["pointing_game"]["count"] == ms["evidence_mass"]["count"]
        assert (out / f"gallery_{slug(row)}.png").stat().st_size > 1000
        assert on_disk["cost"][row]["forward_per_sample"] >= 1
    # gradient methods pay a backward pass, attention methods none
    assert on_disk["cost"]["entropy_gradient"]["backward_per_sample"] >= 1
    assert on_disk["cost"]["vicrop_grad_att"]["backward_per_sample"] >= 1
    assert on_disk["cost"]["vicrop_rel_att"]["backward_per_sample"] == 0
    # methods that answer are scored on answers; the prompt-only probe is not
    for row in ("base model attention", "vicrop_rel_att", "entropy_gradient", "laser"):
        assert on_disk["metrics"][row]["grid_patch"]["answer_accuracy"]["count"] == 2, row
    assert on_disk["metrics"]["localization_heads"]["grid_patch"]["answer_accuracy"]["count"] == 0
    # grid_patch has box evidence: the box metrics are scored there
    assert on_disk["metrics"]["localization_heads"]["grid_patch"]["box_iou"]["count"] == 2
    # the adapter changes the model: its attention differs from the base model's on the same samples
    base = res["metrics"]["base model attention"]["grid_patch"]["evidence_mass"]["value"]
    tuned = res["metrics"]["KLAL fine-tuned attention"]["grid_patch"]["evidence_mass"]["value"]
    assert base != tuned
    table = (out / "results.md").read_text()
    assert table.startswith("| method | grid_patch: point")
    for row in rows:
        assert f"| {row} |" in table


def test_unknown_method_is_refused_before_loading(tmp_path, task_data):
    with pytest.raises(SystemExit, match="unknown grounding method 'nope'.*available"):
        evaluate.main(["--data", f"[{task_data['grid_patch']}]", "--methods", '[{"name": "nope"}]', *MODEL_FLAGS])


def test_adapter_rows_need_an_adapter(task_data):
    with pytest.raises(SystemExit, match="runs on the adapter, but no --adapter"):
        evaluate.main(
            [
                "--data",
                f"[{task_data['grid_patch']}]",
                "--methods",
                '[{"name": "attention_probe", "weights": "adapter"}]',
                *MODEL_FLAGS,
            ]
        )


def test_adapter_for_another_base_model_is_refused(tmp_path, task_data, adapter_dir):
    import shutil

    other = tmp_path / "other_adapter"
    shutil.copytree(adapter_dir, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny"
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-VL-7B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="trained on base model 'Qwen/Qwen2.5-VL-7B-Instruct'.*'tiny'"):
        evaluate.main(["--data", f"[{task_data['grid_patch']}]", "--adapter", str(other), *MODEL_FLAGS])


def test_dataset_without_evidence_column_is_named(tmp_path, task_data):
    import datasets

    dd = datasets.load_from_disk(task_data["grid_patch"])
    broken = tmp_path / "no_evidence"
    datasets.DatasetDict({k: v.remove_columns("evidence") for k, v in dd.items()}).save_to_disk(str(broken))
    with pytest.raises(SystemExit, match=r"no_evidence.*evidence"):
        evaluate.main(["--data", f"[{broken}]", *MODEL_FLAGS])


@pytest.mark.parametrize("name", ["vicrop_rel_att", "entropy_gradient", "laser"])
def test_image_too_small_for_a_crop_names_the_sample(tmp_path, task_data, name):
    from klal.evaluation import load_split

    first = load_split(task_data["grid_patch"], "test", 1)[0]
    methods = f'[{{"name": "attention_probe"}}, {{"name": "{name}", "options": {{"min_crop": 1000}}}}]'
    match = rf"^evaluate.py: error: {name}: sample '{first['id']}' of .*grid_patch has an image of 224 x 224 px"
    match += r".*min_crop=1000"
    with pytest.raises(SystemExit, match=match):
        evaluate.main(
            ["--data", f"[{task_data['grid_patch']}]", "--max_samples", "1", "--methods", methods]
            + ["--out", str(tmp_path / "o"), *MODEL_FLAGS]
        )
    assert not (tmp_path / "o").exists()  # refused before any method ran (the output folder is made after loading)


def test_batched_evaluation_equals_one_sample_at_a_time(tmp_path, task_data):
    from klal.evaluation import EvalConfig, MethodSpec
    from klal.evaluation import evaluate as run_eval
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    methods = [
        MethodSpec("attention_probe", "prompt attention", options={"query": "prompt_last"}),
        MethodSpec("attention_probe", "answer attention", options={"query": "answer_last"}),
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
    from klal.evaluation import _weights
    from klal.grounding import build_method
    from klal.models.loader import ModelConfig
    from tests.conftest import make_row

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224), adapter=adapter_dir)
    row = make_row(7, 280, 168, [56.0, 28.0, 140.0, 84.0])
    prep = [make_row(10 + i, 280, 168, None) for i in range(3)]
    options = {
        "attention_probe": {"query": "answer_last"},
        "localization_heads": {"top_k": 3, "floor": 0.0},
        "entropy_gradient": {"max_rounds": 1, "max_new_tokens": 2},
        "vicrop_rel_att": {"max_new_tokens": 2},
        "vicrop_grad_att": {"max_new_tokens": 2},
        "laser": {"max_new_tokens": 2},
    }
    assert set(options) == set(ALL_METHODS)
    for name, opts in options.items():
        maps = {}
        for weights in ("base", "adapter"):
            method = build_method(name, **opts)
            with _weights(gm, weights):
                if hasattr(method, "prepare"):
                    method.prepare(gm, prep)
                res = method.run(gm, row)
            assert res.maps[0].shape == (6, 10), (name, weights)
            assert np.all(np.isfinite(res.maps[0])) and res.maps[0].min() >= 0, (name, weights)
            for x0, y0, x1, y1 in res.boxes:
                assert 0 <= x0 < x1 <= 280 and 0 <= y0 < y1 <= 168, (name, weights, res.boxes)
            maps[weights] = res.maps[0]
        # the adapter reaches every method: its map differs from the base model's on the same sample
        assert not np.allclose(maps["base"], maps["adapter"], rtol=1e-4, atol=1e-7), name


def test_probe_images_reach_tensorboard(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from klal.callbacks import _log_image

    png = tmp_path / "gallery.png"
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[5:10, 20:30] = (255, 0, 0)
    Image.fromarray(pixels).save(png)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    _log_image(trainer, "probe/answer attention", png, step=7)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("probe/answer attention")
    assert event.step == 7 and (event.width, event.height) == (40, 30)
    import io

    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, pixels)


def test_probe_callback_logs_metrics_and_pictures(tmp_path, task_data):
    import train

    cli = train.main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--data.paths",
            f"[{task_data['grid_patch']}]",
            "--data.generate",
            "null",
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.callbacks+",
            "klal.callbacks.GroundingProbes",
            "--trainer.callbacks.every_n_steps",
            "2",
            "--trainer.callbacks.num_samples",
            "2",
        ]
    )
    probes = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GroundingProbes")
    steps = [h["step"] for h in probes.history]
    assert steps[:1] == [2] and 4 in steps
    key = "probe/answer attention/grid_patch/evidence_mass"
    assert all(0.0 <= h[key] <= 1.0 for h in probes.history)
    pngs = list(Path(tmp_path).rglob("probes/step_2/gallery_answer_attention.png"))
    assert pngs and pngs[0].stat().st_size > 1000
    # probing leaves the trained weights trainable and without stray gradients from the probes
    assert any(p.requires_grad for p in cli.model.model.parameters())
    assert cli.model.model.training


def test_probe_images_reach_wandb_offline(tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from klal.callbacks import _log_image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    png = tmp_path / "gallery.png"
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[5:10, 20:30] = (0, 0, 255)
    Image.fromarray(pixels).save(png)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="klal-test")
    trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    _log_image(trainer, "probe/answer attention", png, step=3)
    logger.experiment.finish()
    (stored,) = (tmp_path / "wandb").glob("offline-run-*/files/media/images/probe/answer attention_*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(stored).convert("RGB")), pixels)


# -- text-only rows ---------------------------------------------------------------------------------------------------


def _text_record(k: int) -> dict:
    from klal.data.schema import Evidence, make_record

    return make_record(
        id=f"text-{k}", task="grid_patch", image=None, question="What is 2 + 3?", answer="5", evidence=Evidence()
    )


@pytest.fixture(scope="module")
def mixed_data(task_data, tmp_path_factory) -> dict[str, str]:
    """The same grid_patch image rows saved twice in the klal schema: alone, and with text-only rows mixed in (first
    rows of a split, between image rows and last), plus a dataset of text-only rows alone."""
    import datasets

    from klal.data.schema import FEATURES
    from klal.evaluation import load_split

    source = list(load_split(task_data["grid_patch"], "train", 7))
    text = iter(_text_record(k) for k in range(100))
    image_only = {"test": source[:4], "train": source[4:7]}
    # Every split starts with a text row; "test" also has two in a row and one at the end.
    mixed = {
        "test": [next(text), source[0], source[1], next(text), next(text), source[2], source[3], next(text)],
        "train": [next(text), next(text), source[4], source[5], next(text), source[6]],
    }
    mixed["validation"] = mixed["test"]
    text_only = {name: [next(text), next(text)] for name in ("train", "validation", "test")}
    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for name, splits in (("image_only", image_only), ("mixed", mixed), ("text_only", text_only)):
        dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=FEATURES) for k, v in splits.items()})
        dd.save_to_disk(str(root / name))
        out[name] = str(root / name)
    return out


def test_text_only_rows_are_refused_by_methods_with_a_clear_error(task_data):
    from klal.grounding import GroundingError, build_method
    from klal.models.loader import ModelConfig

    gm = GroundingModel.load(ModelConfig(max_pixels=224 * 224))
    with pytest.raises(GroundingError, match="sample 'text-0' is text-only"):
        build_method("attention_probe", query="answer_last").run(gm, _text_record(0))
    # Every method relies on sample_images for this check (none repeats it), so each must give the same error.
    for name in ("entropy_gradient", "vicrop_rel_att", "vicrop_grad_att", "laser"):
        with pytest.raises(GroundingError, match="sample 'text-0' is text-only"):
            build_method(name).run(gm, _text_record(0))


def test_evaluate_skips_text_only_rows_and_counts_them(tmp_path, mixed_data, caplog):
    """Mixed in text-only rows change nothing: the same metrics, samples and costs as the image rows alone (batched
    over image rows only, localization heads discovered on image rows only, no 0 x 0 crop-size refusal), and the
    number skipped is in results.json, results.md and the log."""
    import logging

    from klal.evaluation import EvalConfig, MethodSpec
    from klal.evaluation import evaluate as run_eval
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
        with caplog.at_level(logging.WARNING, logger="klal.evaluation"):
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


def test_probe_subset_leaves_out_text_only_rows(mixed_data):
    import lightning as L

    from klal.callbacks import GroundingProbes
    from klal.evaluation import load_split

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    images = list(load_split(mixed_data["image_only"], "test"))
    probes = GroundingProbes(data=mixed_data["mixed"], split="test", num_samples=3)
    # The first 3 image rows sit among rows 0-5 of the split; rows 0, 3 and 4 before them are text-only.
    with pytest.warns(UserWarning, match=r"skipped 3 text-only row\(s\) of .*mixed \[test\].*probing 3 image row"):
        probes.setup(trainer, None, "fit")
    assert [r["id"] for r in probes.rows] == [r["id"] for r in images[:3]]
    assert probes.text_only_skipped == 3
    # Fewer image rows than asked for: all of them, and every text row counted.
    probes = GroundingProbes(data=mixed_data["mixed"], split="test", num_samples=10)
    with pytest.warns(UserWarning, match=r"skipped 4 text-only row\(s\)"):
        probes.setup(trainer, None, "fit")
    assert [r["id"] for r in probes.rows] == [r["id"] for r in images]
    # A split without any image is refused, naming it.
    probes = GroundingProbes(data=mixed_data["text_only"], split="validation", num_samples=2)
    with pytest.raises(ValueError, match=r"GroundingProbes: .*text_only \[validation\] has no row with an image"):
        probes.setup(trainer, None, "fit")


def test_probe_callback_on_a_validation_split_with_text_rows(tmp_path, mixed_data):
    """Through the datamodule (train.py validate): the subset is the first image rows of the validation split, the
    warning names the dataset and split, and the probe scores only those rows."""
    import train

    with pytest.warns(UserWarning, match=r"skipped 3 text-only row\(s\) of .*mixed \[validation\]"):
        cli = train.main(
            [
                "validate",
                "--config",
                str(REPO / "configs" / "demo.yaml"),
                "--data.paths",
                f"[{mixed_data['mixed']}]",
                "--data.generate",
                "null",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.callbacks+",
                "klal.callbacks.GroundingProbes",
                "--trainer.callbacks.num_samples",
                "3",
                "--trainer.callbacks.gallery_size",
                "0",
            ]
        )
    from klal.evaluation import load_split

    probes = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GroundingProbes")
    # The validation split holds the same rows as "test": its first 3 image rows are the image-only set's first 3.
    assert [r["id"] for r in probes.rows] == load_split(mixed_data["image_only"], "test", 3)["id"][:]
    (record,) = [json.loads(p.read_text()) for p in Path(tmp_path).rglob("probes/step_0/metrics.json")]
    assert record["samples"] == [r["id"] for r in probes.rows]
    assert record["text_only_skipped"] == 3
    assert record["scores"]["answer attention"]["grid_patch"]["evidence_mass"]["count"] == 3
