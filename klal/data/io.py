"""Reading and writing klal data: the one split loader (:func:`load_split`) and the real-data converters' helpers
(reading a source, finding images, counting skipped records, writing rows).

A *source* is one of (checked in this order):

* a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
* a ``.parquet``, ``.jsonl`` or ``.json`` file, or a directory of such files (splits are inferred from the file names
  as ``datasets`` does, e.g. ``train-00000.parquet``, ``validation.jsonl``; otherwise everything is ``train``);
* anything else that does not exist locally and does not look like a path (no leading ``/``, ``.`` or ``~`` and no
  data-file extension) is a hub dataset name passed to ``datasets.load_dataset`` (this contacts the hub).

Image columns are read undecoded (``{"bytes", "path"}``), so converting never re-encodes an image. Converted rows
reference image files by path (or carry the source's image bytes); ``save_to_disk`` embeds the bytes, so a saved
dataset is self-contained (one copy per row: several questions on one image store it several times).

Skipped records are never silent: every skip is counted by reason in a :class:`ConversionReport`, whose one-line
summary is logged; in strict mode the first skip raises :class:`RecordError` naming the record. A conversion that
keeps no record at all writes nothing and is an error.

Damaged data names itself. A saved split whose Arrow file cannot be read (truncated by an interrupted copy, say) is a
:class:`DataReadError` naming the file; an image that cannot be decoded is an :class:`ImageDecodeError` naming the
dataset, split, sample id and row (:func:`read_row`, which the loaders use). Images over PIL's decompression-bomb
limit (about 179 M pixels) are refused the same way, with the size; the environment variable
``KLAL_MAX_IMAGE_PIXELS`` (a pixel count, or ``none`` for no limit) raises the limit for every klal command. An image
column stored undecoded (``datasets.Image(decode=False)``) is decoded by :func:`read_row` too and named the same way.
A split saved without rows (which ``datasets`` cannot load) is a :class:`DataReadError` naming the split.

Silently wrong rows are refused as well: an image whose size differs from the row's ``width`` / ``height`` columns
(:func:`klal.data.images.check_declared_size`, in :func:`read_row`), a sample id that occurs twice in a split or in
two splits (:func:`check_unique_ids`) and an empty or whitespace-only answer (:func:`check_answers`). A data file
that does not parse (malformed JSON) is an error naming it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from klal.data.images import (
    check_declared_size,
    decode_message,
    decode_stored,
    is_stored_image,
    to_rgb,
    upright_size,
)
from klal.data.schema import FEATURES, SPLITS, check_columns

logger = logging.getLogger("klal.data")

MAX_IMAGE_PIXELS_ENV = "KLAL_MAX_IMAGE_PIXELS"
"""Environment variable that sets the largest image (in pixels) klal decodes: an integer, or ``none`` for no limit."""


def apply_image_pixel_limit() -> None:
    """Set PIL's decompression-bomb limit from :data:`MAX_IMAGE_PIXELS_ENV` (nothing when it is unset).

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` and refuses twice that; klal sets the warning limit to half the value
    asked for, so an image of up to that many pixels decodes.
    """
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not value:
        return
    if value.lower() == "none":
        Image.MAX_IMAGE_PIXELS = None
        return
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_IMAGE_PIXELS_ENV} must be a positive pixel count or 'none', got {value!r}")
    Image.MAX_IMAGE_PIXELS = max(1, limit // 2)


apply_image_pixel_limit()

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "test",
}
"""Upstream split names -> output split names; names not listed (RefCOCO's ``testA``/``testB``) are kept as they are."""

_DATA_EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_MAX_EXAMPLES = 3


class RecordError(ValueError):
    """A source record that cannot be converted (raised in strict mode); the message names the record."""


class DataReadError(ValueError):
    """A saved dataset whose files cannot be read; the message names the file."""


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; the message names the dataset, split, sample id and row."""


class SkipRecord(Exception):
    """Raised inside a converter to skip the current record with a reason (counted by the report)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ConversionReport:
    """What a conversion kept and skipped.

    Attributes:
        source: the source that was converted (for messages).
        strict: raise on the first skipped record instead of counting it.
        kept: rows written, per output split.
        skipped: records skipped, per reason.
        notes: records kept but adjusted (e.g. a box clipped to the image), per reason.
        examples: the first few record ids per skip/note reason.
    """

    source: str
    strict: bool = False
    kept: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def keep(self, split: str, n: int = 1) -> None:
        """Count ``n`` rows written to ``split``."""
        self.kept[split] += n

    def skip(self, reason: str, record: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` skipped rows of ``record``; in strict mode raise :class:`RecordError` instead."""
        if self.strict:
            raise RecordError(f"{self.source}: record {record}: {reason}" + (f" ({detail})" if detail else ""))
        self.skipped[reason] += n
        self._example(reason, record)

    def note(self, reason: str, record: str) -> None:
        """Count a record that was kept after an adjustment."""
        self.notes[reason] += 1
        self._example(reason, record)

    def _example(self, reason: str, record: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _MAX_EXAMPLES:
            ex.append(record)

    @property
    def total_kept(self) -> int:
        """Rows written over all splits."""
        return sum(self.kept.values())

    @property
    def total_skipped(self) -> int:
        """Rows skipped over all reasons."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: kept per split, skipped per reason (with example record ids) and notes."""
        kept = ", ".join(f"{s} {n}" for s, n in self.kept.items()) or "none"
        line = f"{self.source}: kept {self.total_kept} ({kept}); skipped {self.total_skipped}"
        if self.skipped:
            parts = [f"{r}: {n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in self.skipped.most_common()]
            line += " [" + "; ".join(parts) + "]"
        if self.notes:
            line += "; notes [" + "; ".join(f"{r}: {n}" for r, n in self.notes.most_common()) + "]"
        return line

    def log(self) -> None:
        """Log the summary (a warning when records were skipped)."""
        (logger.warning if self.skipped else logger.info)(self.summary())


@dataclass
class Conversion:
    """A converted dataset and its report."""

    dataset: datasets.DatasetDict
    report: ConversionReport

    def save(self, out: str | os.PathLike) -> None:
        """``save_to_disk`` the dataset at ``out`` (what the converters' ``--out`` does).

        Raises:
            ValueError: no record was kept; nothing is written (the message is the report's summary).
        """
        if self.report.total_kept == 0:
            raise ValueError(f"{self.report.summary()}; nothing written to {os.fspath(out)}")
        self.dataset.save_to_disk(os.fspath(out))

    def written(self, out: str | os.PathLike | None) -> Conversion:
        """:meth:`save` at ``out`` when it is given (a converter's ``out`` option); returns this conversion."""
        if out is not None:
            self.save(out)
        return self


def canonical_split(name: str) -> str:
    """Output split name for an upstream split name (see :data:`SPLIT_ALIASES`)."""
    return SPLIT_ALIASES.get(str(name).strip().lower(), str(name).strip())


# -- sources -----------------------------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or os.path.splitext(source)[1].lower() in _DATA_EXTENSIONS


def _undecoded(ds: datasets.Dataset) -> datasets.Dataset:
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def load_source(source: str) -> dict[str, datasets.Dataset]:
    """Read a source (see the module docstring) into ``{upstream split name: Dataset}`` with undecoded images.

    Raises:
        FileNotFoundError: a path that does not exist, or a directory without a saved dataset or data files.
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if is_saved_dataset(path):
            loaded = read_saved(path)
        else:
            builders = {
                _DATA_EXTENSIONS[os.path.splitext(f)[1].lower()]
                for f in os.listdir(path)
                if os.path.splitext(f)[1].lower() in _DATA_EXTENSIONS
            }
            if not builders:
                raise FileNotFoundError(
                    f"{source}: no saved dataset (dataset_dict.json/state.json) and no .parquet/.jsonl/.json files"
                )
            if len(builders) > 1:
                raise ValueError(f"{source}: mixes parquet and json files; keep one format per directory")
            loaded = _load_files(source, builders.pop(), data_dir=path)
    elif os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _DATA_EXTENSIONS:
            raise ValueError(f"{source}: unsupported file type {ext!r}; expected one of {sorted(_DATA_EXTENSIONS)}")
        loaded = _load_files(source, _DATA_EXTENSIONS[ext], data_files={"train": path})
    elif _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    else:
        logger.info("%s: not a local path, loading it from the hub with datasets.load_dataset", source)
        loaded = datasets.load_dataset(source)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return {name: _undecoded(ds) for name, ds in loaded.items()}


def _load_files(source: str, builder: str, **kwargs: Any) -> datasets.DatasetDict:
    """``datasets.load_dataset(builder, **kwargs)`` for local data files; a file it cannot parse (malformed JSON, a
    damaged parquet file) is a ValueError naming ``source`` and the parser's first line, not a traceback."""
    from datasets.exceptions import DatasetGenerationError

    # The builder also logs the parse error (at ERROR level) before raising; the one line below says it.
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, **kwargs)
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"{source}: cannot read it as {builder} ({type(cause).__name__}: {detail})") from None
    finally:
        log.setLevel(level)


