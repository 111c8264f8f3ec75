"""Lightning data module over klal datasets on disk (``datasets.save_to_disk`` in the klal schema).

Datasets come from ``paths`` (one or more dataset directories, concatenated), or are generated on the fly by a
synthetic task generator (``generate``) into a cache directory the first time (the demo uses this). The processor is
taken from the Lightning module (``module.processor``) unless one is given, so the collator always matches the model.

Sampling. The training loader always shards by itself, with ``trainer.world_size`` and ``trainer.global_rank``, and a
sampler seeded from ``seed`` (default: the ``seed_everything`` seed), so one process with ``batch_size = k x B`` and
``k`` processes with ``batch_size = B`` see the same global batch at every step. Plain shuffling uses a
``DistributedSampler`` (rank ``r`` takes every ``k``-th index of one shared permutation); ``group_by_length`` uses
:class:`~klal.data.sampler.LengthGroupedSampler` (rank ``r`` takes the ``r``-th slice of each global batch).
``token_budget`` batches by padded tokens instead (:class:`~klal.data.sampler.TokenBudgetBatchSampler`), so its batches
hold different numbers of samples. The processor (image resize, patching, tokenising) and the target maps run in the
collator, that is in the DataLoader worker processes (``num_workers``), never in the training loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from klal.data.collate import KLALCollator, PromptSettings
from klal.data.io import check_answers, check_not_empty, check_unique_ids, read_row, read_saved
from klal.data.resumable import ResumableDataLoader
from klal.data.sampler import LengthGroupedSampler, TokenBudgetBatchSampler, estimate_lengths
from klal.data.schema import check_columns
from klal.data.targets import TargetSpec


@dataclass
class GenerateSettings:
    """Generate a synthetic dataset when it is not on disk yet (used by the demo)."""

    task: str = "grid_patch"
    """Task name: grid_patch, line_intersection or line_tracing."""
    num: int = 64
    """Number of samples (split 80/10/10)."""
    seed: int = 0
    """Generator seed."""
    image_size: int = 224
    """Image side in pixels."""
    preset: str | None = None
    """Difficulty preset (easy, medium, hard)."""
    out: str = "data/demo_grid_patch"
    """Cache directory; reused when it already exists."""
    workers: int = 1
    """Generator processes."""


LONG_SAMPLE_RATIO = 8
LONG_SAMPLE_TOKENS = 2048
"""A sample over both ``LONG_SAMPLE_RATIO`` x the median length and ``LONG_SAMPLE_TOKENS`` tokens is named in a warning
before training (it fits the context but makes its steps slow; :meth:`KLALDataModule.check_lengths`)."""


def synthetic_generator() -> Callable[[GenerateSettings], None]:
    """The function that writes a ``data.generate`` dataset: the ``synthetic`` entry point of group
    ``klal.generators``.

    Raises:
        LookupError: no such entry point (klal installed without its metadata: reinstall with ``pip install -e .``).
    """
    from klal.plugins import load_entry_point

    return load_entry_point("klal.generators", "synthetic", "data.generate (or give data.paths)")


class NamedRows(Dataset):
    """A split whose rows are read with :func:`klal.data.io.read_row`: an image that cannot be decoded is an error
    naming the dataset, split and sample (in the DataLoader worker that reads it)."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.dataset = dataset
        self.where = where

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return read_row(self.dataset, index, self.where)


