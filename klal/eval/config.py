"""What an evaluation runs: the method rows (:class:`MethodSpec`) and the whole evaluation (:class:`EvalConfig`).

Both are dataclasses with attribute docstrings, so ``evaluate.py`` / ``klal evaluate`` (:mod:`klal.eval.cli`) take every
field as a flag or a YAML key, and the :class:`~klal.callbacks.GroundingProbes` callback and the study take the same
:class:`MethodSpec` rows.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from klal.data.targets import TargetSpec
from klal.models.config import ModelConfig


@dataclass
class MethodSpec:
    """One row of the comparison: a grounding method, its options, and which weights it runs on."""

    name: str
    """Registered method: attention_probe, localization_heads, entropy_gradient, vicrop_rel_att, vicrop_grad_att,
    laser."""
    label: str | None = None
    """Row label (default: the name, with " (adapter)" when it runs on the adapter)."""
    weights: Literal["base", "adapter"] = "base"
    """Run on the base weights or on base + adapter (needs ``adapter``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the method (see its class docstring)."""

    @property
    def row(self) -> str:
        """The table row label."""
        return self.label or (f"{self.name} (adapter)" if self.weights == "adapter" else self.name)


def default_methods(with_adapter: bool) -> list[MethodSpec]:
    """The base model's answer-token attention and, with an adapter, the fine-tuned model's."""
    probe = {"query": "generated_last"}
    rows = [MethodSpec("attention_probe", "base model attention", "base", dict(probe))]
    if with_adapter:
        rows.append(MethodSpec("attention_probe", "KLAL fine-tuned attention", "adapter", dict(probe)))
    return rows


@dataclass
class EvalConfig:
    """What to evaluate and where to write it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model: ``tiny``, a hub id or a local checkpoint directory."""
    adapter: str | None = None
    """peft adapter directory trained on ``model`` (rows with ``weights: adapter`` use it)."""
    data: list[str] | str = field(default_factory=list)
    """Dataset directories (``save_to_disk``, klal schema): one path or a list."""
    split: str = "test"
    """Split to evaluate."""
    max_samples: int | None = None
    """Evaluate the first N samples of each dataset (text-only rows among them are skipped and counted)."""
    methods: list[MethodSpec] | None = None
    """Rows of the table (default: base attention, and fine-tuned attention when an adapter is given)."""
    prepare_split: str = "train"
    """Split whose samples methods that need preparation (localization-head discovery) see; falls back to ``split``."""
    prepare_samples: int = 64
    """How many samples that preparation sees (image rows only: text-only rows are passed over)."""
    target: TargetSpec = field(default_factory=TargetSpec)
    """Target maps for the KL metric (as in training)."""
    decoding: Literal["greedy", "generation_config"] | None = None
    """Answer decoding of every row whose method has a ``decoding`` option and does not set it: ``greedy`` (klal's
    argmax loop) or ``generation_config`` (``model.generate(do_sample=False)`` under the checkpoint's generation
    config, as the authors of ViCrop and EGG answer); None keeps each method's default (docs/grounding.md)."""
    batch_size: int = 1
    """Samples per forward pass for the methods that batch (``attention_probe`` with ``prompt_last`` or
    ``answer_last``, ``localization_heads``); the others decode, crop or backpropagate per sample and run one at a
    time."""
    gallery_size: int = 6
    """Samples drawn in each method's gallery PNG (0: none)."""
    out: str = "runs/eval"
    """Output directory."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [os.fspath(self.data)]
        self.data = [os.fspath(p) for p in self.data]
        if self.methods:
            self.methods = [m if isinstance(m, MethodSpec) else MethodSpec(**m) for m in self.methods]

    def check_adapter_rows(self) -> None:
        """Refuse rows that run on the adapter when no ``adapter`` is given; a check on the config alone, made before
        anything is imported or loaded.

        Raises:
            ValueError: naming the first such row.
        """
        if self.adapter:
            return
        rows = list(self.methods) if self.methods else default_methods(False)
        for m in rows:
            if m.weights == "adapter":
                raise ValueError(
                    f"method row {m.row!r} runs on the adapter, but no --adapter was given (add --adapter RUN/adapter, "
                    "e.g. runs/demo/klal/version_0/adapter, or leave the row out)"
                )

    def method_rows(self) -> list[MethodSpec]:
        """The rows of the table: ``methods``, or the defaults (:func:`default_methods`), with ``decoding`` given to
        the rows that take it.

        Raises:
            GroundingError: with ``decoding`` set, a row naming an unknown method.
        """
        rows = list(self.methods) if self.methods else default_methods(bool(self.adapter))
        if self.decoding is None:
            return rows
        # Imported here: the grounding methods pull in torch, which this module's users (--help) do not need.
        from klal.grounding import method_class

        out = []
        for m in rows:
            takes = "decoding" in {f.name for f in dataclasses.fields(method_class(m.name).Options)}
            out.append(dataclasses.replace(m, options={"decoding": self.decoding, **m.options}) if takes else m)
        return out


__all__ = ["EvalConfig", "MethodSpec", "default_methods"]
