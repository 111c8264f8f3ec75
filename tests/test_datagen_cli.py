"""Dataset writer, data_gen CLI and preview: splits, determinism across workers, atomic output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_gen.cli import main, parse_generate
from data_gen.tasks import TASKS, TaskUnavailableError, build_task, get_task_class, task_names
from data_gen.tasks.grid_patch import GridPatchConfig, GridPatchTask
from data_gen.writer import MANIFEST_NAME, DatasetWriteError, generate_dataset, split_sizes
from klal.cli import expand_key_values

SMALL = {"image_size": 64, "rows": (2, 4), "cols": (2, 4), "num_distractors": 2, "line_width": 1}


def small_task() -> GridPatchTask:
    return build_task("grid_patch", overrides=SMALL)


class FailingTask(GridPatchTask):
    """Grid patch that fails at one index, to interrupt generation part-way."""

    def __init__(self, config: GridPatchConfig, fail_at: int, exc: type[BaseException]) -> None:
        super().__init__(config)
        self.fail_at, self.exc = fail_at, exc

    def sample(self, seed: int, index: int):
        if index == self.fail_at:
            raise self.exc(f"injected failure at {index}")
        return super().sample(seed, index)


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# ------------------------------------------------------------------------------------------------------------ writer
@pytest.mark.parametrize(
    ("num", "sizes"),
    [(3, (1, 1, 1)), (4, (2, 1, 1)), (7, (5, 1, 1)), (10, (8, 1, 1)), (100, (80, 10, 10)), (25, (20, 3, 2))],
)
def test_split_sizes_hand_worked(num: int, sizes: tuple[int, int, int]) -> None:
    # 25: raw 20 / 2.5 / 2.5 -> floors 20/2/2, the one left over goes to the earlier tied split (validation).
    assert tuple(split_sizes(num).values()) == sizes


@pytest.mark.parametrize(("num", "fractions"), [(2, (0.8, 0.1, 0.1)), (10, (0.5, 0.5)), (10, (0.9, 0.1, 0.0))])
def test_split_sizes_rejects(num: int, fractions: tuple[float, ...]) -> None:
    with pytest.raises(DatasetWriteError):
        split_sizes(num, fractions)


def test_workers_give_identical_datasets(tmp_path: Path) -> None:
    task = small_task()
    one = generate_dataset(task, 23, 7, tmp_path / "w1", workers=1, progress=False)
    two = generate_dataset(task, 23, 7, tmp_path / "w2", workers=2, progress=False)
    for split in ("train", "validation", "test"):
        a = (tmp_path / "w1" / split).glob("data-*.arrow")
        for fa in sorted(a):
            assert fa.read_bytes() == (tmp_path / "w2" / split / fa.name).read_bytes()
        ra = one[split].cast_column("image", datasets.Image(decode=False))
        rb = two[split].cast_column("image", datasets.Image(decode=False))
        assert ra.to_list() == rb.to_list()
    # Splits are consecutive index ranges and sample i is task.sample(seed, i).
    ids = [r["id"] for s in ("train", "validation", "test") for r in one[s].select_columns(["id"])]
    assert ids == [f"grid_patch-7-{i:06d}" for i in range(23)]
    # 23 x (0.8, 0.1, 0.1) = 18.4 / 2.3 / 2.3: the leftover sample goes to the largest remainder (train).
    assert [len(one[s]) for s in ("train", "validation", "test")] == [19, 2, 2]
    ref = task.sample(7, 20)
    row = one["validation"][1]
    assert row["answer"] == ref.answer and np.array_equal(np.asarray(row["image"]), np.asarray(ref.image))
    assert json.loads(row["meta"])["rows"] == ref.meta["rows"]
    manifest = json.loads((tmp_path / "w1" / MANIFEST_NAME).read_text())
    assert manifest["task"] == "grid_patch" and manifest["seed"] == 7 and manifest["num"] == 23
    assert manifest["splits"] == {"train": [0, 19], "validation": [19, 21], "test": [21, 23]}
    assert manifest["config"]["rows"] == [2, 4] and "generator_version" in manifest
    assert leftovers(tmp_path, {"w1", "w2"}) == []


@pytest.mark.parametrize(("workers", "exc"), [(1, RuntimeError), (2, RuntimeError), (1, KeyboardInterrupt)])
def test_interrupted_generation_leaves_nothing(tmp_path: Path, workers: int, exc: type[BaseException]) -> None:
    task = FailingTask(GridPatchConfig(**SMALL), fail_at=9, exc=exc)
    with pytest.raises(exc, match="injected failure at 9"):
        generate_dataset(task, 12, 0, tmp_path / "out", workers=workers, progress=False)
    assert leftovers(tmp_path, set()) == []


def test_existing_output_refused_then_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    generate_dataset(small_task(), 3, 1, out, progress=False)
    with pytest.raises(DatasetWriteError, match="already exists"):
        generate_dataset(small_task(), 3, 2, out, progress=False)
    assert json.loads((out / MANIFEST_NAME).read_text())["seed"] == 1

    # A failing overwrite keeps the old dataset.
    with pytest.raises(RuntimeError):
        generate_dataset(FailingTask(GridPatchConfig(**SMALL), 1, RuntimeError), 3, 3, out, overwrite=True,
                         progress=False)  # fmt: skip
    assert json.loads((out / MANIFEST_NAME).read_text())["seed"] == 1

    dd = generate_dataset(small_task(), 4, 2, out, overwrite=True, progress=False)
    assert json.loads((out / MANIFEST_NAME).read_text())["seed"] == 2
    assert dd["train"][0]["id"] == "grid_patch-2-000000"
    assert leftovers(tmp_path, {"ds"}) == []


def test_overwrite_refuses_non_dataset_dir(tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(DatasetWriteError, match="not a dataset"):
        generate_dataset(small_task(), 3, 0, other, overwrite=True, progress=False)
    assert (other / "keep.txt").read_text() == "precious"


# ------------------------------------------------------------------------------------------------------ value parsing
def parsed(args: list[str], task: str = "grid_patch") -> dict:
    """The typed config values that a command line gives (jsonargparse, with the comma-list convenience)."""
    return parse_generate(task, ["--num", "3", "--out", "unused", *args])[1]


def parse_fails(capsys: pytest.CaptureFixture[str], args: list[str], task: str = "grid_patch") -> str:
    with pytest.raises(SystemExit) as exc:
        parse_generate(task, ["--num", "3", "--out", "unused", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data_gen: error: "), err
    return err[0]


def test_option_values_are_typed_by_the_config_dataclass() -> None:
    assert parsed(["--rows", "4,8"])["rows"] == (4, 8)
    assert parsed(["--rows", "[4, 8]"])["rows"] == (4, 8)
    assert parsed(["--rows", "(4, 8)"])["rows"] == (4, 8)
    assert parsed(["--rows=4,8"])["rows"] == (4, 8)
    assert parsed(["--shapes", "circle, star"])["shapes"] == ("circle", "star")
    assert parsed(["--curve-length", "0.5,1.5"], "line_intersection")["curve_length"] == (0.5, 1.5)
    assert parsed(["--state_grid_size", "false"])["state_grid_size"] is False
    assert parsed(["--state-grid-size", "Yes"])["state_grid_size"] is True
    assert parsed(["--state_grid_size"])["state_grid_size"] is True  # a bare flag is true
    assert parsed(["--image-size", "96"])["image_size"] == 96
    cfg = parsed([])
    assert cfg == {f: getattr(GridPatchConfig(), f) for f in cfg}  # the defaults are the dataclass's


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rows", "4"], "--rows"),
        (["--rows", "x,y"], "--rows"),
        (["--state_grid_size", "maybe"], "--state_grid_size"),
        (["--num_distractors", "1.5"], "--num_distractors"),
        (["--bogus", "1"], "--bogus"),
    ],
)
def test_bad_option_values_name_the_option(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    assert needle in parse_fails(capsys, args)


def test_set_items_are_options_applied_last(capsys: pytest.CaptureFixture[str]) -> None:
    got = parsed(["--set", "rows=3,5", "shape_scale=0.5", "state_grid_size=true", "--rows", "1,2"])
    assert (got["rows"], got["shape_scale"], got["state_grid_size"]) == ((3, 5), 0.5, True)
    assert parsed(["--set=rows=2,6"])["rows"] == (2, 6)
    with pytest.raises(ValueError, match="bogus"):
        expand_key_values(["--set", "bogus=1"], "--set", "", ["rows"], "task 'grid_patch'")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        expand_key_values(["--set", "rows"], "--set", "", ["rows"], "task 'grid_patch'")
    with pytest.raises(ValueError, match="twice"):
        expand_key_values(["--set", "rows=1,2", "rows=2,3"], "--set", "", ["rows"], "task 'grid_patch'")


def test_preset_is_applied_before_the_options() -> None:
    easy = GridPatchTask.presets["easy"]
    got = parsed(["--preset", "easy", "--rows", "2,3"])
    assert got["rows"] == (2, 3) and got["cols"] == easy["cols"] and got["num_distractors"] == easy["num_distractors"]
    # line_tracing's easy preset sets line_width 4; the flag beats it.
    assert parsed(["--preset", "easy", "--line-width", "3"], "line_tracing")["line_width"] == 3
    assert parsed(["--preset", "easy"], "line_tracing")["line_width"] == 4


def test_task_help_lists_typed_options_defaults_and_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["grid_patch", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ["--num", "--rows", "tuple[int, int]", "default: (4, 12)", "--image_size", "presets", "easy:"]:
        assert needle in out, needle
    assert "Inclusive range the number of grid rows" in out  # the attribute docstring


# --------------------------------------------------------------------------------------------------------------- CLI
def test_cli_generates_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    rc = main(
        ["grid_patch", "--num", "5", "--seed", "4", "--out", str(out), "--image-size", "96", "--line-width", "3",
         "--preset", "easy", "--set", "rows=2,3", "num_distractors=1", "state_grid_size=true", "--quiet"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    cfg = manifest["config"]
    # --set beats the preset (rows), the preset beats the defaults (cols), flags set their fields.
    assert cfg["rows"] == [2, 3] and cfg["cols"] == [3, 5] and cfg["num_distractors"] == 1
    assert cfg["image_size"] == 96 and cfg["line_width"] == 3 and cfg["state_grid_size"] is True
    dd = datasets.load_from_disk(str(out))
    assert sum(len(v) for v in dd.values()) == 5
    row = dd["train"][0]
    assert row["image"].size == (96, 96) and row["question"].startswith("The grid has")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["grid_patch", "--num", "0"], "--num"),
        (["grid_patch", "--num", "-5"], "--num"),
        (["grid_patch", "--num", "2"], "num=2"),
        (["grid_patch", "--num", "5", "--workers", "0"], "--workers"),
        (["grid_patch", "--num", "5", "--seed", "-1"], "--seed"),
        (["no_such_task", "--num", "5"], "no_such_task"),
        (["grid_patch", "--num", "5", "--set", "rows=5,3"], "rows"),
        (["grid_patch", "--num", "5", "--set", "bogus=1"], "bogus"),
        (["grid_patch", "--num", "5", "--set", "rows=a,b"], "rows"),
        (["grid_patch", "--num", "5", "--preset", "insane"], "insane"),
        (["grid_patch", "--num", "5", "--splits", "0.5,0.5"], "splits"),
        (["grid_patch", "--num", "5", "--image-size", "40"], "image_size"),
        (["grid_patch"], "--num"),
        ([], "TASK"),
    ],
)
def test_cli_bad_arguments_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    out = tmp_path / "ds"
    argv = [*args, "--out", str(out)] if args and args[0] == "grid_patch" else args
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("data_gen: error: ") and needle in lines[0]
    assert not out.exists() and leftovers(tmp_path, set()) == []


def test_cli_existing_output_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    argv = ["grid_patch", "--num", "3", "--out", str(out), "--image-size", "64", "--quiet", "--set", "rows=2,4",
            "cols=2,4", "num_distractors=1"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert main([*argv, "--overwrite"]) == 0


# ----------------------------------------------------------------------------------------------------------- preview
def test_preview_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds"
    generate_dataset(small_task(), 6, 0, ds, progress=False)
    png = tmp_path / "p" / "preview.png"
    assert (
        main(["preview", str(ds), "--out", str(png), "--num", "3", "--cols", "2", "--spec", "box_mode=gaussian"]) == 0
    )
    with Image.open(png) as im:
        # Two panels of 3.6 in at 100 dpi side by side.
        assert im.format == "PNG" and im.size[0] == 720 and im.size[1] > 500
    assert main(["preview", str(ds), "--out", str(png), "--split", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["preview", str(tmp_path / "missing"), "--out", str(png)]) == 2


# ---------------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", task_names())
def test_every_registered_task_runs_through_cli(tmp_path: Path, name: str) -> None:
    assert get_task_class(name).name == name
    out = tmp_path / name
    assert main([name, "--num", "3", "--seed", "2", "--out", str(out), "--workers", "2", "--quiet"]) == 0
    dd = datasets.load_from_disk(str(out))
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    assert dd["test"][0]["id"] == f"{name}-2-000002" and dd["test"][0]["task"] == name


def test_missing_task_module_breaks_only_that_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(TASKS, "ghost", ("data_gen.tasks.no_such_module", "GhostTask"))
    with pytest.raises(TaskUnavailableError, match="ghost"):
        get_task_class("ghost")
    assert main(["ghost", "--num", "3", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ghost" in err[0] and "unavailable" in err[0]
    assert main(["grid_patch", "--num", "3", "--out", str(tmp_path / "ok"), "--preset", "easy", "--quiet"]) == 0


def test_interrupt_exits_130_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import data_gen.writer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_gen.writer, "generate_dataset", interrupted)
    assert main(["grid_patch", "--num", "3", "--out", str(tmp_path / "x"), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["data_gen: interrupted"]
    assert leftovers(tmp_path, set()) == []


def test_klal_generate_is_the_same_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from klal.__main__ import main as klal_main

    out = tmp_path / "ds"
    assert klal_main(["generate", "grid_patch", "--num", "3", "--out", str(out), "--preset", "easy", "--quiet"]) == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["config"]["rows"] == [3, 5]
    assert klal_main(["generate", "grid_patch", "--num", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("klal generate: error: --num")


def test_a_config_field_may_not_shadow_a_writer_option() -> None:
    from dataclasses import dataclass

    from data_gen.base import GenerationError
    from data_gen.cli import task_parser

    @dataclass
    class SeededConfig(GridPatchConfig):
        seed: int = 3

    class SeededTask(GridPatchTask):
        name = "seeded"
        config_cls = SeededConfig

    with pytest.raises(GenerationError, match=r"task 'seeded': config field\(s\) \['seed'\] clash"):
        task_parser(SeededTask, "data_gen seeded")
