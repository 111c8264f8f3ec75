"""Small-scale reproduction of the KLAL paper's comparison: Base vs NTP vs NTP + KLAL on the synthetic tasks.

The pieces of ``python -m studies.reproduce`` (:mod:`studies.reproduce.run`), importable so tests can run the
pipeline at a toy size:

* :class:`StudyConfig` (read from ``configs/repro/*.yaml``): tasks and their generator settings, the tiny model's
  size, the trainable set, the training schedule, the two arms, seeds, the lambda / query sweep and the probes.
* :func:`make_data`: generate each task's dataset once.
* :func:`train_run`: train one run (task, lambda, query, seed) with Lightning, logging a learning curve (exact-match
  accuracy and attention mass inside the evidence on a fixed validation subset) and saving the trainable weights.
* :func:`evaluate_model`: test-split metrics of a model (trained or untrained): teacher-forced exact match, greedy
  generation + normalised match, and the grounding metrics of the answer token's attention (pointing game, mass
  inside the evidence cells).
* :func:`load_trained`: a finished run's model, from its saved weights or (full-size recipe) its peft adapter.

``python -m studies.reproduce`` (:mod:`studies.reproduce.run`) strings these into stages (data, train, eval,
probes, report) and writes the report.

Exact match in one teacher-forced pass (:func:`klal.eval.attention.teacher_forced_exact`) equals greedy exact match on
the token sequence, so one forward pass over prompt + gold answer scores a whole batch, which is what the learning
curves use. It is token-exact, so the final table also reports real greedy generation scored by the normalised match.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import numpy as np
import torch

from klal.data.targets import TargetSpec
from klal.geometry import DEFAULT_MIN_PIXELS
from klal.models.lora import BASE_PARTS, LoraSettings
from studies.reproduce.wrong_answer import WRONG_ANSWER

TASKS = (
    "grid_patch",
    "line_intersection",
    "line_tracing",
    "shape_lookup",
    "colour_lookup",
    "neighbour_lookup",
    "ring_colour",
    "outline_colour",
    "beside_colour",
)
T = TypeVar("T")


# -- configuration -----------------------------------------------------------------------------------------------------
@dataclass
class TaskSettings:
    """How one task's dataset is generated."""

    num: int = 1500
    """Samples in all splits."""
    splits: tuple[float, float, float] = (0.8, 0.066, 0.134)
    """train / validation / test fractions."""
    preset: str | None = "easy"
    """Generator difficulty preset."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Generator config overrides (``python -m data_gen TASK --help`` lists them)."""
    seed: int = 0
    """Dataset seed (the same data for every run)."""


@dataclass
class ExtraRun:
    """One investigation run of ``extra_runs``: a KLAL run that differs from the main arm in one choice."""

    task: str | None = None
    """Task (None: the sweep task)."""
    klal_weight: float = 1.0
    """KLAL loss weight (lambda)."""
    klal_query: str = "last"
    """Supervised query token."""
    klal_layers: str | None = None
    """Supervised language layers (``klal.capture.parse_layers`` syntax; None: the study's ``klal_layers``)."""
    seed: int = 0
    """Training seed."""


@dataclass
class PrimaryTest:
    """The one pre-declared test of a study: which comparison, metric and test decide its outcome."""

    arm: str = "klal"
    """The arm compared with the reference arm (the arm with ``klal_weight`` 0)."""
    task: str | None = None
    """The task (None: the study's only task)."""
    metric: Literal["exact_tf", "answer_acc_gen"] = "exact_tf"
    """Teacher-forced exact match or generated-answer accuracy."""
    test: Literal["mcnemar", "bootstrap", "t", "sign_flip", "sign"] = "mcnemar"
    """Over items: ``mcnemar`` (exact, pooled over seeds), ``bootstrap`` (paired, over items); over seeds: ``t``
    (paired t-test), ``sign_flip`` (exact permutation), ``sign`` (sign test). All two-sided."""
    alpha: float = 0.05
    """Significance level."""


@dataclass
class ScreenSettings:
    """The screen every candidate testbed passes before a confirmatory study of it (stage ``screen``,
    :mod:`studies.reproduce.screen`; issue 30). A task passes when all three hold:

    1. **readout**: the untrained base answers the task's answer attribute on one-object images (the task's generator
       with ``readout_overrides``), with the task's phrasing, at >= ``min_readout``;
    2. **oracle gain**: on the study's NTP models (the reference arm, every seed, trained at the study's data size),
       pushing the last prompt token's attention onto the asked-for object (the oracle of
       :func:`studies.reproduce.diagnose.oracle`, bias ``beta`` on that object's visual tokens in every layer) raises
       teacher-forced accuracy on the first ``samples`` test items by >= ``min_gain`` over the same models without it,
       at the beta of ``betas`` that does best (mean over seeds), while the same bias on another object of the image
       (the control) raises it by less than ``max_control_gain``;
    3. **NTP gap**: the NTP models' test accuracy (stage ``eval``) is >= ``min_gap`` below the oracle's accuracy.
    """

    samples: int = 200
    """Test items the oracle scores (the first ones of the test split)."""
    readout_samples: int = 200
    """One-object images the base's readout is scored on."""
    readout_overrides: dict[str, Any] = field(default_factory=lambda: {"num_objects": [1, 1]})
    """Generator overrides (on top of each task's own) that make the one-object images."""
    readout_seed: int = 1
    """Data seed of the one-object images."""
    readout_phrasings: dict[str, list[str]] = field(default_factory=dict)
    """Task -> other phrasings the base's readout is also scored with, on the same images (``{selector}``: the
    colour the question names); reported beside criterion 1, not part of it."""
    betas: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])
    """Oracle biases tried; the best one (mean accuracy over seeds) is the oracle's, and the control uses it too."""
    min_readout: float = 0.9
    """Criterion 1."""
    min_gain: float = 0.10
    """Criterion 2: oracle accuracy minus accuracy without it, same models and items."""
    max_control_gain: float = 0.10
    """Criterion 2's control: the bias on another object must raise accuracy by less than this."""
    min_gap: float = 0.10
    """Criterion 3: oracle accuracy minus the NTP models' test accuracy."""


