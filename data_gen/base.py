"""The interface every synthetic task generator implements.

A generator is a pure function of ``(seed, index)``: sample ``i`` of a dataset is drawn from
``numpy.random.default_rng([seed, i])``, so the same seed and arguments give the same dataset whatever the number
of worker processes. Answers that must be balanced (counts, Yes/No) are assigned by index
(``answer_classes[i % len(answer_classes)]``) and the generator draws until its geometry yields that answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from klal.data.schema import Evidence


class GenerationError(ValueError):
    """Raised for impossible generator settings; the message names the option at fault."""


@dataclass
class Sample:
    """One generated sample before it is written to disk.

    Attributes:
        image: RGB image.
        question: the question text.
        answer: short answer text ("3", "Yes", "(2, 5)").
        evidence: geometry in image pixels that the target map is made from.
        meta: generator parameters and per-sample facts (JSON-serialisable).
    """

    image: Image.Image
    question: str
    answer: str
    evidence: Evidence
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """Knobs shared by every task; tasks subclass this with their own fields."""

    image_size: int = 448
    """Side of the square image in pixels."""
    line_width: int = 4
    """Stroke width in pixels."""
    max_attempts: int = 200
    """Redraws allowed per sample before generation gives up with an error."""


class Task(ABC):
    """A synthetic grounding task: config in, deterministic samples out."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskConfig]]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Difficulty presets: name -> config field overrides (``easy``, ``medium``, ``hard``)."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.validate()

    @abstractmethod
    def validate(self) -> None:
        """Raise GenerationError naming the option when the config is impossible."""

    def answer_classes(self) -> list[str] | None:
        """Answers balanced by index, or None when the task has no balanced answer set."""
        return None

    @abstractmethod
    def generate(self, rng: np.random.Generator, target_answer: str | None) -> Sample:
        """Draw one sample whose answer equals ``target_answer`` (when not None)."""

    def sample(self, seed: int, index: int) -> Sample:
        """Sample ``index`` of the dataset with ``seed``; identical in any process."""
        rng = np.random.default_rng([seed, index])
        classes = self.answer_classes()
        target = classes[index % len(classes)] if classes else None
        s = self.generate(rng, target)
        s.meta = {"task": self.name, "config": asdict(self.config), **s.meta}
        return s