class RowBatches(Dataset):
    """A dataset whose items are lists of rows, for samplers that yield whole batches (``batch_size=None`` loaders).

    ``RowBatches(ds)[[3, 7]] == [ds[3], ds[7]]``; the rows are read (and images decoded) in the worker process.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self.dataset[int(i)] for i in indices]


class KLALDataModule(L.LightningDataModule):
    """Train/validation/test loaders with the KLAL collator.

    Args:
        paths: dataset directories written with ``save_to_disk`` (splits train/validation/test); several are
            concatenated per split. One folder may be given as a string (``paths: DIR``).
        generate: generate a synthetic dataset (written once, reused after) instead of reading ``paths``; setting
            both is an error.
        batch_size: samples per device per step (global batch = batch_size x devices x num_nodes x
            accumulate_grad_batches).
        eval_batch_size: validation/test batch size (default: batch_size).
        num_workers: DataLoader worker processes (the processor runs in them).
        group_by_length: batch training samples of similar token length (less padding); global batches stay the same
            for any number of processes with the same global batch size.
        token_budget: batch training samples by padded tokens per device (longest sample x samples <= token_budget)
            instead of by ``batch_size``; implies grouping by length.
        max_batch_size: with ``token_budget``, at most this many samples per batch.
        seed: training sampler seed (default: the ``seed_everything`` seed, else 0).
        pin_memory: pin host memory (default: on when CUDA is available).
        target: how evidence becomes target maps.
        prompt: chat rendering.
        max_length: refuse samples longer than this many tokens.
        max_train_samples: use only the first N training samples.
        max_val_samples: use only the first N validation samples.
        train_split: split names.
        val_split: split names.
        test_split: split names.
    """

    def __init__(
        self,
        paths: list[str] | str | None = None,
        generate: GenerateSettings | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        group_by_length: bool = False,
        token_budget: int | None = None,
        max_batch_size: int | None = None,
        seed: int | None = None,
        pin_memory: bool | None = None,
        target: TargetSpec = TargetSpec(),  # noqa: B008 - read-only default, jsonargparse needs an instance
        prompt: PromptSettings = PromptSettings(),  # noqa: B008
        max_length: int | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
    ) -> None:
        super().__init__()
        if isinstance(paths, str):  # one folder: the same data (and stored hyperparameters) as [DIR]
            paths = [paths]
        # Stored in checkpoints (datamodule_hyper_parameters), so a resume with other data is noticed.
        self.save_hyperparameters()
        if not paths and generate is None:
            raise ValueError("data: give `paths` (datasets on disk) or `generate` (a synthetic task to generate)")
        if paths and generate is not None:
            # Both used to be concatenated, so overriding `paths` on top of a config that generates (configs/demo.yaml)
            # silently trained on the user's rows plus the generated ones.
            raise ValueError(
                f"data: both `paths` ({list(paths)}) and `generate` (task {generate.task!r} into {generate.out!r}) are "
                "set; give one of them (with a config that generates, add `--data.generate null` to train on `paths`)"
            )
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"data.token_budget must be >= 1 or null, got {token_budget}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"data.max_batch_size must be >= 1 or null, got {max_batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.paths = list(paths or [])
        self.generate = generate
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.group_by_length = group_by_length
        self.token_budget = token_budget
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.target = target or TargetSpec()
        self.prompt = prompt or PromptSettings()
        self.max_length = max_length
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.processor: Any = None
        self.splits: dict[str, datasets.Dataset] = {}
        self.collator: KLALCollator | None = None
        self._train_lengths: list[int] | None = None
        self._lengths_checked: set[str] = set()

    def prepare_data(self) -> None:
        """Generate the synthetic dataset once (Lightning calls this on local rank 0 of every node).

        The generator is the ``klal.generators`` entry point named ``synthetic`` (``data_gen``'s, installed with klal),
        so the library does not import the generator package; a process that loses a race to write the same folder
        uses the winner's copy.
        """
        g = self.generate
        if g is not None and not os.path.isdir(g.out):
            synthetic_generator()(g)

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            self.processor = getattr(module, "processor", None)
            if self.processor is None:
                raise RuntimeError("KLALDataModule needs a processor: attach a KLALModule or set datamodule.processor")
        if self.collator is None:
            self.collator = KLALCollator(self.processor, self.target, self.prompt, max_length=self.max_length)
        if self.splits:
            return
        paths = list(self.paths)
        if self.generate is not None:
            if not os.path.isdir(self.generate.out):
                self.prepare_data()
            paths.append(self.generate.out)
        loaded = [self._load(p) for p in paths]
        for key, name in self.split_names.items():
            parts = [d[name] for d in loaded if name in d]
            if parts:
                ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
                limit = {"train": self.max_train_samples, "val": self.max_val_samples}.get(key)
                if limit is not None:
                    ds = ds.select(range(min(limit, len(ds))))
                self.splits[key] = ds
        if "train" not in self.splits and stage in (None, "fit"):
            raise ValueError(f"no {self.split_names['train']!r} split in {paths}")
        by_name = {self.split_names[k]: ds for k, ds in self.splits.items()}
        used = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "fit", ())
        check_not_empty({self.split_names[k]: self.splits[k] for k in used if k in self.splits}, ", ".join(paths))
        check_unique_ids(by_name, ", ".join(paths))
        check_answers(by_name, ", ".join(paths))

    def context_length(self) -> int | None:
        """The most tokens a sample may have: ``max_length``, else the attached model's context
        (``max_position_embeddings`` of its text config); None when neither is known (no model built yet)."""
        if self.max_length is not None:
            return int(self.max_length)
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        config = getattr(getattr(module, "model", None), "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(text, "max_position_embeddings", None)
        return int(n) if n else None

    def check_lengths(self, keys: list[str], where: str) -> None:
        """Refuse, before any step, a sample longer than :meth:`context_length` (question, answer, template and image
        tokens, :func:`klal.data.sampler.estimate_lengths`); the collator would meet it only in its batch, after a
        long run, or the model would run past its positions.

        Raises:
            ValueError: naming the split, the sample, its length and the limit.
        """
        limit = self.context_length()
        if limit is None:
            return
        for key in keys:
            ds = self.splits[key]
            try:
                lengths = self.train_lengths() if key == "train" else estimate_lengths(ds, self.processor, self.prompt)
            except ValueError as e:  # an image the processor refuses (an aspect ratio over 200), named by the sampler
                raise ValueError(f"{where} [{self.split_names[key]}]: {e}") from None
            longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
            if longest is None:
                continue
            median = sorted(lengths)[len(lengths) // 2]
            if lengths[longest] > max(LONG_SAMPLE_RATIO * median, LONG_SAMPLE_TOKENS) and lengths[longest] <= limit:
                sample = ds.with_format("arrow")[longest].column("id")[0].as_py()
                rank_zero_warn(
                    f"{where} [{self.split_names[key]}]: sample {sample!r} (row {longest}) is about "
                    f"{lengths[longest]} tokens, {lengths[longest] / max(median, 1):.0f}x the median {median}: "
                    "steps with it are that much slower"
                )
            if lengths[longest] > limit:
                sample = ds.with_format("arrow")[longest].column("id")[0].as_py()
                source = "data.max_length" if self.max_length is not None else "the model's context"
                raise ValueError(
                    f"{where} [{self.split_names[key]}]: sample {sample!r} (row {longest}) is about {lengths[longest]} "
                    f"tokens (question, answer and image), over {source} of {limit}; shorten its question or answer, "
                    "lower model.backbone.max_pixels, or leave it out"
                )

    @staticmethod
    def _load(path: str) -> datasets.DatasetDict:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"dataset directory not found: {path}")
        ds = read_saved(path)
        for name, split in ds.items():
            check_columns(split, f"{path} [{name}]")
        return ds

    def _check_split(self, key: str) -> None:
        if key not in self.splits:
            raise ValueError(f"no {self.split_names[key]!r} split in the datasets {self.paths or [self.generate.out]}")

    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        self._check_split(key)
        return DataLoader(
            self.named_rows(key),
            batch_size=self.batch_size if key == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collator,
            persistent_workers=self.num_workers > 0,
            # An own generator: creating the iterator must not draw from the global RNG that dropout uses, or a
            # validation run at a checkpointed step would shift the dropout masks of a resumed run.
            generator=torch.Generator().manual_seed(0),
        )

    def named_rows(self, key: str) -> NamedRows:
        """The split ``key`` (``train``, ``val``, ``test``) for a loader: rows whose decoding errors name the sample.

        Its samples' lengths are checked here (:meth:`check_lengths`), once the model exists (Lightning builds it
        after ``setup``) and before the first step."""
        paths = self.paths or ([self.generate.out] if self.generate is not None else [])
        if key not in self._lengths_checked:
            self.check_lengths([key], ", ".join(paths))
            self._lengths_checked.add(key)
        return NamedRows(self.splits[key], f"{', '.join(paths)} [{self.split_names[key]}]")

    def world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached trainer; ``(1, 0)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def sampler_seed(self) -> int:
        """The training sampler's seed: ``seed``, else the ``seed_everything`` seed, else 0."""
        return int(self.seed if self.seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))

    def train_lengths(self) -> list[int]:
        """Estimated token length of every training sample (computed once; images are not decoded)."""
        if self._train_lengths is None:
            self._check_split("train")
            self._train_lengths = estimate_lengths(self.splits["train"], self.processor, self.prompt)
        return self._train_lengths

    def train_sampler(self) -> Sampler:
        """This rank's training sampler (a ``DistributedSampler``, so Lightning does not replace it)."""
        self._check_split("train")
        world, rank = self.world()
        seed = self.sampler_seed()
        if self.token_budget is not None:
            return TokenBudgetBatchSampler(
                self.train_lengths(), self.token_budget, world, rank, seed=seed, max_batch_size=self.max_batch_size
            )
        if self.group_by_length:
            return LengthGroupedSampler(self.train_lengths(), self.batch_size, world, rank, seed=seed)
        return DistributedSampler(self.splits["train"], num_replicas=world, rank=rank, shuffle=True, seed=seed)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        by_budget = isinstance(sampler, TokenBudgetBatchSampler)
        # Resumable: Lightning saves its position in checkpoints, so `--ckpt_path last` continues mid-epoch.
        return ResumableDataLoader(
            RowBatches(self.named_rows("train")) if by_budget else self.named_rows("train"),
            # The token-budget sampler yields whole batches, so the loader must not batch again.
            batch_size=None if by_budget else self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self.collator,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
