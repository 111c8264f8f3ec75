"""evaluate.py / klal evaluate (klal.eval.cli) end to end on the tiny model: every method over a few samples of each
synthetic task, the files it writes, metric ranges, and one clear error line (exit status 2) per kind of bad input."""

from __future__ import annotations

import json
import re

import pytest
import yaml

import evaluate
from klal.cli import build_parser
from klal.eval.cli import EvalCommand
from tests.eval_data import MODEL_FLAGS, REPO

pytest_plugins = ["tests.eval_data"]


def fails(capsys, argv: list[str]) -> str:
    """Run evaluate.py on ``argv``, expecting a user error: exit status 2 and one line on stderr, returned."""
    capsys.readouterr()  # what the test itself printed before (progress bars of save_to_disk)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_eval_configs_parse_and_name_their_command(path):
    assert path.read_text().splitlines()[0].startswith("# python evaluate.py --config ")
    ns = build_parser(EvalCommand, "evaluate.py").parse_args(["--config", str(path)])
    from klal.eval.config import MethodSpec
    from klal.grounding import build_method

    for m in ns.methods:
        spec = MethodSpec(**vars(m)) if not isinstance(m, MethodSpec) else m
        build_method(spec.name, **spec.options)


def test_evaluate_every_method_on_every_task(tmp_path, task_data, adapter_dir):
    methods = [
        # Answers of at most 4 tokens and one zoom round (crops still used): the random tiny model never stops on its
        # own, so the defaults (EGG's 100 tokens over up to 3 images per round) made this the suite's slowest test.
        {
            "name": "attention_probe",
            "label": "base model attention",
            "options": {"query": "generated_last", "max_new_tokens": 4},
        },
        {
            "name": "attention_probe",
            "label": "KLAL fine-tuned attention",
            "weights": "adapter",
            "options": {"query": "generated_last", "max_new_tokens": 4},
        },
        {"name": "localization_heads", "options": {"floor": 0.0}},
        {"name": "entropy_gradient", "options": {"max_rounds": 1, "max_new_tokens": 4}},
        {"name": "vicrop_rel_att", "options": {"max_new_tokens": 4}},
        {"name": "vicrop_grad_att", "options": {"max_new_tokens": 4}},
        {"name": "laser", "options": {"max_new_tokens": 4}},
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
    from klal.eval.report import check_ranges, slug

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


def test_unknown_method_is_refused_before_loading(tmp_path, task_data, capsys):
    assert re.search(
        "unknown grounding method 'nope'.*available",
        fails(capsys, ["--data", f"[{task_data['grid_patch']}]", "--methods", '[{"name": "nope"}]', *MODEL_FLAGS]),
    )


def test_adapter_rows_need_an_adapter(task_data, capsys):
    assert re.search(
        "runs on the adapter, but no --adapter",
        fails(
            capsys,
            [
                "--data",
                f"[{task_data['grid_patch']}]",
                "--methods",
                '[{"name": "attention_probe", "weights": "adapter"}]',
                *MODEL_FLAGS,
            ],
        ),
    )


def test_adapter_for_another_base_model_is_refused(tmp_path, task_data, adapter_dir, capsys):
    import shutil

    other = tmp_path / "other_adapter"
    shutil.copytree(adapter_dir, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny"
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-VL-7B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    assert re.search(
        "trained on base model 'Qwen/Qwen2.5-VL-7B-Instruct'.*'tiny'",
        fails(capsys, ["--data", f"[{task_data['grid_patch']}]", "--adapter", str(other), *MODEL_FLAGS]),
    )


def test_dataset_without_evidence_column_is_named(tmp_path, task_data, capsys):
    import datasets

    dd = datasets.load_from_disk(task_data["grid_patch"])
    broken = tmp_path / "no_evidence"
    datasets.DatasetDict({k: v.remove_columns("evidence") for k, v in dd.items()}).save_to_disk(str(broken))
    assert re.search(r"no_evidence.*evidence", fails(capsys, ["--data", f"[{broken}]", *MODEL_FLAGS]))


@pytest.mark.parametrize("name", ["vicrop_rel_att", "entropy_gradient", "laser"])
def test_image_too_small_for_a_crop_names_the_sample(tmp_path, task_data, name, capsys):
    from klal.data.io import load_split

    first = load_split(task_data["grid_patch"], "test", 1)[0]
    methods = f'[{{"name": "attention_probe"}}, {{"name": "{name}", "options": {{"min_crop": 1000}}}}]'
    match = rf"^evaluate.py: error: {name}: sample '{first['id']}' of .*grid_patch has an image of 224 x 224 px"
    match += r".*min_crop=1000"
    assert re.search(
        match,
        fails(
            capsys,
            ["--data", f"[{task_data['grid_patch']}]", "--max_samples", "1", "--methods", methods]
            + ["--out", str(tmp_path / "o"), *MODEL_FLAGS],
        ),
    )
    assert not (tmp_path / "o").exists()  # refused before any method ran (the output folder is made after loading)


def test_data_takes_one_path_or_a_list(tmp_path, task_data):
    """--data DIR (a single path) and --data '[DIR, DIR]' both work; the results name the datasets given."""
    common = ["--max_samples", "1", "--gallery_size", "0", "--progress", "false", *MODEL_FLAGS]
    one = evaluate.main(["--data", task_data["grid_patch"], "--out", str(tmp_path / "one"), *common])
    assert one["datasets"] == [task_data["grid_patch"]]
    assert one["metrics"]["base model attention"]["grid_patch"]["evidence_mass"]["count"] == 1
    both = f"[{task_data['grid_patch']}, {task_data['line_tracing']}]"
    two = evaluate.main(["--data", both, "--out", str(tmp_path / "two"), *common])
    assert two["datasets"] == [task_data["grid_patch"], task_data["line_tracing"]]
    assert set(two["metrics"]["base model attention"]) == {"grid_patch", "line_tracing"}
    # The same sample scores the same whichever way the dataset was given.
    assert two["metrics"]["base model attention"]["grid_patch"] == one["metrics"]["base model attention"]["grid_patch"]


def test_klal_evaluate_is_the_same_command(tmp_path, capsys):
    from klal.__main__ import main as klal_main

    with pytest.raises(SystemExit) as exc:
        klal_main(["evaluate", "--data", str(tmp_path / "missing"), *MODEL_FLAGS])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"klal evaluate: error: dataset directory not found: {tmp_path / 'missing'}\n"
