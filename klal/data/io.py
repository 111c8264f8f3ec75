"""Shared helpers of the real-data loaders: reading a source, finding images, counting skipped records, writing rows.

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
summary is logged; in strict mode the first skip raises :class:`RecordError` naming the record.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from klal.data.schema import FEATURES, SPLITS

logger = logging.getLogger("klal.data")

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
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            loaded = datasets.load_from_disk(path)
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
            loaded = datasets.load_dataset(builders.pop(), data_dir=path)
    elif os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _DATA_EXTENSIONS:
            raise ValueError(f"{source}: unsupported file type {ext!r}; expected one of {sorted(_DATA_EXTENSIONS)}")
        loaded = datasets.load_dataset(_DATA_EXTENSIONS[ext], data_files={"train": path})
    elif _looks_like_path(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    else:
        logger.info("%s: not a local path, loading it from the hub with datasets.load_dataset", source)
        loaded = datasets.load_dataset(source)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return {name: _undecoded(ds) for name, ds in loaded.items()}


def source_dir(source: str) -> str | None:
    """The local directory a source lives in (to resolve relative image paths), or None for a hub name."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return None


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
                size = (int(im.width), int(im.height))
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