ANSWER_RENDERS = ("as_generated", "leading_space", "fewest_tokens")
"""How answers are written into a study's datasets (``answer_render``): as the generator wrote them, always with a
leading space, or with a leading space only where the model's tokenizer then needs fewer tokens."""

CONFIRMATORY_MIN_TEST = 1000
"""Fewest test items a confirmatory study may score."""


def _default_lora() -> LoraSettings:
    return LoraSettings(r=16, alpha=32, dropout=0.0, targets="attention")


@dataclass
class StudyConfig:
    """The whole study; every field is a key of ``configs/repro/*.yaml``."""

    tasks: dict[str, TaskSettings] = field(default_factory=dict)
    """Task name -> dataset settings."""
    image_size: int = 224
    """Image side in pixels (224 -> an 8 x 8 grid of visual tokens)."""
    data_dir: str = "data/repro"
    """Where datasets are generated."""
    run_dir: str = "runs/repro"
    """Where runs (weights, curves, metrics) go."""
    results_dir: str = "results/repro"
    """Where the table, JSON and plots go."""
    backbone: str = "tiny"
    """Base model: ``tiny`` (random weights) or ``tiny-base`` (klal's pretrained tiny Qwen2.5-VL), both trained here,
    or a real checkpoint (hub id / folder) whose runs ``train.py`` trained and ``adapter_pattern`` locates; the study
    then evaluates, probes and reports them."""
    dtype: str = "auto"
    """Parameter dtype of the base model (``auto``: float32 for tiny and tiny-base, bfloat16 otherwise)."""
    adapter_pattern: str | None = None
    """With a real backbone: where each run's peft adapter is, e.g. ``runs/paper/{task}/{arm}_s{seed}/adapter``."""
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    """Size of the tiny model (its family's ``tiny_config`` keyword overrides, checked there; a mapping like
    ``klal.models.loader.ModelConfig.tiny_overrides``)."""
    tiny_seed: int = 0
    """Initialisation seed of the tiny model: the fixed "pretrained" base every run starts from."""
    lora: LoraSettings = field(default_factory=_default_lora)
    """LoRA of every run (default: rank 16, alpha 32, no dropout, attention projections; a mapping that gives only
    some keys keeps these defaults for the others)."""
    train_extra: list[str] = field(default_factory=list)
    """Base-model parts trained in full besides LoRA: ``merger``, ``vision``, ``embed_tokens``, ``lm_head``."""
    klal_layers: str | list[int] = "all"
    """Supervised language layers (``klal.capture.parse_layers`` syntax)."""
    target: TargetSpec = field(default_factory=TargetSpec)
    """How evidence becomes the KLAL target maps (default: box area, point Gaussian of sigma 1 token, polyline band of
    1 token)."""
    steps: int = 300
    """Optimizer steps per run."""
    batch_size: int = 8
    """Training batch size."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds (LoRA init and data order); the base model and data are the same for every seed."""
    arms: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"ntp": {"klal_weight": 0.0}, "klal": {"klal_weight": 1.0, "klal_query": "last"}}
    )
    """Arm name -> ``klal_weight`` and ``klal_query``; everything else is shared."""
    eval_every: int = 50
    """Learning-curve evaluation interval (steps); step 0 is always measured."""
    curve_samples: int = 64
    """Validation samples of each learning-curve point."""
    test_samples: int | None = None
    """Test samples of the final evaluation (None: the whole test split)."""
    eval_batch_size: int = 16
    """Batch size of every evaluation."""
    generate: bool = True
    """Also score real greedy generation with the normalised answer match."""
    max_new_tokens: int = 10
    """Generation length cap."""
    sweep_task: str | None = "grid_patch"
    """Task of the lambda / query sweep (None: no sweep)."""
    sweep_lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0, 3.0])
    """Lambdas of the sweep."""
    sweep_queries: list[str] = field(default_factory=lambda: ["last", "all"])
    """Query-token choices of the sweep."""
    sweep_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the sweep."""
    extra_runs: list[ExtraRun] = field(default_factory=list)
    """Investigation runs, reported in their own table."""
    probe_methods: list[str | dict[str, Any]] | None = None
    """Training-free methods of :mod:`klal.grounding`: names, or mappings of ``name``, ``options`` and ``label``
    (None: every registered method with its defaults)."""
    probe_arms: list[str] = field(default_factory=lambda: ["ntp"])
    """Models the probes run on: arm names (trained, ``probe_seeds``) and/or ``base`` (untrained)."""
    probe_samples: int = 50
    """Test samples per probe run."""
    probe_prepare_samples: int = 64
    """Training samples a method that needs preparation (localization-head discovery) sees."""
    probe_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the trained runs the probes are run on."""
    leak_arms: list[str] = field(default_factory=list)
    """Arms the wrong-answer diagnostic (:mod:`studies.reproduce.leak`, stage ``leak``) runs on; empty: none."""
    leak_seeds: list[int] | None = None
    """Seeds of those arms it runs on (None: every seed)."""
    leak_samples: int = 200
    """Test items of the diagnostic (the first ones of the test split)."""
    screen: ScreenSettings = field(default_factory=ScreenSettings)
    """The testbed screen (stage ``screen``): readout of the base, oracle gain and control, NTP gap."""
    confirmatory: bool = False
    """A confirmatory study: the runner refuses to run it unless this file is committed in git, unchanged since, in a
    commit that holds no result files of the study; it needs ``primary`` and >= 1000 test items. False: a pilot, which
    must use other data seeds than every confirmatory config of its tasks (:mod:`studies.reproduce.protocol`)."""
    primary: PrimaryTest | None = None
    """The one pre-declared primary test (required when ``confirmatory``); the report marks it."""
    answer_render: Literal["as_generated", "leading_space", "fewest_tokens"] = "as_generated"
    """How answers are written into the datasets: as generated, with a leading space (``" red"``, one token where
    the tokenizer has it), or with a leading space only where that takes fewer tokens. The report lists the tokens."""
    bootstrap_samples: int = 10000
    """Resamples of the paired bootstrap over test items."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap's resampling."""
    confirmatory_scan: str = "configs"
    """Folder (searched recursively) holding the confirmatory configs a pilot is checked against."""

    def __post_init__(self) -> None:
        # Mappings (a config built in Python) are typed like the YAML file: by jsonargparse (:func:`typed`).
        self.tasks = {k: typed(TaskSettings, v, f"repro config: tasks.{k}") for k, v in self.tasks.items()}
        self.lora = typed(LoraSettings, self.lora, "repro config: lora", base=_default_lora())
        self.target = typed(TargetSpec, self.target, "repro config: target")
        self.screen = typed(ScreenSettings, self.screen, "repro config: screen")
        self.extra_runs = [typed(ExtraRun, e, f"repro config: extra_runs[{k}]") for k, e in enumerate(self.extra_runs)]
        if self.primary is not None:
            self.primary = typed(PrimaryTest, self.primary, "repro config: primary")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"repro config: unknown task(s) {bad}; choose from {list(TASKS)}")
        bad = [p for p in self.train_extra if p not in BASE_PARTS]
        if bad:
            raise ValueError(f"repro config: train_extra {bad} unknown; choose from {list(BASE_PARTS)}")
        for name, arm in self.arms.items():
            unknown = set(arm) - {"klal_weight", "klal_query"}
            if unknown or "klal_weight" not in arm:
                raise ValueError(f"repro config: arm {name!r} needs klal_weight (and optionally klal_query) only")
        if self.sweep_task is not None and self.sweep_task not in self.tasks:
            raise ValueError(f"repro config: sweep_task {self.sweep_task!r} is not one of the tasks {list(self.tasks)}")
        for key in ("steps", "batch_size", "eval_every", "curve_samples", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"repro config: {key} must be >= 1, got {getattr(self, key)}")
        if not self.seeds:
            raise ValueError("repro config: seeds is empty")
        self._check_leak()
        self._check_protocol()
        if not trains_here(self) and not self.adapter_pattern:
            raise ValueError(
                f"repro config: backbone {self.backbone!r} is trained with train.py (configs/repro/*.yaml); give "
                "adapter_pattern (e.g. runs/paper/{task}/{arm}_s{seed}/adapter) so the study can find the adapters"
            )

    def _check_leak(self) -> None:
        bad = [a for a in self.leak_arms if a not in self.arms]
        if bad:
            raise ValueError(f"repro config: leak_arms {bad} are not arms ({list(self.arms)})")
        bad = [s for s in self.leak_seeds or [] if s not in self.seeds]
        if bad:
            raise ValueError(f"repro config: leak_seeds {bad} are not seeds of the study ({self.seeds})")
        no_rule = [t for t in self.tasks if t not in WRONG_ANSWER]
        if self.leak_arms and no_rule:
            raise ValueError(f"repro config: the wrong-answer diagnostic has no rule for {no_rule}; set leak_arms: []")
        if self.leak_samples < 1:
            raise ValueError(f"repro config: leak_samples must be >= 1, got {self.leak_samples}")

    def _check_protocol(self) -> None:
        """The primary test names an arm, task and test of this study; a confirmatory study declares one and scores
        enough test items."""
        if self.answer_render not in ANSWER_RENDERS:
            raise ValueError(f"repro config: answer_render {self.answer_render!r}; choose from {list(ANSWER_RENDERS)}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"repro config: bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        pt = self.primary
        if pt is not None:
            ref = reference_arm(self)
            if pt.arm not in self.arms or pt.arm == ref:
                others = [a for a in self.arms if a != ref]
                raise ValueError(f"repro config: primary.arm {pt.arm!r} must be an arm compared with {ref!r}: {others}")
            primary_task(self)
            if not 0 < pt.alpha < 1:
                raise ValueError(f"repro config: primary.alpha must be in (0, 1), got {pt.alpha}")
            if pt.metric == "answer_acc_gen" and not self.generate:
                raise ValueError("repro config: primary.metric answer_acc_gen needs generate: true")
        if self.confirmatory:
            if pt is None:
                raise ValueError("repro config: a confirmatory study must declare its one primary test (primary)")
            from data_gen.writer import split_sizes

            for task, ts in self.tasks.items():
                n = split_sizes(ts.num, ts.splits)["test"]
                n = min(n, self.test_samples) if self.test_samples is not None else n
                if n < CONFIRMATORY_MIN_TEST:
                    raise ValueError(
                        f"repro config: a confirmatory study scores >= {CONFIRMATORY_MIN_TEST} test items; "
                        f"tasks.{task} gives {n} (num, splits, test_samples)"
                    )


def trains_here(cfg: StudyConfig) -> bool:
    """Whether the study trains its runs itself (the tiny random model or a bundled base such as ``tiny-base``);
    otherwise ``train.py`` trains them and ``adapter_pattern`` finds them."""
    from klal.models.config import ModelConfig

    backbone = ModelConfig(name_or_path=cfg.backbone)
    return backbone.is_tiny or backbone.is_bundled


def reference_arm(cfg: StudyConfig) -> str:
    """The arm every other arm is compared with: the one with ``klal_weight`` 0 (NTP), else the first arm."""
    return next((a for a, v in cfg.arms.items() if float(v["klal_weight"]) == 0), next(iter(cfg.arms)))


def primary_task(cfg: StudyConfig) -> str:
    """The task of the primary test (``primary.task``, or the study's only task).

    Raises:
        ValueError: no primary test, or its task is not named although the study has several, or is not a task.
    """
    if cfg.primary is None:
        raise ValueError("repro config: no primary test declared")
    task = cfg.primary.task
    if task is None:
        if len(cfg.tasks) != 1:
            raise ValueError(f"repro config: primary.task must name one of the tasks {list(cfg.tasks)}")
        return next(iter(cfg.tasks))
    if task not in cfg.tasks:
        raise ValueError(f"repro config: primary.task {task!r} is not one of the tasks {list(cfg.tasks)}")
    return task


def typed(cls: type[T], value: Any, where: str, base: T | None = None) -> T:
    """``value`` as a ``cls`` dataclass: an instance is kept, None gives ``base`` (default: the class defaults), and a
    mapping is typed and checked by jsonargparse, as every klal command's options are (unknown keys and values of the
    wrong type fail); the keys it leaves out keep ``base``'s values, as in a YAML file read by jsonargparse.

    Raises:
        ValueError: the message starts with ``where`` and names the key at fault.
    """
    from jsonargparse import ArgumentError, ArgumentParser

    if isinstance(value, cls):
        return value
    if value is None:
        return copy.deepcopy(base) if base is not None else cls()
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {value!r}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "value")
    try:
        given = {**(dataclasses.asdict(base) if base is not None else {}), **value}
        return parser.instantiate(parser.parse_object({"value": given})).value
    except ArgumentError as e:
        text = " ".join(str(e).split())
        text = re.sub(r"Group 'value' does not accept (?:nested key|option) '([^']+)'", r"unknown key '\1'", text)
        text = re.sub(r'Parser key "value\.([^"]+)"', r"\1", text)
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{where}: {text}" + (f"; known keys: {known}" if "unknown key" in text else "")) from None