def source_dir(source: str) -> str | None:
    """The local directory a source lives in (to resolve relative image paths), or None for a hub name."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return None


# -- klal datasets on disk ---------------------------------------------------------------------------------------------


def check_max_samples(max_samples: int | None, option: str = "max_samples") -> None:
    """Raise a ValueError naming ``option`` unless ``max_samples`` is None (all rows) or an integer >= 1."""
    if max_samples is None:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"{option} must be an integer >= 1 (or None for every row), got {max_samples!r}")


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds a dataset written by ``save_to_disk`` (a ``DatasetDict`` or a ``Dataset``)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def load_split(path: str | os.PathLike, split: str, max_samples: int | None = None) -> datasets.Dataset:
    """One split of a klal dataset saved with ``save_to_disk``, checked for the schema's columns.

    The one split loader of klal (evaluation, head discovery, the study, preview). A saved ``DatasetDict`` is read
    by split name; a saved single ``Dataset`` counts as the ``train`` split, as the training data module reads it.

    Args:
        path: the dataset directory.
        split: split name (``train``, ``validation``, ``test``, ...).
        max_samples: keep the first this many rows (None: all of them).

    Raises:
        FileNotFoundError: ``path`` is not a directory, or holds no saved dataset.
        ValueError: ``max_samples`` < 1, a missing split (the message lists the available ones), a missing schema
            column or a sample id that occurs twice; every message names the path.
    """
    check_max_samples(max_samples)
    where = os.fspath(path)
    if not os.path.isdir(where):
        raise FileNotFoundError(f"dataset directory not found: {where}")
    if not is_saved_dataset(where):
        raise FileNotFoundError(
            f"{where} is not a dataset saved with save_to_disk (no dataset_dict.json or state.json in it)"
        )
    loaded = read_saved(where)
    if split not in loaded:
        raise ValueError(f"{where} has no split {split!r}; its splits: {', '.join(loaded) or 'none'}")
    ds = loaded[split]
    check_columns(ds, f"{where} [{split}]")
    check_not_empty({split: ds}, where)
    check_unique_ids({split: ds}, where)
    check_answers({split: ds}, where)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def read_saved(path: str | os.PathLike) -> datasets.DatasetDict:
    """``datasets.load_from_disk(path)`` as a ``DatasetDict`` (a saved single ``Dataset`` is its ``train`` split).

    Raises:
        DataReadError: a file of the dataset cannot be read (truncated or damaged); the message names the file.
    """
    where = os.fspath(path)
    try:
        loaded = datasets.load_from_disk(where)
    except (OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataReadError(f"{where}: cannot read {_damaged_file(where) or 'the saved dataset'}: {e}") from None
    except IndexError:
        # datasets cannot load a split saved with no rows (it has no data file; load_from_disk indexes the first).
        empty = _empty_splits(where)
        if not empty:
            raise
        raise DataReadError(
            f"{where}: split(s) {', '.join(repr(s) for s in empty)} hold no rows (saved with no data file, which "
            "datasets cannot load); give every split at least one row, or save the dataset without the empty split"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _empty_splits(where: str) -> list[str]:
    """Names of the splits under ``where`` whose ``state.json`` lists no data file."""
    import json

    empty = []
    for root, _, files in sorted(os.walk(where)):
        if "state.json" in files:
            with contextlib.suppress(OSError, ValueError), open(os.path.join(root, "state.json")) as f:
                state = json.load(f)
                if not state.get("_data_files"):
                    empty.append(state.get("_split") or os.path.relpath(root, where))
    return empty


def check_unique_ids(splits: Mapping[str, datasets.Dataset], where: str) -> None:
    """Refuse sample ids that occur twice, within a split or across the splits given (train vs validation).

    Errors and the per-sample records of evaluation name samples by id, and a sample in both training and validation
    data inflates the validation scores; neither is visible otherwise. Only the ``id`` column is read.

    Args:
        splits: split name -> dataset (or anything whose ``["id"]`` lists the ids).
        where: the datasets, for the message.

    Raises:
        ValueError: naming the id, the split(s) it occurs in and how many times.
    """
    first: dict[str, str] = {}
    for name, ds in splits.items():
        counts = Counter(str(i) for i in ds["id"])
        twice = [(i, n) for i, n in counts.items() if n > 1]
        if twice:
            examples = ", ".join(f"{i!r} ({n} times)" for i, n in twice[:3])
            raise ValueError(
                f"{where} [{name}]: {len(twice)} sample id(s) occur more than once, e.g. {examples}; every sample "
                "needs its own id (errors and results name samples by it)"
            )
        for i in counts:
            if i in first:
                raise ValueError(
                    f"{where}: sample id {i!r} is in both the {first[i]!r} and the {name!r} split; a sample in "
                    "two splits (e.g. trained on and validated on) makes the held-out scores meaningless"
                )
            first[i] = name


def check_not_empty(splits: Mapping[str, datasets.Dataset], where: str) -> None:
    """Refuse a split without rows (it used to end as ``list index out of range`` in the validation loop).

    Raises:
        ValueError: naming the dataset and the split.
    """
    for name, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(
                f"{where} [{name}]: the split has no rows; give it rows, or name another split (e.g. "
                "--data.val_split) or none"
            )


def check_answers(splits: Mapping[str, datasets.Dataset], where: str) -> None:
    """Refuse a row whose answer is empty or only whitespace: it has nothing to supervise, and the collator would
    find it only in the batch that holds it (or, for whitespace, train on the blank). Only ``answer`` is read.

    Raises:
        ValueError: naming the split, the sample and its row.
    """
    for name, ds in splits.items():
        for i, answer in enumerate(ds["answer"]):
            if answer is None or not str(answer).strip():
                sample = ds[i]["id"] if "id" in ds.column_names else None
                raise ValueError(
                    f"{where} [{name}]: sample {sample!r} (row {i}) has an empty answer {answer!r}; every sample needs "
                    "an answer (the next-token loss supervises it, and KLAL's query is its token)"
                )


def _damaged_file(where: str) -> str | None:
    """The first Arrow file under ``where`` that pyarrow cannot read to its end ("... is truncated or damaged")."""
    import pyarrow as pa

    for root, _, files in sorted(os.walk(where)):
        for name in sorted(f for f in files if f.endswith(".arrow")):
            file = os.path.join(root, name)
            try:
                with pa.memory_map(file) as source:
                    pa.ipc.open_stream(source).read_all()
            except (OSError, pa.ArrowException):
                return f"{file} (truncated or damaged)"
    return None


# PIL raises OSError (UnidentifiedImageError, "image file is truncated"), SyntaxError (broken PNG chunks) or
# DecompressionBombError on data it cannot decode.
_DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def read_row(ds: datasets.Dataset, index: int, where: str) -> dict[str, Any]:
    """``ds[index]`` with its image decoded, as RGB and checked, or an error naming the dataset, split, sample and row.

    An image column stored undecoded (``datasets.Image(decode=False)``) is decoded here, so both kinds of column
    report a damaged image the same way; the image is converted to RGB by its mode (:func:`klal.data.images.to_rgb`:
    a mode it cannot convert is named with the row) and must have the size the row's ``width`` / ``height`` columns
    declare (:func:`klal.data.images.check_declared_size`).

    Args:
        ds: a split in the klal schema (or a list of rows, returned as they are).
        index: row position.
        where: the dataset for messages, ``PATH`` or ``PATH [SPLIT]`` (the split is added from ``ds`` when it knows it).

    Raises:
        ImageDecodeError: the image cannot be decoded, or is over the pixel limit.
        ValueError: an image mode that cannot be converted, or the declared size differs from the image's.
    """
    if not isinstance(ds, datasets.Dataset):  # rows already in memory (a list of dicts) are decoded
        return ds[index]
    try:
        row = ds[int(index)]
        if is_stored_image(row.get("image")):
            row["image"] = decode_stored(row["image"])
    except _DECODE_ERRORS as e:
        raise image_decode_error(ds, int(index), where, e) from None
    if isinstance(row.get("image"), Image.Image):
        name = row_name(ds, int(index), where)
        row["image"] = to_rgb(row["image"], str(row.get("id")), where=name)
        check_declared_size(row, row["image"], name)
    return row


def row_name(ds: datasets.Dataset, index: int, where: str) -> str:
    """``PATH [SPLIT]: sample 'ID' (row N)``: how messages name row ``index`` of ``ds`` (nothing is decoded)."""
    split = getattr(ds, "split", None)
    if split is not None and f"[{split}]" not in where:
        where = f"{where} [{split}]"
    raw = ds.with_format("arrow")[index]  # the same row, nothing decoded
    sample = raw.column("id")[0].as_py() if "id" in raw.column_names else None
    return f"{where}: sample {sample!r} (row {index})"


def image_decode_error(ds: datasets.Dataset, index: int, where: str, error: BaseException) -> ImageDecodeError:
    """The :class:`ImageDecodeError` for row ``index`` of ``ds``, whose decoding raised ``error``."""
    head = row_name(ds, index, where)
    raw = ds.with_format("arrow")[index]
    if isinstance(error, Image.DecompressionBombError):
        size = _image_size(raw.column("image")[0].as_py() if "image" in raw.column_names else None)
        dims = f"{size[0]} x {size[1]} = {size[0] * size[1]} pixels" if size else str(error).split(",")[0]
        limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        return ImageDecodeError(
            f"{head}: its image is {dims}, over the {limit} the decoder accepts (a guard against decompression "
            f"bombs); to read it anyway set {MAX_IMAGE_PIXELS_ENV}={size[0] * size[1] if size else 'N'} (or none), "
            "or store a smaller image"
        )
    stored = raw.column("image")[0].as_py() if "image" in raw.column_names else None
    path = stored.get("path") if isinstance(stored, dict) else None
    source = f" (stored from {path})" if path else ""
    return ImageDecodeError(f"{head}: cannot decode its image{source}: {decode_message(error)}")


def _image_size(value: Any) -> tuple[int, int] | None:
    """(width, height) from the header of a stored image ``{"bytes", "path"}``, without the pixel limit."""
    if not isinstance(value, dict):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        with Image.open(source) as im:
            return upright_size(im)
    except Exception:  # noqa: BLE001 - the size only improves a message that is raised anyway
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# -- images ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """An image as it goes into a row: the ``{"path", "bytes"}`` the ``Image`` feature stores, and its size.

    It has ``width``/``height`` like a PIL image, which is all :func:`klal.data.schema.make_record` reads.
    """

    stored: dict[str, Any]
    width: int
    height: int


class ImageResolver:
    """Finds images and reads their sizes (headers only; each file once).

    Args:
        search_dirs: directories tried, in order, for relative paths and bare file names.
        verify: fully decode-check every image (slower; catches truncated files).
    """

    def __init__(self, search_dirs: Sequence[str | None] = (), verify: bool = False) -> None:
        self.search_dirs = [d for d in search_dirs if d]
        self.verify = verify
        self._sizes: dict[str, tuple[int, int] | str] = {}
        self._index: dict[str, dict[str, str]] = {}

    def find(self, names: Iterable[str | None]) -> str | None:
        """The first existing file among ``names`` (absolute, or relative to a search dir, or its base name there)."""
        tried: list[str] = []
        for name in names:
            if not name:
                continue
            name = os.path.expanduser(str(name))
            cands = [name] if os.path.isabs(name) else []
            for d in self.search_dirs:
                cands += [os.path.join(d, name), os.path.join(d, os.path.basename(name))]
            for c in cands:
                if c not in tried:
                    tried.append(c)
                    if os.path.isfile(c):
                        return c
        return None

    def find_by_stem(self, stems: Iterable[str | None]) -> str | None:
        """A file in a search dir whose name is one of ``stems`` with or without an extension."""
        for d in self.search_dirs:
            index = self._index.get(d)
            if index is None:
                index = {}
                if os.path.isdir(d):
                    for entry in sorted(os.listdir(d)):
                        index.setdefault(entry, entry)
                        index.setdefault(os.path.splitext(entry)[0], entry)
                self._index[d] = index
            for s in stems:
                if s and s in index:
                    return os.path.join(d, index[s])
        return None

    def from_path(self, path: str) -> ImageRef:
        """Reference an existing image file; raises :class:`SkipRecord` when it cannot be read."""
        path = os.path.abspath(path)
        size = self._sizes.get(path)
        if size is None:
            size = self._read_size(path, lambda: Image.open(path))
            self._sizes[path] = size
        if isinstance(size, str):
            raise SkipRecord("unreadable image", f"{path}: {size}")
        return ImageRef({"path": path, "bytes": None}, *size)

    def from_value(self, value: Any) -> ImageRef | None:
        """Reference an image given inline in a source row (``{"bytes", "path"}``, bytes, a PIL image or a path).

        Returns None when the value holds no image (so the caller can look elsewhere).
        """
        if value is None:
            return None
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return self._from_bytes(buf.getvalue(), None)
        if isinstance(value, (bytes, bytearray)):
            return self._from_bytes(bytes(value), None)
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return self._from_bytes(bytes(value["bytes"]), value.get("path"))
            value = value.get("path")
            if not value:
                return None
        if isinstance(value, (str, os.PathLike)):
            found = self.find([str(value)])
            if found is None:
                raise SkipRecord("missing image file", str(value))
            return self.from_path(found)
        raise SkipRecord("unreadable image", f"unsupported image value of type {type(value).__name__}")

    def _from_bytes(self, data: bytes, path: str | None) -> ImageRef:
        size = self._read_size(path or "<bytes>", lambda: Image.open(io.BytesIO(data)))
        if isinstance(size, str):
            raise SkipRecord("unreadable image", size)
        return ImageRef({"path": path, "bytes": data}, *size)

    def _read_size(self, name: str, opener: Any) -> tuple[int, int] | str:
        try:
            with opener() as im:
                size = upright_size(im)  # the size datasets decodes it at (EXIF orientation applied)
                if self.verify:
                    im.verify()
        except Exception as e:  # any decoder failure means "unreadable"; the message is reported
            return f"{type(e).__name__}: {e}"
        if size[0] <= 0 or size[1] <= 0:
            return f"empty image {size}"
        return size


# -- templates and output ----------------------------------------------------------------------------------------------


def check_template(template: str, name: str, fields: Sequence[str]) -> None:
    """Raise a ValueError naming ``name`` when ``template`` uses a field other than ``fields`` or is malformed."""
    try:
        template.format(**{f: "x" for f in fields})
    except (KeyError, IndexError) as e:
        raise ValueError(f"{name} template {template!r} uses unknown field {e}; available: {list(fields)}") from e
    except ValueError as e:
        raise ValueError(f"{name} template {template!r} is malformed: {e}") from e


def split_order(names: Iterable[str]) -> list[str]:
    """Splits ordered train, validation, test, then the rest alphabetically."""
    names = set(names)
    return [s for s in SPLITS if s in names] + sorted(names - set(SPLITS))


def build_dataset_dict(rows_by_split: Mapping[str, list[dict[str, Any]]]) -> datasets.DatasetDict:
    """A ``DatasetDict`` in the klal schema from rows made with :func:`klal.data.schema.make_record`."""
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows_by_split[s], features=FEATURES) for s in split_order(rows_by_split)}
    )


def split_list(splits: str | Sequence[str] | None) -> list[str] | None:
    """A ``--splits`` value as a list: ``"train,test"`` and ``["train", "test"]`` give the same (None stays None)."""
    if splits is None:
        return None
    items = splits.split(",") if isinstance(splits, str) else list(splits)
    return [str(s).strip() for s in items if str(s).strip()]


def converter_main(convert: Callable[..., Conversion], default_prog: str) -> Callable[..., Conversion]:
    """The ``main(argv=None, prog=None)`` of a converter module (``convert_refcoco``, ``convert_pixmo_points``).

    It runs the converter as a command (its parameters and the options it passes on become flags,
    :func:`klal.cli.run`; without ``--out`` nothing is written) and prints the report's summary line.
    """

    def main(argv: Sequence[str] | None = None, prog: str | None = None) -> Conversion:
        from klal.cli import run

        conversion = run(convert, argv, prog or default_prog)
        print(conversion.report.summary())
        return conversion

    main.__doc__ = f"``{default_prog}`` (or ``klal``'s subcommand): :func:`{convert.__name__}` as a command."
    return main
