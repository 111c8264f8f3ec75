"""A training DataLoader that Lightning checkpoints and restores mid-epoch, so a resumed run sees the same batches.

Lightning 2.x saves a train loader's position only when the loader itself has ``state_dict``/``load_state_dict``
(they go under ``loops.fit_loop.state_dict.combined_loader`` and are loaded before the epoch's iterator is created).
A plain ``DataLoader`` has neither: a run resumed mid-epoch starts the interrupted epoch's order from the beginning,
so samples are seen twice or never (Lightning only warns). :class:`ResumableDataLoader` is a drop-in ``DataLoader``
that

- counts the batches it has handed out in the current epoch and, after ``load_state_dict``, starts the next pass
  right after them (skipping indices only; no skipped sample is loaded). A position at the end of an epoch starts
  the next epoch;
- needs an order that depends on the epoch only: a sampler with ``set_epoch`` seeded from ``(seed, epoch)``
  (``DistributedSampler`` and klal's :mod:`klal.data.sampler` samplers; Lightning calls ``set_epoch`` every epoch), or
  the loader's own ``shuffle=True``/sequential sampler, which draws from the loader's generator;
- owns a ``torch.Generator`` reseeded from ``(seed, epoch)`` at every pass (unless one is passed in), so worker seeds
  are reproducible and creating an iterator never draws from the global torch RNG. Dropout and other training
  randomness then depend only on the steps taken, which lets :mod:`klal.checkpoint.rng` restore the RNG exactly.

The batch count is exact because Lightning does not prefetch from loaders with a length: when a checkpoint is written
at the end of step ``k`` exactly the epoch's batches up to step ``k`` have left the loader.
"""

from __future__ import annotations

import itertools
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

__all__ = ["ResumableDataLoader"]

# Recorded with the position; if any differs on resume the saved batch count does not name the same samples. (Not the
# rank: Lightning saves rank 0's loader state and every rank loads it; all ranks are at the same batch.)
_ORDER_KEYS = ("num_batches", "sampler", "seed", "num_replicas")