def non_default_fields(obj: Any) -> dict[str, Any]:
    """The fields of dataclass ``obj`` whose values differ from the class defaults (for reports and fingerprints)."""
    default = type(obj)()
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if getattr(obj, f.name) != getattr(default, f.name)
    }


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read a study YAML; ``overrides`` (top-level keys) win over the file. Typed by :func:`typed`.

    Raises:
        ValueError: unknown keys or bad values (the message names the file and the key).
    """
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    raw.update(overrides or {})
    return typed(StudyConfig, raw, str(path))


# -- runs --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training run. NTP-only runs ignore the query (the query only changes what is supervised)."""

    task: str
    klal_weight: float
    klal_query: str
    seed: int
    klal_layers: str | None = None
    """Supervised layers of this run; None: the study's ``klal_layers``."""

    @property
    def name(self) -> str:
        """Directory name under ``run_dir/task``."""
        if self.klal_weight == 0:
            return f"ntp_s{self.seed}"
        layers = f"_L{self.klal_layers.replace(':', 'to')}" if self.klal_layers is not None else ""
        return f"klal_w{self.klal_weight:g}_{self.klal_query}{layers}_s{self.seed}"


def _canonical(task: str, weight: float, query: str, seed: int, layers: str | None = None) -> RunSpec:
    if weight == 0:
        return RunSpec(task, 0.0, "last", int(seed))
    return RunSpec(task, float(weight), query, int(seed), None if layers is None else str(layers))


