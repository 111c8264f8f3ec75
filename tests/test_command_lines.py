"""The command lines of the bench scripts and the demo: typed options (klal.cli), the flags their docstrings and
BENCHMARKS.md quote, list options, one-line errors with exit status 2, and --help."""

from __future__ import annotations

import functools
import importlib

import pytest


def spy(monkeypatch: pytest.MonkeyPatch, module: str, name: str) -> dict:
    """Replace ``module.name`` by a function with the same signature that records its arguments."""
    mod = importlib.import_module(module)
    seen: dict = {}
    real = getattr(mod, name)

    @functools.wraps(real)
    def record(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)

    monkeypatch.setattr(mod, name, record)
    return seen


def test_bench_step_flags_as_quoted(monkeypatch):
    seen = spy(monkeypatch, "bench.step", "benchmark")
    argv = ["--arch", "3b", "--device", "cuda", "--visual-tokens", "1024", "--dtype", "bfloat16"]
    importlib.import_module("bench.step").main([*argv, "--gradient-checkpointing"])
    assert seen["kwargs"] == {
        "arch": "3b",
        "family": "tiny",
        "device": "cuda",
        "dtype": "bfloat16",
        "visual_tokens": 1024,
        "batch": 2,
        "steps": 5,
        "layers": None,
        "gradient_checkpointing": True,
        "modes": "ntp,measure,capture,eager",
        "threads": None,
        "seed": 0,
    }


def test_bench_step_family_flag(monkeypatch):
    seen = spy(monkeypatch, "bench.step", "benchmark")
    importlib.import_module("bench.step").main(["--family", "tiny-qwen3.5", "--steps", "2"])
    assert seen["kwargs"]["family"] == "tiny-qwen3.5" and seen["kwargs"]["arch"] == "tiny"


def test_bench_throughput_options(monkeypatch):
    seen = spy(monkeypatch, "bench.throughput", "benchmark")
    importlib.import_module("bench.throughput").main(
        ["--steps", "21", "--warmup=3", "--threads", "1", "--gradient_checkpointing", "both", "--peak-tflops", "9.5"]
    )
    (opts,) = seen["args"]
    assert (opts.steps, opts.warmup, opts.threads, opts.gradient_checkpointing) == (21, 3, 1, "both")
    assert opts.peak_tflops == 9.5 and opts.arch == "tiny" and opts.json is None


def test_bench_probes_and_datagen_list_options(monkeypatch):
    seen = spy(monkeypatch, "bench.probes", "benchmark")
    importlib.import_module("bench.probes").main(["--methods", "attention_probe", "laser", "--batch-size", "6"])
    (opts,) = seen["args"]
    assert opts.methods == ["attention_probe", "laser"] and opts.batch_size == 6
    seen = spy(monkeypatch, "bench.datagen", "benchmark")
    datagen = importlib.import_module("bench.datagen")
    datagen.main(["--num", "500", "--workers", "1", "2", "4", "--tasks", "grid_patch", "--repeat", "3"])
    (opts,) = seen["args"]
    assert (opts.num, opts.workers, opts.tasks, opts.repeat) == (500, [1, 2, 4], ["grid_patch"], 3)
    datagen.main(["--workers", "1,2"])
    assert seen["args"][0].workers == [1, 2] and seen["args"][0].tasks is None


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("bench.step", ["--arch", "13b"], "arch"),
        ("bench.step", ["--steps", "0"], "steps"),
        ("bench.throughput", ["--gradient-checkpointing", "sometimes"], "gradient_checkpointing"),
        ("bench.probes", ["--batch-size", "0"], "batch_size"),
        ("bench.datagen", ["--num", "2"], "--num must be >= 3"),
        ("bench.datagen", ["--workers", "0"], "workers"),
        ("studies.demo", ["--num-images", "0"], "num_images"),
        ("studies.demo", ["--config-of-train", "x"], "config_of_train"),
    ],
)
def test_mistakes_are_one_line_exit_2(capsys, module, args, needle):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(args, prog="cmd")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmd: error: ") and needle in err[0], err


@pytest.mark.parametrize("module", ["bench.step", "bench.throughput", "bench.probes", "bench.datagen", "studies.demo"])
def test_help_lists_the_options(capsys, module):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"], prog="cmd")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cmd") and "(type: " in out


def test_demo_passes_the_rest_to_train_py(monkeypatch):
    seen = spy(monkeypatch, "studies.demo", "demo")
    demo = importlib.import_module("studies.demo")
    demo.main(["--steps", "40", "--out", "runs/q", "--extra", "--model.klal_weight", "0.5", "--trainer.max_epochs=2"])
    kw = seen["kwargs"]
    assert kw["steps"] == 40 and kw["out"] == "runs/q" and kw["num_images"] == 4
    assert kw["extra"] == ["--model.klal_weight", "0.5", "--trainer.max_epochs=2"]  # untouched, dashes and all
    demo.main(["--num-images", "2", "--", "--data.batch_size", "4"])
    assert seen["kwargs"]["extra"] == ["--data.batch_size", "4"] and seen["kwargs"]["num_images"] == 2
    demo.main([])
    assert seen["kwargs"]["extra"] is None and seen["kwargs"]["train_config"].endswith("configs/demo.yaml")
