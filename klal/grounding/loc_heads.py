"""Localization heads (Kang et al., CVPR 2025): a few attention heads whose maps localise the text's referent.

**Discovery** (:func:`discover_heads`), over N image-text pairs. For each pair, one forward pass captures, at every
layer and head, the last prompt token's attention row over *all* keys (``CaptureRequest.differentiable_rows``; under
``torch.no_grad`` it is a plain tensor):

1. ``S_img(l, h)`` = attention mass on the image tokens (not renormalised; what the head spends on the image).
2. Heads whose ``S_img`` is at or above the chord elbow of the descending ``S_img`` curve of that pair are kept
   (:func:`klal.grounding.ops.elbow_threshold`).
3. Each kept head's map (its attention over the image tokens, renormalised to sum 1) gets a spatial entropy
   (:func:`klal.grounding.ops.spatial_entropy`, ``mean_scale`` and ``floor`` options); heads are ranked by lowest
   entropy and the first ``top_k`` get one vote.
4. After N pairs, the ``top_k`` heads with the most votes are the localization heads (:class:`HeadSelection`).

**Map** (:class:`LocalizationHeads`): one forward pass reads the selected heads' attention over each image's tokens;
each head's grid is normalised to sum 1 on that image, Gaussian-smoothed (``sigma`` cells, default 1) and the grids are
summed. The map is binarised at its mean (cells strictly above it). Boxes: every 8-connected component of the mask,
boxed and ranked by the summed map mass inside the component, so the first box is the component holding the most
map mass (a stray speck cannot outrank the main blob, and other blobs remain available as lower-ranked boxes). The
mask of image 0 is returned in ``extras["mask"]``.

Choices where the paper leaves details open (the tunable ones are options):

* The elbow on ``S_img`` is taken per pair, over all ``L x H`` heads of that pair.
* Discovery uses the first image of each pair (the method is defined on single image-text pairs); ``S_img`` and the
  map refer to that image. Text-only rows are not pairs: :meth:`LocalizationHeads.prepare` and the CLI pass over them
  (the CLI says how many), so ``discover_samples`` / ``--num`` count image-text pairs.
* Heads whose map has no blob (spatial entropy ``+inf``, e.g. a flat map) get no vote, so a pair may vote for fewer
  than ``top_k`` heads. On an untrained model (the tiny test model) attention is so uniform that no map clears the
  0.001 floor and discovery fails, saying so; ``floor=0`` (``--floor 0``) counts any above-mean cell.
* Entropy ties (e.g. several single-blob heads at 0) go to the larger ``S_img``, then to the lower ``(layer, head)``.
* Final ties in vote count go to the lower ``(layer, head)``; heads with no vote are never selected.
* Each head's grid is normalised before smoothing so that every selected head weighs the same in the sum.
* The model identity stored with the heads is the checkpoint's ``name_or_path`` (``"tiny"`` for an in-memory model
  without one: the embedded test model), the number of layers and the number of heads. A file is accepted for a
  model with the same counts and the same name, or the same last path component (a local copy of a hub checkpoint).

CLI::

    python -m klal.grounding.loc_heads --model tiny --data data/grid_patch --num 1000 --out heads.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from klal.grounding.base import (
    GroundingError,
    GroundingModel,
    GroundingResult,
    image_rows,
    register_method,
    sample_images,
    timed,
    timed_batch,
)
from klal.grounding.ops import (
    cells_to_pixels,
    connected_components,
    elbow_threshold,
    gaussian_smooth,
    mask_to_box,
    normalize,
    spatial_entropy,
)

Head = tuple[int, int]
FORMAT = "klal.localization_heads/1"
TINY_NAME = "tiny"


# ------------------------------------------------------------------------------------------------- head selection


@dataclass
class HeadSelection:
    """Localization heads of one model, as discovered and saved.

    Attributes:
        heads: ``(layer, head)`` pairs, most frequently selected first.
        frequencies: for each of ``heads``, the number of pairs that voted for it.
        num_samples: number of image-text pairs the discovery ran on.
        name_or_path: the model's checkpoint name or path (``"tiny"`` for the embedded test model).
        num_layers: the model's language layers.
        num_heads: the model's attention heads per layer.
        top_k: heads voted for per pair (and kept in the end) during discovery.
        mean_scale: spatial-entropy mean multiple used during discovery.
        counts: ``num_layers x num_heads`` votes of every head (empty when unknown).
    """

    heads: list[Head]
    frequencies: list[int]
    num_samples: int
    name_or_path: str
    num_layers: int
    num_heads: int
    top_k: int = 0
    mean_scale: float = 1.0
    counts: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with a ``format`` tag)."""
        d = asdict(self)
        d["heads"] = [[int(layer), int(head)] for layer, head in self.heads]
        return {"format": FORMAT, **d}

    def save(self, path: str) -> None:
        """Write the selection as JSON to ``path`` (parent folders are created)."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # One key per line with compact values keeps the (L x H) vote table readable.
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items())
        with open(path, "w") as f:
            f.write("{\n" + body + "\n}\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> HeadSelection:
        """Parse and validate a dict written by :meth:`to_dict`.

        Raises:
            GroundingError: naming ``source`` when the dict is not a valid head selection.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise GroundingError(f"heads file {source}: not a localization-heads file (expected format {FORMAT!r})")
        try:
            heads = [(int(h[0]), int(h[1])) for h in d["heads"] if len(h) == 2]
            if len(heads) != len(d["heads"]):
                raise ValueError("every head must be [layer, head]")
            sel = cls(
                heads=heads,
                frequencies=[int(v) for v in d["frequencies"]],
                num_samples=int(d["num_samples"]),
                name_or_path=str(d["name_or_path"]),
                num_layers=int(d["num_layers"]),
                num_heads=int(d["num_heads"]),
                top_k=int(d.get("top_k", 0)),
                mean_scale=float(d.get("mean_scale", 1.0)),
                counts=[[int(v) for v in row] for row in d.get("counts", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise GroundingError(f"heads file {source}: malformed ({type(e).__name__}: {e})") from e
        if not sel.heads:
            raise GroundingError(f"heads file {source}: lists no heads")
        if len(sel.frequencies) != len(sel.heads):
            raise GroundingError(f"heads file {source}: {len(sel.heads)} heads but {len(sel.frequencies)} frequencies")
        if len(set(sel.heads)) != len(sel.heads):
            raise GroundingError(f"heads file {source}: a head is listed twice")
        bad = [h for h in sel.heads if not (0 <= h[0] < sel.num_layers and 0 <= h[1] < sel.num_heads)]
        if bad:
            raise GroundingError(
                f"heads file {source}: heads {bad} are outside the recorded model's {sel.num_layers} layers x "
                f"{sel.num_heads} heads"
            )
        return sel

    @classmethod
    def load(cls, path: str, gm: GroundingModel | None = None) -> HeadSelection:
        """Read a selection from JSON; with ``gm``, also check that it was made for that model.

        Raises:
            GroundingError: naming ``path`` when the file is missing or malformed, or made for another model.
        """
        if not os.path.isfile(path):
            raise GroundingError(f"heads file {path}: no such file")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise GroundingError(f"heads file {path}: not valid JSON ({e})") from e
        sel = cls.from_dict(d, source=path)
        if gm is not None:
            sel.check_model(gm, source=path)
        return sel

    def check_model(self, gm: GroundingModel, source: str = "<heads>") -> None:
        """Refuse a selection made for another model (name, layer count or head count differ).

        Raises:
            GroundingError: naming ``source`` and both identities.
        """
        name, layers, heads = model_identity(gm)
        same = _same_model_name(self.name_or_path, name) and (self.num_layers, self.num_heads) == (layers, heads)
        if not same:
            raise GroundingError(
                f"heads file {source}: made for model {self.name_or_path!r} ({self.num_layers} layers x "
                f"{self.num_heads} heads), but the model given is {name!r} ({layers} layers x {heads} heads)"
            )


def model_identity(gm: GroundingModel) -> tuple[str, int, int]:
    """``(name_or_path, num_layers, num_heads)`` of the model behind ``gm``.

    A model built in memory has an empty ``name_or_path``; in klal that is the embedded tiny model, named ``"tiny"``
    as :class:`klal.models.loader.ModelConfig` names it.
    """
    name = str(getattr(gm.model.config, "_name_or_path", "") or "") or TINY_NAME
    return name, int(gm.num_layers), int(gm.num_heads)


def _same_model_name(recorded: str, given: str) -> bool:
    if recorded == given:
        return True
    # A local copy of a hub checkpoint is recorded by its path: compare the last path components.
    return os.path.basename(os.path.normpath(recorded)) == os.path.basename(os.path.normpath(given))


# ------------------------------------------------------------------------------------------------------ discovery


def head_statistics(gm: GroundingModel, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: every head's image attention mass and map for the sample's first image.

    Returns:
        ``S_img`` ``(L, H)``: the last prompt token's attention mass on the image tokens, and ``maps``
        ``(L, H, gh, gw)``: the same attention renormalised over the image tokens.

    Raises:
        GroundingError: the sample has no image, or the model did not report every layer.
    """
    images = sample_images(sample)[:1]
    inputs = gm.inputs(images, sample["question"])
    request = gm.request(inputs, per_head=False, differentiable_rows=True)
    with torch.no_grad():
        gm.forward(inputs, request)
    layers = sorted(request.full_probs)
    if layers != list(range(gm.num_layers)):
        raise GroundingError(
            f"sample {sample.get('id')!r}: attention rows were captured for layers {layers}, expected all "
            f"{gm.num_layers}"
        )
    full = torch.stack([request.full_probs[layer][0, :, 0] for layer in layers]).float()  # (L, H, S)
    request.clear()
    visual = inputs["visual_mask"][0].to(full.device)
    on_image = full[..., visual]  # (L, H, V)
    s_img = on_image.sum(-1)
    maps = on_image / s_img.clamp_min(torch.finfo(on_image.dtype).tiny)[..., None]
    gh, gw = inputs["grids"][0]
    n_layers, n_heads = s_img.shape
    return s_img.cpu().numpy().astype(np.float64), maps.cpu().numpy().astype(np.float64).reshape(
        n_layers, n_heads, gh, gw
    )


def select_heads_for_sample(
    s_img: np.ndarray, maps: np.ndarray, top_k: int, mean_scale: float = 1.0, floor: float = 1e-3
) -> list[Head]:
    """The heads one image-text pair votes for.

    Heads with ``S_img`` at or above the elbow threshold are ranked by the spatial entropy of their (normalised) map,
    lowest first, ties by larger ``S_img`` then lower ``(layer, head)``; heads with no blob (infinite entropy) are
    dropped; the first ``top_k`` are returned.

    Args:
        s_img: ``(L, H)`` image attention mass.
        maps: ``(L, H, gh, gw)`` per-head maps over the image.
        top_k: votes per pair.
        mean_scale: spatial-entropy mean multiple (1 in the original method, 2 in a later version).
        floor: spatial-entropy component floor (on maps normalised to sum 1).
    """
    s_img = np.asarray(s_img, dtype=np.float64)
    maps = np.asarray(maps, dtype=np.float64)
    if s_img.ndim != 2 or maps.shape[:2] != s_img.shape or maps.ndim != 4:
        raise ValueError(f"s_img (L, H) and maps (L, H, gh, gw) do not match: {s_img.shape} vs {maps.shape}")
    threshold = elbow_threshold(s_img)
    ranked = []
    for layer, head in zip(*np.nonzero(s_img >= threshold)):
        ent = spatial_entropy(normalize(maps[layer, head]), mean_scale=mean_scale, floor=floor)
        if math.isfinite(ent):
            ranked.append((ent, -float(s_img[layer, head]), int(layer), int(head)))
    ranked.sort()
    return [(layer, head) for _, _, layer, head in ranked[:top_k]]


def discover_heads(
    gm: GroundingModel,
    samples: Iterable[dict[str, Any]],
    top_k: int = 5,
    mean_scale: float = 1.0,
    floor: float = 1e-3,
    progress: bool = False,
    total: int | None = None,
) -> HeadSelection:
    """Find the localization heads of ``gm`` by voting over image-text pairs (one forward pass each).

    Args:
        gm: the model.
        samples: dataset rows (``id``, ``image``, ``question``); may be a generator.
        top_k: heads voted for per pair, and heads kept in the end.
        mean_scale: spatial-entropy mean multiple.
        floor: spatial-entropy component floor.
        progress: show a tqdm progress bar.
        total: number of samples, for the progress bar.

    Raises:
        GroundingError: no samples, bad ``top_k``, or no head received a vote.
    """
    top_k = _positive_int(top_k, "top_k")
    counts = np.zeros((gm.num_layers, gm.num_heads), dtype=np.int64)
    iterator: Iterable[dict[str, Any]] = samples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(samples, total=total, desc="localization heads", unit="sample")
    n = 0
    for sample in iterator:
        s_img, maps = head_statistics(gm, sample)
        for layer, head in select_heads_for_sample(s_img, maps, top_k, mean_scale, floor):
            counts[layer, head] += 1
        n += 1
    if n == 0:
        raise GroundingError("localization-head discovery got no samples")
    flat = [
        (-int(counts[layer, head]), layer, head) for layer in range(counts.shape[0]) for head in range(counts.shape[1])
    ]
    flat.sort()
    chosen = [(layer, head) for neg, layer, head in flat[:top_k] if neg < 0]
    if not chosen:
        raise GroundingError(
            f"localization-head discovery: on none of {n} samples did a head above the S_img elbow have a map with a "
            f"blob (cells above mean_scale={mean_scale:g} x mean by more than floor={floor:g}); attention this "
            "uniform (e.g. an untrained model) needs a smaller floor"
        )
    name, n_layers, n_heads = model_identity(gm)
    return HeadSelection(
        heads=chosen,
        frequencies=[int(counts[h]) for h in chosen],
        num_samples=n,
        name_or_path=name,
        num_layers=n_layers,
        num_heads=n_heads,
        top_k=top_k,
        mean_scale=float(mean_scale),
        counts=counts.tolist(),
    )


# ------------------------------------------------------------------------------------------------------------ map


def heads_map(head_grids: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Sum of the heads' grids, each normalised to sum 1 and Gaussian-smoothed (``sigma`` cells).

    Args:
        head_grids: ``(K, gh, gw)``, one grid per selected head.
        sigma: smoothing in cells (0 = none).
    """
    grids = np.asarray(head_grids, dtype=np.float64)
    if grids.ndim != 3 or grids.shape[0] == 0:
        raise ValueError(f"head_grids must be (K, gh, gw) with K >= 1, got shape {grids.shape}")
    return np.sum([gaussian_smooth(normalize(g), sigma) for g in grids], axis=0)


def map_boxes(grid: np.ndarray) -> tuple[np.ndarray, list[tuple[tuple[int, int, int, int], float]]]:
    """Binarise a map at its mean and box each 8-connected component, by summed map mass (descending).

    Returns:
        ``(mask, boxes)``: the bool mask (cells strictly above the mean; empty for a flat map) and
        ``[(cell_box, mass), ...]``, best first; ties keep the components' row-major order.
    """
    g = np.asarray(grid, dtype=np.float64)
    mask = g > g.mean()
    labels, n = connected_components(mask, connectivity=8)
    out = []
    for k in range(1, n + 1):
        comp = labels == k
        box = mask_to_box(comp)
        assert box is not None  # every label has a cell
        out.append((box, float(g[comp].sum())))
    order = sorted(range(n), key=lambda i: -out[i][1])
    return mask, [out[i] for i in order]


# --------------------------------------------------------------------------------------------------------- method


class LocalizationHeads:
    """Localization-heads grounding (one forward pass per sample once the heads are known).

    Args:
        heads_file: JSON written by :meth:`HeadSelection.save` or the CLI; if None, :meth:`prepare` discovers heads.
        top_k: heads to discover (and voted for per pair).
        discover_samples: at most this many rows of ``prepare``'s samples are used for discovery.
        save_heads: where :meth:`prepare` writes discovered heads (JSON); not allowed with ``heads_file``.
        sigma: smoothing (cells) of each head's grid before summing.
        mean_scale: spatial-entropy mean multiple used in discovery.
        floor: spatial-entropy component floor used in discovery (maps sum to 1; the paper's 0.001).

    Raises:
        GroundingError: bad options, or an unreadable ``heads_file`` (naming it).
    """

    answers = False

    def __init__(
        self,
        heads_file: str | None = None,
        top_k: int = 5,
        discover_samples: int = 64,
        save_heads: str | None = None,
        sigma: float = 1.0,
        mean_scale: float = 1.0,
        floor: float = 1e-3,
    ) -> None:
        self.top_k = _positive_int(top_k, "top_k")
        self.discover_samples = _positive_int(discover_samples, "discover_samples")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise GroundingError(f"localization_heads: sigma must be a finite number >= 0, got {sigma!r}")
        if not (isinstance(mean_scale, (int, float)) and math.isfinite(mean_scale) and mean_scale > 0):
            raise GroundingError(f"localization_heads: mean_scale must be a positive number, got {mean_scale!r}")
        if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
            raise GroundingError(f"localization_heads: floor must be a finite number >= 0, got {floor!r}")
        if heads_file and save_heads:
            raise GroundingError(
                "localization_heads: save_heads writes discovered heads, but heads_file already gives them; "
                "pass one of the two"
            )
        self.sigma = float(sigma)
        self.mean_scale = float(mean_scale)
        self.floor = float(floor)
        self.heads_file = heads_file
        self.save_heads = save_heads
        self.selection: HeadSelection | None = HeadSelection.load(heads_file) if heads_file else None

    def prepare(self, gm: GroundingModel, samples: Sequence[dict[str, Any]]) -> None:
        """Check the loaded heads against ``gm``, or discover heads on the first ``discover_samples`` image rows.

        Heads are a property of the model, not of a dataset: once loaded or discovered they are kept, and later
        calls (e.g. one per evaluated dataset) only check them against ``gm``.

        Raises:
            GroundingError: heads made for another model, or no image rows to discover on.
        """
        if self.selection is not None:
            self.selection.check_model(gm, source=self.heads_file or "<heads>")
            return
        # Discovery votes over image-text pairs: the first discover_samples rows that have an image.
        kept, skipped = image_rows(samples, self.discover_samples)
        # Index row by row: slicing a datasets.Dataset would give columns, not rows.
        rows = [kept[i] for i in range(len(kept))]
        if not rows:
            text = f" ({skipped} text-only row(s) passed over)" if skipped else ""
            raise GroundingError(f"localization_heads: no heads_file and no image rows to discover heads on{text}")
        self.selection = discover_heads(gm, rows, top_k=self.top_k, mean_scale=self.mean_scale, floor=self.floor)
        if self.save_heads:
            self.selection.save(self.save_heads)

    def run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        """Map, mask and boxes of one row."""
        return timed(gm, lambda: self._run(gm, sample))

    def run_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        """Map several rows from one padded forward pass (:meth:`GroundingModel.batch_attention`)."""
        return timed_batch(gm, lambda: self._run_batch(gm, samples))

    def _ready(self, gm: GroundingModel, samples: Sequence[dict[str, Any]]) -> tuple[HeadSelection, list[int]]:
        """The checked head selection and the layers it reads, or GroundingError naming the first sample (images are
        checked where they are read, by :func:`sample_images`)."""
        first = samples[0].get("id") if samples else None
        if self.selection is None:
            raise GroundingError(
                f"sample {first!r}: localization_heads has no heads; give heads_file or call prepare()"
            )
        self.selection.check_model(gm, source=self.heads_file or "<discovered heads>")
        return self.selection, sorted({layer for layer, _ in self.selection.heads})

    def _run_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        sel, layers = self._ready(gm, samples)
        return [
            self._result(gm, sel, layers, att, grids, sizes)
            for att, grids, sizes in gm.batch_attention(samples, "prompt_last", layers, per_head=True)
        ]

    def _run(self, gm: GroundingModel, sample: dict[str, Any]) -> GroundingResult:
        sel, layers = self._ready(gm, [sample])
        inputs = gm.inputs(sample_images(sample), sample["question"])
        att = gm.attention(inputs, layers=layers, per_head=True)  # (len(layers), H, V)
        return self._result(gm, sel, layers, att, inputs["grids"], inputs["image_sizes"])

    def _result(
        self,
        gm: GroundingModel,
        sel: HeadSelection,
        layers: list[int],
        att: torch.Tensor,
        grids: list[tuple[int, int]],
        sizes: list[tuple[int, int]],
    ) -> GroundingResult:
        """Map, mask and boxes from the heads' attention ``att`` ``(len(layers), H, V)`` of one sample."""
        rows = torch.stack([att[layers.index(layer), head] for layer, head in sel.heads])  # (K, V)
        per_image = gm.split_grid(rows, grids)  # [(K, gh, gw)]
        maps = [heads_map(g, self.sigma) for g in per_image]
        mask, ranked = map_boxes(maps[0])
        gh, gw = maps[0].shape
        boxes = [cells_to_pixels(box, (gh, gw), sizes[0]) for box, _ in ranked]
        extras = {
            "heads": [list(h) for h in sel.heads],
            "mask": mask.astype(int).tolist(),
            "box_masses": [mass for _, mass in ranked],
        }
        return GroundingResult(maps=maps, boxes=boxes, answer=None, extras=extras)


# Running this file with ``python -m`` executes a second copy of it as ``__main__``; registering that copy's class as
# well would clash with the importable module's registration (the CLI does not need the registry).
if __name__ != "__main__":
    register_method("localization_heads")(LocalizationHeads)


def _positive_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GroundingError(f"localization_heads: {option} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------------------ CLI


def _rows(paths: Sequence[str], split: str, num: int) -> tuple[list[Any], int]:
    """The image rows of ``paths`` (their ``split``) and how many to draw from them in total (at most ``num``).

    Text-only rows are left out (discovery needs image-text pairs) and their number is printed to stderr.
    """
    import datasets

    from klal.data.schema import check_columns

    parts = []
    for path in paths:
        if not os.path.isdir(path):
            sys.exit(f"loc_heads: error: --data {path!r} is not a directory (a dataset saved with save_to_disk)")
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                sys.exit(f"loc_heads: error: {path} has no split {split!r} (has {list(loaded)})")
            loaded = loaded[split]
        check_columns(loaded, f"{path} [{split}]")
        kept, skipped = image_rows(loaded)
        if skipped:
            print(f"loc_heads: {path} [{split}]: skipping {skipped} text-only row(s) (no image)", file=sys.stderr)
        parts.append(kept)
    return parts, min(num, sum(len(p) for p in parts))


def _interleave(parts: Sequence[Any], total: int) -> Iterable[dict[str, Any]]:
    """Rows taken round-robin from the datasets (so every dataset contributes), ``total`` in all."""
    given = 0
    i = 0
    while given < total:
        for part in parts:
            if i < len(part) and given < total:
                yield part[i]
                given += 1
        i += 1


def main(argv: Sequence[str] | None = None) -> HeadSelection:
    """Discover a model's localization heads on dataset rows and save them as JSON."""
    p = argparse.ArgumentParser(
        prog="python -m klal.grounding.loc_heads",
        description="Discover the localization heads of a Qwen2.5-VL model and save them as JSON.",
    )
    p.add_argument("--model", default="tiny", help="tiny, a hub id or a local checkpoint directory")
    p.add_argument("--adapter", default=None, help="peft adapter directory trained on --model")
    p.add_argument("--data", nargs="+", required=True, help="dataset directories (save_to_disk, klal schema)")
    p.add_argument("--split", default="train", help="split to discover on (default train, to keep test data unseen)")
    p.add_argument("--num", type=int, default=1000, help="image-text pairs to use (round-robin over --data)")
    p.add_argument("--top-k", type=int, default=5, help="heads voted for per pair and kept in the end")
    p.add_argument("--mean-scale", type=float, default=1.0, help="spatial entropy: B = ReLU(A - mean_scale * mean A)")
    p.add_argument("--floor", type=float, default=1e-3, help="spatial entropy: components of B > floor (maps sum to 1)")
    p.add_argument("--min-pixels", type=int, default=56 * 56)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num}")
    if args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")

    from klal.models.loader import ModelConfig

    parts, total = _rows(args.data, args.split, args.num)
    if total == 0:
        sys.exit(f"loc_heads: error: the {args.split!r} split of {args.data} has no rows with an image")
    gm = GroundingModel.load(
        ModelConfig(name_or_path=args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels), args.adapter
    )
    try:
        sel = discover_heads(
            gm,
            _interleave(parts, total),
            top_k=args.top_k,
            mean_scale=args.mean_scale,
            floor=args.floor,
            progress=True,
            total=total,
        )
    except GroundingError as e:
        sys.exit(f"loc_heads: error: {e}")
    sel.save(args.out)
    heads = ", ".join(f"L{layer}H{head} ({n})" for (layer, head), n in zip(sel.heads, sel.frequencies))
    print(f"{sel.num_samples} samples -> heads (votes): {heads}; written to {args.out}")
    return sel


__all__ = [
    "HeadSelection",
    "LocalizationHeads",
    "discover_heads",
    "head_statistics",
    "heads_map",
    "main",
    "map_boxes",
    "model_identity",
    "select_heads_for_sample",
]


if __name__ == "__main__":
    main()