def main_runs(cfg: StudyConfig) -> dict[tuple[str, str, int], RunSpec]:
    """``(task, arm, seed) -> RunSpec`` of the main comparison."""
    out = {}
    for task in cfg.tasks:
        for arm, a in cfg.arms.items():
            for seed in cfg.seeds:
                out[(task, arm, seed)] = _canonical(task, a["klal_weight"], a.get("klal_query", "last"), seed)
    return out


def sweep_runs(cfg: StudyConfig) -> dict[tuple[float, str, int], RunSpec]:
    """``(lambda, query, seed) -> RunSpec`` of the sweep (lambda 0 is listed once per query; both are one run)."""
    if cfg.sweep_task is None:
        return {}
    return {
        (float(w), q, s): _canonical(cfg.sweep_task, w, q, s)
        for w in cfg.sweep_lambdas
        for q in cfg.sweep_queries
        for s in cfg.sweep_seeds
    }


def extra_runs(cfg: StudyConfig) -> list[RunSpec]:
    """The investigation runs listed under ``extra_runs``."""
    out = []
    for k, e in enumerate(cfg.extra_runs):
        task = e.task if e.task is not None else cfg.sweep_task
        if task not in cfg.tasks:
            raise ValueError(f"repro config: extra_runs[{k}] task {task!r} is not one of {list(cfg.tasks)}")
        out.append(_canonical(task, e.klal_weight, e.klal_query, e.seed, e.klal_layers))
    return out


