"""What every training-free grounding method shares: the :class:`GroundingMethod` base class (options, checks, cost)
and the result type. The model session the methods run on is :class:`klal.session.GroundingModel`; the registry of
methods is :mod:`klal.grounding.registry`.

A method takes one dataset row (the klal schema) and returns a :class:`GroundingResult`: a relevance map per image
over that image's LLM token grid (row-major; the model family's map grid), boxes in original-image pixels
ranked best first, and, for methods that answer, the answer text. The session counts forward and backward passes so
that every method's cost can be reported.

All attention comes from :mod:`klal.capture` (the same code path as training), never from ``output_attentions``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from klal.grounding.options import NoOptions, parse_options
from klal.grounding.registry import register_method
from klal.session import GroundingError, sample_images

if TYPE_CHECKING:
    from klal.session import GroundingModel

GENERIC_PROMPT = "Write a general description of the image."
"""ViCrop's query-free prompt, also used by LASER's 'without query' pass."""


@dataclass
class GroundingResult:
    """What a method says about one sample.

    Attributes:
        maps: one relevance grid ``(gh, gw)`` per image of the sample (non-negative; not necessarily normalised).
        boxes: boxes ``(x0, y0, x1, y1)`` in original pixels of image 0, best first (may be empty).
        answer: the method's answer, for methods that answer; None otherwise.
        extras: method-specific details (chosen layer, crop boxes, rounds, ...), JSON-serialisable.
        passes: forward/backward passes this sample cost.
        seconds: wall time this sample cost.
    """

    maps: list[np.ndarray]
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    answer: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    seconds: float = 0.0


class GroundingMethod(abc.ABC):
    """Base class of every training-free grounding method.

    The base does what every method shares: options (a frozen ``Options`` dataclass, checked once by
    :func:`klal.grounding.options.parse_options`), the image check (:func:`sample_images`), the crop-size check
    (:meth:`check_sizes`), and the cost of every result (passes and seconds). A method writes only how it computes
    relevance and answers:

    * :meth:`ground` ``(gm, sample, images)``: one row (its images already checked);
    * optionally :meth:`ground_batch` with ``batched = True``, for methods that share a forward pass between rows;
    * optionally :meth:`prepare`, for methods that need the model or data before the first row (localization heads).

    Subclasses register themselves by name: ``class MyMethod(GroundingMethod, name="my_method")``.

    Attributes:
        name: the registered name (also in every message).
        answers: whether :attr:`GroundingResult.answer` is filled in.
        batched: whether :meth:`run_batch` runs :meth:`ground_batch` (else :meth:`run` per row).
        predicts_boxes: whether :attr:`GroundingResult.boxes` is the method's prediction (False: the box metrics
            skip the method instead of scoring its empty list as IoU 0).
        Options: the frozen dataclass of the method's options, with their defaults.
        options: this instance's options.
    """

    name: ClassVar[str] = ""
    answers: ClassVar[bool] = False
    batched: ClassVar[bool] = False
    predicts_boxes: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.batched and cls.ground_batch is GroundingMethod.ground_batch:
            # Caught when the class is defined, not at its first batch.
            raise TypeError(f"{cls.__name__} sets batched = True but does not implement ground_batch()")
        # A module run with ``python -m`` is a second copy of itself (``__main__``): registering its classes too
        # would clash with the importable module's.
        if name is not None and cls.__module__ != "__main__":
            register_method(name)(cls)

    def __init__(self, **options: Any) -> None:
        """Build the method with keyword ``options`` (see ``Options``).

        Raises:
            GroundingError: an unknown option or a bad value, naming it.
        """
        self.options = parse_options(self.name or type(self).__name__, self.Options, options)

    @property
    def min_crop(self) -> float | None:
        """The smallest crop side in original pixels, for methods that crop (option ``min_crop``); None otherwise."""
        value = getattr(self.options, "min_crop", None)
        return float(value) if value else None

    def check_sizes(self, sizes: Iterable[tuple[Any, float, float]], where: str | None = None) -> None:
        """Refuse images smaller than :attr:`min_crop` on an axis; a no-op for methods that do not crop.

        Args:
            sizes: ``(sample_id, width, height)`` of each sample's image 0 (crops are cut from image 0).
            where: where the samples come from (a dataset path), for the message.

        Raises:
            GroundingError: naming the method, the first sample too small, its size and the option.
        """
        m = self.min_crop
        if m is None:
            return
        of = f" of {where}" if where else ""
        for sid, w, h in sizes:
            if w < m or h < m:
                raise GroundingError(
                    f"{self.name}: sample {sid!r}{of} has an image of {w} x {h} px, smaller than option "
                    f"min_crop={m:g} px on at least one axis; lower min_crop or leave the sample out"
                )

    def prepare(self, gm: GroundingModel, rows: Any) -> None:  # noqa: B027 - an optional hook, not abstract
        """Get ready to run on ``gm`` (e.g. discover heads on ``rows``: a ``datasets.Dataset`` or a list of rows).

        The default does nothing; the engine calls it once per method and model before the first row.
        """

    def run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        """Ground (and, if :attr:`answers`, answer) one dataset row; the result carries its passes and seconds.

        Raises:
            GroundingError: a text-only row, an image that is too small to crop, or a bad option for this model.
        """

        def one() -> list[GroundingResult]:
            images = self._checked_images(sample)
            return [self.ground(gm, sample, images)]

        return _costed(gm, one)[0]

    def run_batch(self, gm: GroundingModel, samples: Sequence[dict[str, Any]]) -> list[GroundingResult]:
        """:meth:`run` on several rows, sharing passes when the method is :attr:`batched`.

        A batched result reports the batch's passes (every row takes part in every pass) and an even share of its
        seconds.
        """
        if not self.batched:
            return [self.run(gm, s) for s in samples]

        def batch() -> list[GroundingResult]:
            for s in samples:
                self._checked_images(s)
            return self.ground_batch(gm, list(samples))

        return _costed(gm, batch)

    @abc.abstractmethod
    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Image.Image]) -> GroundingResult:
        """The method itself on one row whose ``images`` (RGB, at least one) passed the checks."""

    def ground_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:  # noqa: B027
        """The method on several checked rows at once; every class with ``batched = True`` overrides it (checked
        when the class is defined), and :meth:`run_batch` calls it only for those."""

    def _checked_images(self, sample: dict[str, Any]) -> list[Image.Image]:
        images = sample_images(sample)
        self.check_sizes([(sample.get("id"), images[0].width, images[0].height)])
        return images


def _costed(gm: GroundingModel, fn: Callable[[], list[GroundingResult]]) -> list[GroundingResult]:
    """Run ``fn`` and give each of its results the passes it cost and an even share of the seconds.

    Every sample of a batch takes part in every pass, so each result gets the batch's pass counts (a batched forward
    pass counts as one forward pass per sample).
    """
    before = dict(gm.passes)
    t0 = time.perf_counter()
    results = fn()
    seconds = time.perf_counter() - t0
    passes = {k: gm.passes[k] - before.get(k, 0) for k in gm.passes}
    for res in results:
        res.seconds = seconds / max(len(results), 1)
        res.passes = dict(passes)
    return results