class _SkippingIndex:
    """A loader's index sampler that drops the current pass's first ``_pass_skip`` items; its length is unchanged,
    so Lightning still counts the epoch as ``len(loader)`` batches (it starts counting at the restored position)."""

    def __init__(self, base: Iterable, loader: ResumableDataLoader) -> None:
        self.base = base
        # A weak reference: a persistent-worker iterator holds this object and the loader holds the iterator, and a
        # reference cycle would defer the workers' shutdown to some later garbage collection.
        self.loader = weakref.ref(loader)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[Any]:
        # DataLoader iterators may call this more than once per pass (worker iterators do), so it only reads.
        loader = self.loader()
        return itertools.islice(iter(self.base), loader._pass_skip if loader is not None else 0, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` (same arguments) with ``state_dict``/``load_state_dict`` for exact mid-epoch resumption.

    Args:
        *args: as for ``DataLoader``.
        seed: seed of the loader's own generator (default: the sampler's ``seed``, else ``PL_GLOBAL_SEED`` from
            ``seed_everything``, else 0).
        **kwargs: as for ``DataLoader``; without ``generator`` the loader makes its own (see the module docstring).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        *args: Any,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._owns_generator = kwargs.get("generator") is None
        if self._owns_generator:
            kwargs["generator"] = torch.Generator()
        # shuffle=True gets its own generator for the permutation: the DataLoader's one also gives each new iterator
        # its worker base seed, which a reused (persistent-worker) iterator does not draw, so sharing it would make
        # the order depend on whether the iterator is new, as it always is after a resume.
        self._order_generator: torch.Generator | None = None
        if shuffle and not args and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            self._order_generator = torch.Generator()
            kwargs["sampler"] = RandomSampler(dataset, generator=self._order_generator)
            shuffle = None
        super().__init__(dataset, batch_size, shuffle, *args, **kwargs)
        sampler_seed = getattr(self._epoch_source(), "seed", None)
        fallback = sampler_seed if sampler_seed is not None else os.environ.get("PL_GLOBAL_SEED", 0)
        self.seed = int(seed if seed is not None else fallback)
        self._skip = 0  # batches the next pass skips (set by load_state_dict)
        self._pass_skip = 0  # batches the current pass skipped
        self._batches = 0
        self._pass_epoch = 0  # epoch of the current pass when no sampler keeps one
        self._next_pass_epoch = 0

    @classmethod
    def from_loader(cls, loader: DataLoader, seed: int | None = None) -> ResumableDataLoader:
        """The same loader (dataset, sampler or batch sampler, collate_fn, workers, ...) made resumable."""
        kwargs: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "persistent_workers": loader.persistent_workers,
        }
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        if loader.batch_size is None:
            # No auto-batching: the sampler yields whole batches (or the loader yields single samples).
            kwargs.update(batch_size=None, sampler=loader.sampler)
        elif type(loader.batch_sampler).__name__ == "BatchSampler":
            kwargs.update(batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
        else:
            kwargs.update(batch_sampler=loader.batch_sampler)
        return cls(loader.dataset, seed=seed, **kwargs)

    # -- the epoch -------------------------------------------------------------------------------------------------
    def _epoch_source(self) -> Any:
        """The sampler that keeps the epoch (has ``set_epoch``), or None."""
        inner = getattr(self.batch_sampler, "sampler", None)
        for obj in (self.sampler, inner, self.batch_sampler):
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                return obj
        return None

    @property
    def epoch(self) -> int:
        """The epoch of the current (or next) pass."""
        source = self._epoch_source()
        return int(getattr(source, "epoch", 0)) if source is not None else self._pass_epoch

    def _set_epoch(self, epoch: int) -> None:
        source = self._epoch_source()
        if source is not None:
            source.set_epoch(epoch)
        else:
            self._pass_epoch = self._next_pass_epoch = epoch

    # -- iteration -------------------------------------------------------------------------------------------------
    @property
    def _index_sampler(self):
        # DataLoader iterators take their indices from this property; wrapping it is how a pass starts mid-epoch.
        return _SkippingIndex(super()._index_sampler, self)

    def __iter__(self):
        if self._epoch_source() is None:
            self._pass_epoch = self._next_pass_epoch
            self._next_pass_epoch += 1
        # Reproducible streams per epoch, independent of the global RNG.
        if self._order_generator is not None:
            self._order_generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        if self._owns_generator:
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch + 500_001)
        self._pass_skip, self._skip = self._skip, 0
        self._batches = self._pass_skip
        inner = super().__iter__()

        def counted():
            for batch in inner:
                self._batches += 1
                yield batch

        return counted()

    # -- state -----------------------------------------------------------------------------------------------------
    def _order_info(self) -> dict[str, Any]:
        source = self._epoch_source()
        sampler = source if source is not None else self.sampler
        return {
            "num_batches": len(self),
            "sampler": type(sampler).__name__,
            "seed": int(getattr(sampler, "seed", self.seed)),
            "num_replicas": int(getattr(sampler, "num_replicas", 1)),
        }

    def state_dict(self) -> dict[str, Any]:
        """The position: the current epoch and how many of its batches this loader has handed out."""
        return {"epoch": self.epoch, "batches": int(self._batches), **self._order_info()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass continue from ``state_dict``'s position.

        At the end of an epoch the next pass starts the next epoch. A mid-epoch position recorded with another
        batch count, sampler, seed or world size cannot name the same samples: the interrupted epoch then restarts
        from its beginning, with a warning (Lightning's behaviour for loaders that are not resumable).

        Raises:
            ValueError: ``state_dict`` was not written by this class.
        """
        missing = [k for k in ("epoch", "batches", *_ORDER_KEYS) if k not in state_dict]
        if missing:
            raise ValueError(f"ResumableDataLoader state lacks {missing}; was it saved by another loader class?")
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= int(state_dict["num_batches"]):
            self._set_epoch(epoch + 1)
            self._skip = 0
            return
        self._set_epoch(epoch)
        here = self._order_info()
        changed = {k: (state_dict[k], here[k]) for k in _ORDER_KEYS if state_dict[k] != here[k]}
        if changed:
            detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            warnings.warn(
                f"cannot continue epoch {epoch} after batch {batches}: the data order changed ({detail}); "
                "the epoch restarts from its beginning",
                stacklevel=2,
            )
            self._skip = 0
            return
        self._skip = batches