def all_runs(cfg: StudyConfig) -> list[RunSpec]:
    """Every distinct run of the study (a sweep run equal to a main run is trained once), main runs first."""
    seen: dict[RunSpec, None] = {}
    for r in list(main_runs(cfg).values()) + list(sweep_runs(cfg).values()) + extra_runs(cfg):
        seen.setdefault(r, None)
    return list(seen)


def run_path(cfg: StudyConfig, spec: RunSpec) -> Path:
    """Directory of one run."""
    return Path(cfg.run_dir) / spec.task / spec.name


def data_path(cfg: StudyConfig, task: str) -> Path:
    """Dataset directory of a task (answers rendered other than as generated get their own folder)."""
    suffix = "" if cfg.answer_render == "as_generated" else f"_{cfg.answer_render}"
    return Path(cfg.data_dir) / f"{task}_{cfg.image_size}{suffix}"


# -- data --------------------------------------------------------------------------------------------------------------
def generator(cfg: StudyConfig, task: str):
    """The configured generator (:class:`data_gen.base.Task`) of one of the study's tasks."""
    from data_gen.tasks import build_task, get_task_class, preset_values

    ts = cfg.tasks[task]
    # The generator config, typed by jsonargparse like the study file (YAML lists become the tuples of ranges such as
    # num_nodes; an unknown or mistyped key names itself).
    cls = get_task_class(task)
    preset = preset_values(cls, ts.preset) if ts.preset is not None else {}
    config = typed(cls.config_cls, {**preset, "image_size": cfg.image_size, **ts.overrides}, f"tasks.{task}")
    return build_task(task, overrides=dataclasses.asdict(config))


def study_tokenizer(cfg: StudyConfig):
    """The tokenizer of the study's base model (the embedded tiny one, or the checkpoint's)."""
    from klal.models.loader import ModelConfig, load_processor

    return load_processor(ModelConfig(name_or_path=cfg.backbone, max_pixels=cfg.image_size * cfg.image_size)).tokenizer


def parse_meta(meta: Any) -> dict[str, Any]:
    """A dataset row's ``meta``: the JSON string as stored, or a mapping of rows built in memory."""
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def render_answer(answer: str, mode: str, tokenizer: Any) -> str:
    """``answer`` as ``answer_render`` writes it: unchanged, with a leading space, or with a leading space only where
    ``tokenizer`` then needs fewer tokens (``"blue"`` is b|l|ue and ``" blue"`` one token for the tiny tokenizer)."""
    if mode == "as_generated" or answer.startswith(" "):
        return answer
    spaced = " " + answer
    if mode == "leading_space":
        return spaced
    n_plain = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return spaced if len(tokenizer(spaced, add_special_tokens=False)["input_ids"]) < n_plain else answer


def render_dataset_answers(path: Path, mode: str, tokenizer: Any) -> None:
    """Rewrite the answers of the dataset at ``path`` with :func:`render_answer`, and record ``mode`` in its
    manifest (the folder is replaced only once the new one is complete)."""
    import shutil

    import datasets

    from data_gen.writer import MANIFEST_NAME, read_manifest

    manifest = read_manifest(path)
    staged = path.with_name(path.name + ".rendering")
    shutil.rmtree(staged, ignore_errors=True)
    dd = datasets.load_from_disk(str(path))
    dd.map(lambda a: {"answer": render_answer(a, mode, tokenizer)}, input_columns="answer").save_to_disk(str(staged))
    (staged / MANIFEST_NAME).write_text(json.dumps({**manifest, "answer_render": mode}, indent=2, sort_keys=True))
    del dd
    shutil.rmtree(path)
    os.replace(staged, path)


def check_dataset(cfg: StudyConfig, task: str) -> Path:
    """The dataset directory of ``task``, after checking that its manifest records this config's generation settings
    (seed, size, splits, generator config, answer rendering), so that no study reads a dataset made for another one
    (a pilot cannot score a confirmatory study's test split by pointing at its folder).

    Raises:
        FileNotFoundError: the dataset is not generated yet.
        ValueError: the dataset on disk was generated with other settings (the message names the first differences).
    """
    from data_gen.writer import read_manifest, split_sizes

    path = data_path(cfg, task)
    if not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"dataset {path} of task {task} is not generated yet: run --stages data first")
    ts = cfg.tasks[task]
    got = read_manifest(path)
    sizes = split_sizes(ts.num, ts.splits)
    starts = np.cumsum([0, *sizes.values()])
    want = {
        "task": task,
        "seed": ts.seed,
        "num": ts.num,
        "splits": {name: [int(a), int(b)] for name, a, b in zip(sizes, starts[:-1], starts[1:])},
        "config": json.loads(json.dumps(dataclasses.asdict(generator(cfg, task).config))),
        "answer_render": cfg.answer_render,
    }
    got = {**got, "answer_render": got.get("answer_render", "as_generated")}
    bad = [f"{k} {got.get(k)!r} (config: {v!r})" for k, v in want.items() if got.get(k) != v]
    if bad:
        raise ValueError(
            f"dataset {path} was generated with other settings than tasks.{task} of this config: {'; '.join(bad)[:300]}"
            " (give this study its own data_dir, or delete the folder to regenerate it)"
        )
    return path


def make_data(cfg: StudyConfig, workers: int = 1, progress: bool = False) -> dict[str, Path]:
    """Generate each task's dataset unless it is already on disk (then checked by :func:`check_dataset`); returns
    task -> directory."""
    from data_gen.writer import generate_dataset

    out = {}
    for task, ts in cfg.tasks.items():
        path = data_path(cfg, task)
        if not (path / "dataset_dict.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            generate_dataset(
                generator(cfg, task),
                num=ts.num,
                seed=ts.seed,
                out=path,
                workers=workers,
                splits=ts.splits,
                progress=progress,
                overwrite=path.exists(),
            )
            if cfg.answer_render != "as_generated":
                render_dataset_answers(path, cfg.answer_render, study_tokenizer(cfg))
        out[task] = check_dataset(cfg, task)
    return out


def task_split(cfg: StudyConfig, task: str, split: str, limit: int | None = None):
    """One split of a task's dataset (the first ``limit`` rows), read by :func:`klal.data.io.load_split` once
    :func:`check_dataset` has accepted it."""
    from klal.data.io import load_split

    return load_split(check_dataset(cfg, task), split, limit)


# -- model -------------------------------------------------------------------------------------------------------------
def build_module(
    cfg: StudyConfig, klal_weight: float = 0.0, klal_query: str = "last", seed: int = 0, klal_layers: str | None = None
):
    """A configured :class:`klal.module.KLALModule` (LoRA and ``train_extra`` parts trainable), seeded.

    ``klal_layers`` (None: the study's) selects the supervised layers; the learning curves and the evaluation read the
    attention of every layer regardless (see :func:`evaluate_model`).
    """
    from klal.models.loader import ModelConfig
    from klal.module import KLALModule, OptimSettings

    L.seed_everything(seed, verbose=False)
    backbone = ModelConfig(name_or_path=cfg.backbone)
    tiny = backbone.is_tiny
    backbone = ModelConfig(
        name_or_path=cfg.backbone,
        dtype=cfg.dtype,
        min_pixels=DEFAULT_MIN_PIXELS,
        max_pixels=cfg.image_size * cfg.image_size,
        tiny_seed=cfg.tiny_seed,
        tiny_overrides=(copy.deepcopy(cfg.tiny_overrides) or None) if tiny else None,
    )
    module = KLALModule(
        backbone=backbone,
        lora=copy.deepcopy(cfg.lora),
        klal_weight=klal_weight,
        klal_query=klal_query,
        klal_layers=cfg.klal_layers if klal_layers is None else klal_layers,
        optim=OptimSettings(lr=cfg.lr, warmup_steps=cfg.warmup_steps),
    )
    module.configure_model()
    unfreeze(module.model, cfg.train_extra)
    if torch.cuda.is_available():
        module.to("cuda")
    return module


def unfreeze(model: torch.nn.Module, parts: list[str]) -> int:
    """Make whole base-model parts trainable next to LoRA; returns the number of parameters switched on.

    Args:
        model: a peft-wrapped Qwen2.5-VL.
        parts: ``merger`` (the vision patch merger), ``vision`` (the whole vision tower, merger included),
            ``embed_tokens``, ``lm_head``.
    """
    from klal.models.lora import train_base_parts

    # Tied embeddings (the 3B model): lm_head trains the shared matrix, with a warning (see train_base_parts).
    return train_base_parts(model, parts)


def adapter_path(cfg: StudyConfig, spec: RunSpec) -> Path:
    """The peft adapter of a run trained by ``train.py`` (``adapter_pattern`` filled with task, arm and seed)."""
    arm = next(
        (
            a
            for a, v in cfg.arms.items()
            if _canonical(spec.task, v["klal_weight"], v.get("klal_query", "last"), spec.seed) == spec
        ),
        None,
    )
    if arm is None:
        raise ValueError(f"run {spec.task}/{spec.name} is not one of the arms {list(cfg.arms)}: no adapter to load")
    return Path(cfg.adapter_pattern.format(task=spec.task, arm=arm, seed=spec.seed))


def load_trained(cfg: StudyConfig, spec: RunSpec):
    """The module of a finished run, with its trained weights loaded (``trainable.pt``, or the peft adapter under
    ``adapter_pattern`` for a real backbone)."""
    module = build_module(cfg, spec.klal_weight, spec.klal_query, spec.seed, spec.klal_layers)
    if cfg.adapter_pattern:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = adapter_path(cfg, spec) / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no adapter weights at {path} (train the run with train.py first)")
        result = set_peft_model_state_dict(module.model, load_file(str(path)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{path}: {len(unexpected)} tensors do not fit the model, e.g. {unexpected[:3]}")
        return module.eval()
    state = torch.load(run_path(cfg, spec) / "trainable.pt", map_location="cpu", weights_only=True)
    missing = set(module.trainable_state_dict()) - set(state)
    if missing:
        raise RuntimeError(
            f"{run_path(cfg, spec)}/trainable.pt lacks {len(missing)} trainable tensors, e.g. "
            f"{sorted(missing)[:3]} (was it trained with another config?)"
        )
    module.load_state_dict(state, strict=False)
    return module.eval()


# -- evaluation --------------------------------------------------------------------------------------------------------
def evidence_cells_source() -> str:
    """Which evidence-cell rule the grounding metrics use (recorded with every evaluation)."""
    return "klal.data.targets.evidence_cells"


def evaluate_model(
    module,
    rows,
    batch_size: int = 16,
    queries: tuple[str, ...] = ("last",),
    generate: bool = False,
    max_new_tokens: int = 10,
) -> dict[str, Any]:
    """Test metrics of a module on dataset rows, through the evaluation engine (:func:`klal.eval.engine.run_method`
    running :class:`klal.eval.attention.TeacherForcedAttention` once per query choice).

    Every layer is measured whatever a run supervised, so runs that supervise different layers stay comparable.

    Returns:
        ``{"n", "exact_tf", "answer_acc_gen" and "generations" (if generate), "<query>/pointing",
        "<query>/evidence_mass", "<query>/n_evidence", "items"}``: sample means (grounding means over the samples with
        evidence cells; NaN without any), and per test item its ``id``, ``gold`` answer, ``prediction`` (the greedy
        answer; None without generation), ``exact_tf`` and ``correct_gen`` (normalised match; None without generation).
    """
    from klal.eval.answers import answer_correct
    from klal.eval.attention import TeacherForcedAttention
    from klal.eval.engine import run_method
    from klal.eval.metrics import GroundingMetrics, pooled
    from klal.grounding import GroundingModel

    gm = GroundingModel(module.model, module.processor)
    metrics = GroundingMetrics()
    out: dict[str, Any] = {"n": len(rows)}
    with gm.borrowed():
        for qi, q in enumerate(queries):
            answer = generate and qi == 0  # greedy answers do not depend on the query: decode once
            method = TeacherForcedAttention(query=q, layers="all", max_new_tokens=max_new_tokens if answer else 0)
            run = run_method(gm, q, method, {"rows": rows}, metrics, batch_size=batch_size, keep_results=qi == 0)
            if qi == 0:
                exact = [r.extras["exact_tf"] for r in run.results]
                out["exact_tf"] = float(np.mean(exact)) if exact else float("nan")
                out["items"] = [
                    {
                        "id": s["id"],
                        "gold": s["gold"],
                        "prediction": s["answer"],
                        "exact_tf": bool(e),
                        "correct_gen": None if s["answer"] is None else answer_correct(s["answer"], s["gold"]),
                    }
                    for s, e in zip(run.samples, exact)
                ]
            if answer:
                acc = pooled(metrics.compute(), q, "answer_accuracy")
                out["answer_acc_gen"] = acc["value"] if acc["count"] else float("nan")
                out["generations"] = [s["answer"] for s in run.samples[:20]]
    scores = metrics.compute()
    for q in queries:
        point, mass = pooled(scores, q, "pointing_game"), pooled(scores, q, "evidence_mass")
        out[f"{q}/pointing"] = point["value"] if point["count"] else float("nan")
        out[f"{q}/evidence_mass"] = mass["value"] if mass["count"] else float("nan")
        out[f"{q}/n_evidence"] = point["count"]
    return out


# -- training ----------------------------------------------------------------------------------------------------------
class CurveCallback(L.Callback):
    """Learning-curve points on a fixed validation subset: step 0 and every ``every`` optimizer steps.

    Args:
        rows: the validation rows of every point.
        every: steps between points (the last step is always measured).
        batch_size: evaluation batch size.
    """

    def __init__(self, rows, every: int, batch_size: int) -> None:
        super().__init__()
        self.rows = rows
        self.every = every
        self.batch_size = batch_size
        self.points: list[dict[str, Any]] = []
        self.train_losses: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._point(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self._maybe(trainer, pl_module)

    def _maybe(self, trainer, module) -> None:
        step = trainer.global_step
        last = trainer.callback_metrics
        self.train_losses.append({"step": step, **{k: float(v) for k, v in last.items() if k.startswith("train/")}})
        if step % self.every == 0 or step == trainer.max_steps:
            self._point(trainer, module)

    def _point(self, trainer, module) -> None:
        if self.points and self.points[-1]["step"] == trainer.global_step:
            return
        t0 = time.perf_counter()
        m = evaluate_model(module, self.rows, batch_size=self.batch_size, queries=("last",))
        module.train()
        self.points.append(
            {
                "step": trainer.global_step,
                "exact_tf": m["exact_tf"],
                "pointing": m["last/pointing"],
                "evidence_mass": m["last/evidence_mass"],
                "eval_s": time.perf_counter() - t0,
            }
        )


def train_run(
    cfg: StudyConfig, spec: RunSpec, force: bool = False, quiet: bool = True, provenance: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one run unless its results are already on disk; returns its summary (``run.json``).

    ``provenance`` (a confirmatory study's config commit, :func:`studies.reproduce.protocol.confirmatory_record`)
    joins the run's fingerprint, so a run trained before the config was committed is never reused for it.

    Writes ``trainable.pt`` (the trained parameters: LoRA + ``train_extra``), ``run.json`` (settings, times, the
    learning curve) and ``lora_adapter/`` (the peft adapter the module saves; LoRA weights only).

    Raises:
        ValueError: a real backbone (those runs are trained with ``train.py`` and ``configs/repro/*.yaml``).
    """
    from klal.datamodule import KLALDataModule

    if not trains_here(cfg):
        raise ValueError(
            f"the study trains only the tiny models (tiny, tiny-base); train {cfg.backbone!r} with train.py and the "
            "configs/repro/qwen2.5-vl-7b_*.yaml configs (docs/reproduce.md), then run the eval/probes/report stages"
        )

    out = run_path(cfg, spec)
    summary_path = out / "run.json"
    fingerprint = _fingerprint(cfg, spec, provenance)
    if summary_path.is_file() and not force:
        done = json.loads(summary_path.read_text())
        if done.get("fingerprint") == fingerprint:
            return done
    out.mkdir(parents=True, exist_ok=True)
    module = build_module(cfg, spec.klal_weight, spec.klal_query, spec.seed, spec.klal_layers)
    # The module writes a peft adapter at the end of fit; without a logger it would land in the working directory.
    # It holds the LoRA weights only: trainable.pt (below) also has the train_extra modules.
    module.adapter_dir = str(out / "lora_adapter")
    dm = KLALDataModule(
        paths=[str(check_dataset(cfg, spec.task))],
        batch_size=cfg.batch_size,
        num_workers=0,
        target=copy.deepcopy(cfg.target),
    )
    dm.processor = module.processor
    dm.setup("fit")
    curve = CurveCallback(
        task_split(cfg, spec.task, "validation", cfg.curve_samples), cfg.eval_every, cfg.eval_batch_size
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not quiet,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[curve],
        deterministic=False,
    )
    # Data order follows the run seed (seed_everything in build_module seeded the LoRA init; reseed for the sampler).
    L.seed_everything(spec.seed + 1000, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    train_s = time.perf_counter() - t0
    torch.save(module.trainable_state_dict(), out / "trainable.pt")
    n_trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    summary = {
        "spec": dataclasses.asdict(spec),
        "fingerprint": fingerprint,
        "steps": trainer.global_step,
        "train_s": train_s,
        "eval_s": sum(p["eval_s"] for p in curve.points),
        "trainable_params": n_trainable,
        "curve": curve.points,
        "train_log": curve.train_losses[:: max(1, cfg.eval_every // 5)],
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def _fingerprint(cfg: StudyConfig, spec: RunSpec, provenance: dict[str, Any] | None = None) -> str:
    """What a run's result depends on (and, for a confirmatory study, the commit of its config); a finished run is
    reused only when it matches."""
    keys = (
        "image_size",
        "tiny_overrides",
        "tiny_seed",
        "lora",
        "train_extra",
        "klal_layers",
        "steps",
        "batch_size",
        "lr",
        "warmup_steps",
        "eval_every",
        "curve_samples",
    )
    d = {k: getattr(cfg, k) for k in keys}
    # Settings as the YAML wrote them before they were typed: LoRA without an unset ``layers``, the target spec's
    # non-default fields only (the default adds no key), so the fingerprints of earlier runs still match.
    d["lora"] = {k: v for k, v in dataclasses.asdict(cfg.lora).items() if v is not None}
    target = non_default_fields(cfg.target)
    if target:
        d["target"] = target
    d["task"] = dataclasses.asdict(cfg.tasks[spec.task])
    d["spec"] = dataclasses.asdict(spec)
    if cfg.answer_render != "as_generated":  # the default adds no key, so earlier runs' fingerprints still match
        d["answer_render"] = cfg.answer_render
    if provenance:
        d["config_commit"] = provenance["commit"]
    return json.dumps(d, sort_keys=True, default=str)


# -- aggregation -------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than two values), ignoring NaN."""
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def fmt(mean: float, std: float | None = None, pct: bool = True) -> str:
    """``12.3 ± 4.5`` (percent) or ``0.123`` style."""
    if math.isnan(mean):
        return "—"
    scale = 100.0 if pct else 1.0
    s = f"{mean * scale:.1f}" if pct else f"{mean:.3f}"
    if std is not None and not math.isnan(std):
        s += f" ± {std * scale:.1f}" if pct else f" ± {std:.3f}"
    return s
