"""Localization heads (Kang et al., CVPR 2025): a few attention heads whose maps localise the text's referent.

**Discovery** (:func:`discover_heads`), over N image-text pairs. For each pair, one forward pass captures, at every
layer and head, the last prompt token's attention row over *all* keys (``CaptureRequest.differentiable_rows``; under
``torch.no_grad`` it is a plain tensor):

1. ``S_img(l, h)`` = attention mass on the image tokens (not renormalised; what the head spends on the image).
2. Heads whose ``S_img`` is at or above the chord-elbow value of that pair's ``S_img`` values are kept
   (:func:`klal.grounding.ops.elbow_threshold`; the paper's reading, see "Choices").
3. Each kept head's RAW map (its attention row over the image tokens, summing to its ``S_img``) gets the authors'
   spatial entropy (:func:`head_entropy`; ``mean_scale`` and ``floor`` options); heads are ranked by lowest entropy
   and the first ``top_k`` get one vote.
4. After N pairs, the ``top_k`` heads with the most votes are the localization heads (:class:`HeadSelection`).

**Map** (:class:`LocalizationHeads`): one forward pass reads the selected heads' attention over each image's tokens;
each head's grid is normalised to sum 1 on that image, Gaussian-smoothed (``sigma`` cells, default 1) and the grids are
summed. The map is binarised at its mean (cells strictly above it). Boxes: every 8-connected component of the mask,
boxed and ranked by the summed map mass inside the component, so the first box is the component holding the most
map mass (a stray speck cannot outrank the main blob, and other blobs remain available as lower-ranked boxes). The
mask of image 0 is returned in ``extras["mask"]``.

Choices where the paper leaves details open (the tunable ones are options):

* The elbow on ``S_img`` is taken per pair, over all ``L x H`` heads of that pair, and the heads whose ``S_img`` is
  at or above the elbow VALUE are kept. The released code's ``find_elbow_point`` returns a head index and its filter
  ``head_idx >= index`` keeps a suffix of layers instead: a bug, not followed (docs/grounding.md).
* Discovery uses the first image of each pair (the method is defined on single image-text pairs); ``S_img`` and the
  map refer to that image. Text-only rows are not pairs: :meth:`LocalizationHeads.prepare` and the CLI pass over them
  (the CLI says how many), so ``discover_samples`` / ``--num`` count image-text pairs.
* Heads whose map has no component above the floor (entropy 0 with no component, or ``+inf`` for a flat map) get
  no vote, so a pair may vote for fewer than ``top_k`` heads. The released code gives such a head entropy 0, so it
  ranks first: a bug, not followed. On an untrained model (the tiny test model) attention is so uniform that no map
  clears the 0.001 floor and discovery fails, saying so; ``floor=0`` (``--floor 0``) counts any above-mean cell.
* Entropy ties (e.g. several single-blob heads at 0) go to the larger ``S_img``, then to the lower ``(layer, head)``.
* Final ties in vote count go to the lower ``(layer, head)``; heads with no vote are never selected.
* Each head's grid is normalised before smoothing so that every selected head weighs the same in the sum.
* The model identity stored with the heads is the checkpoint's ``name_or_path`` (``"tiny"`` for an in-memory model
  without one: the embedded test model), the number of layers and the number of heads. A file is accepted for a
  model with the same counts and the same name, or the same last path component (a local copy of a hub checkpoint).

CLI (:func:`discover`; ``--config FILE.yaml`` sets any flag)::

    klal discover-heads --model tiny --data data/grid_patch --num 1000 --out heads.json
    python -m klal.grounding.loc_heads --data "[data/grid_patch, data/refcoco]" --out heads.json
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from klal.geometry import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from klal.grounding.base import GroundingMethod, GroundingResult
from klal.grounding.ops import (
    cells_to_pixels,
    connected_components,
    elbow_threshold,
    footprint_of,
    gaussian_smooth,
    mask_to_box,
    normalize,
    spatial_entropy,
    spatial_entropy_count,
)
from klal.grounding.options import option
from klal.models.identity import model_name, same_name
from klal.session import GroundingError, GroundingModel, image_rows, sample_images

Head = tuple[int, int]
FORMAT = "klal.localization_heads/1"


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
        name, layers, heads = model_name(gm.model), gm.num_layers, gm.num_heads
        same = same_name(self.name_or_path, name) and (self.num_layers, self.num_heads) == (layers, heads)
        if not same:
            raise GroundingError(
                f"heads file {source}: made for model {self.name_or_path!r} ({self.num_layers} layers x "
                f"{self.num_heads} heads), but the model given is {name!r} ({layers} layers x {heads} heads)"
            )


# ------------------------------------------------------------------------------------------------------ discovery


def head_entropy(attention_grid: np.ndarray) -> float:
    """The authors' spatial entropy of one head's RAW attention over an image's tokens.

    ``attention_grid`` is the head's attention row over the image tokens as a ``(gh, gw)`` grid, not renormalised (it
    sums to the head's image-attention mass ``S_img``, not to 1). ``B = ReLU(A - mean(A))``; the 8-connected
    components of the cells with ``B > 0.001`` get ``p_i = sum_i B / sum_all B``; the entropy is
    ``-sum p_i log p_i`` (:func:`klal.grounding.ops.spatial_entropy`). It is ``inf`` when ``B`` sums to 0 and 0 when
    ``B`` is positive somewhere but no cell passes the floor; :func:`select_heads_for_sample` gives such a head no
    vote (the released code would rank it first, see docs/grounding.md).
    """
    return spatial_entropy(attention_grid, mean_scale=1.0, floor=1e-3)


def head_statistics(gm: GroundingModel, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: every head's image attention mass and raw map for the sample's first image.

    Returns:
        ``S_img`` ``(L, H)``: the last prompt token's attention mass on the image tokens, and ``maps``
        ``(L, H, gh, gw)``: that raw attention over the image tokens (each head's map sums to its ``S_img``).

    Raises:
        GroundingError: the sample has no image, or the model did not report every layer.
    """
    images = sample_images(sample)[:1]
    inputs = gm.inputs(images, sample["question"])
    request = gm.request(inputs, per_head=False, differentiable_rows=True)
    with torch.no_grad():
        gm.forward(inputs, request)
    layers = sorted(request.full_probs)
    if layers != list(gm.attention_layers):
        raise GroundingError(
            f"sample {sample.get('id')!r}: attention rows were captured for layers {layers}, expected the "
            f"{gm.num_layers} attention layers {gm.attention_layers}"
        )
    full = torch.stack([request.full_probs[layer][0, :, 0] for layer in layers]).float()  # (L, H, S)
    request.clear()
    visual = inputs["visual_mask"][0].to(full.device)
    on_image = full[..., visual]  # (L, H, V)
    s_img = on_image.sum(-1)
    # Image 0's map (on a family with several grids per image, merged onto its map grid).
    grid_maps = gm.split_grid(on_image.double(), inputs["layout"], inputs["image_wh"])[0]  # (L, H, gh, gw)
    return s_img.cpu().numpy().astype(np.float64), grid_maps.astype(np.float64)


def select_heads_for_sample(
    s_img: np.ndarray,
    maps: np.ndarray,
    top_k: int,
    mean_scale: float = 1.0,
    floor: float = 1e-3,
    normalise: bool = False,
) -> list[Head]:
    """The heads one image-text pair votes for.

    Heads with ``S_img`` at or above the elbow value of all heads' ``S_img`` are ranked by the spatial entropy of
    their map (:func:`head_entropy` with these ``mean_scale`` and ``floor``), lowest first, ties by larger ``S_img``
    then lower ``(layer, head)``. Heads whose map has no component above the floor (entropy 0 with no component, or
    ``inf``) get no vote. The first ``top_k`` are returned.

    Args:
        s_img: ``(L, H)`` image attention mass.
        maps: ``(L, H, gh, gw)`` per-head raw attention over the image.
        top_k: votes per pair.
        mean_scale: spatial-entropy mean multiple (1 in the original method, 2 in a later version).
        floor: spatial-entropy component floor, in the units of the maps (raw attention, or shares with
            ``normalise``).
        normalise: divide each map by its sum before the entropy (klal's earlier choice, which makes the floor mean
            the same for every head whatever its ``S_img``).
    """
    s_img = np.asarray(s_img, dtype=np.float64)
    maps = np.asarray(maps, dtype=np.float64)
    if s_img.ndim != 2 or maps.shape[:2] != s_img.shape or maps.ndim != 4:
        raise ValueError(f"s_img (L, H) and maps (L, H, gh, gw) do not match: {s_img.shape} vs {maps.shape}")
    threshold = elbow_threshold(s_img)
    ranked = []
    for layer, head in zip(*np.nonzero(s_img >= threshold)):
        grid = normalize(maps[layer, head]) if normalise else maps[layer, head]
        ent, n = spatial_entropy_count(grid, mean_scale=mean_scale, floor=floor)
        if n > 0:
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
    normalise: bool = False,
) -> HeadSelection:
    """Find the localization heads of ``gm`` by voting over image-text pairs (one forward pass each).

    Args:
        gm: the model.
        samples: dataset rows (``id``, ``image``, ``question``); may be a generator.
        top_k: heads voted for per pair, and heads kept in the end.
        mean_scale: spatial-entropy mean multiple.
        floor: spatial-entropy component floor (raw attention units; shares with ``normalise``).
        progress: show a tqdm progress bar.
        total: number of samples, for the progress bar.
        normalise: entropy of each head's map divided by its sum (klal's earlier choice) instead of the raw map.

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
        for layer, head in select_heads_for_sample(s_img, maps, top_k, mean_scale, floor, normalise):
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
    name, n_layers, n_heads = model_name(gm.model), gm.num_layers, gm.num_heads
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


class LocalizationHeads(GroundingMethod, name="localization_heads"):
    """Localization-heads grounding (one forward pass per sample once the heads are known).

    Raises:
        GroundingError: bad options, or an unreadable ``heads_file`` (naming it).
    """

    batched = True

    @dataclass(frozen=True)
    class Options:
        heads_file: str | None = None
        """JSON written by :meth:`HeadSelection.save` or the CLI; if None, :meth:`prepare` discovers heads."""
        top_k: int = option(5, ge=1)
        """Heads to discover (and voted for per pair)."""
        discover_samples: int = option(64, ge=1)
        """At most this many image rows of ``prepare``'s rows are used for discovery."""
        save_heads: str | None = None
        """Where :meth:`prepare` writes discovered heads (JSON); not allowed with ``heads_file``."""
        sigma: float = option(1.0, ge=0)
        """Smoothing (cells) of each head's grid before summing."""
        mean_scale: float = option(1.0, gt=0)
        """Spatial-entropy mean multiple used in discovery."""
        floor: float = option(1e-3, ge=0)
        """Spatial-entropy component floor used in discovery (the paper's 0.001, on raw attention)."""
        normalise: bool = False
        """Discovery: take each head's entropy on its map divided by its sum (klal's earlier choice) instead of on
        the raw attention row (the authors)."""

        def __post_init__(self) -> None:
            if self.heads_file and self.save_heads:
                raise ValueError(
                    "save_heads writes discovered heads, but heads_file already gives them; pass one of the two"
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        path = self.options.heads_file
        self.selection: HeadSelection | None = HeadSelection.load(path) if path else None

    def prepare(self, gm: GroundingModel, rows: Any) -> None:
        """Check the loaded heads against ``gm``, or discover heads on the first ``discover_samples`` image rows.

        Heads are a property of the model, not of a dataset: once loaded or discovered they are kept, and later
        calls (e.g. one per evaluated dataset) only check them against ``gm``.

        Raises:
            GroundingError: heads made for another model, or no image rows to discover on.
        """
        opts = self.options
        if self.selection is not None:
            self.selection.check_model(gm, source=opts.heads_file or "<heads>")
            return
        # Discovery votes over image-text pairs: the first discover_samples rows that have an image.
        kept, skipped = image_rows(rows, opts.discover_samples)
        # Index row by row: slicing a datasets.Dataset would give columns, not rows.
        pairs = [kept[i] for i in range(len(kept))]
        if not pairs:
            text = f" ({skipped} text-only row(s) passed over)" if skipped else ""
            raise GroundingError(f"localization_heads: no heads_file and no image rows to discover heads on{text}")
        self.selection = discover_heads(
            gm, pairs, top_k=opts.top_k, mean_scale=opts.mean_scale, floor=opts.floor, normalise=opts.normalise
        )
        if opts.save_heads:
            self.selection.save(opts.save_heads)

    def _ready(self, gm: GroundingModel, samples: Sequence[dict[str, Any]]) -> tuple[HeadSelection, list[int]]:
        """The checked head selection and the layers it reads, or GroundingError naming the first sample."""
        first = samples[0].get("id") if samples else None
        if self.selection is None:
            raise GroundingError(
                f"sample {first!r}: localization_heads has no heads; give heads_file or call prepare()"
            )
        self.selection.check_model(gm, source=self.options.heads_file or "<discovered heads>")
        return self.selection, sorted({layer for layer, _ in self.selection.heads})

    def ground_batch(self, gm: GroundingModel, samples: list[dict[str, Any]]) -> list[GroundingResult]:
        """Map several rows from one padded forward pass (:meth:`GroundingModel.batch_attention`)."""
        sel, layers = self._ready(gm, samples)
        return [
            self._result(gm, sel, layers, att, layout, sizes)
            for att, layout, sizes in gm.batch_attention(samples, "prompt_last", layers, per_head=True)
        ]

    def ground(self, gm: GroundingModel, sample: dict[str, Any], images: list[Any]) -> GroundingResult:
        """Map, mask and boxes of one row."""
        sel, layers = self._ready(gm, [sample])
        inputs = gm.inputs(images, sample["question"])
        att = gm.attention(inputs, layers=layers, per_head=True)  # (len(layers), H, V)
        return self._result(gm, sel, layers, att, inputs["layout"], inputs["image_wh"])

    def _result(
        self,
        gm: GroundingModel,
        sel: HeadSelection,
        layers: list[int],
        att: torch.Tensor,
        layout: list[list[tuple[int, int]]],
        sizes: list[tuple[int, int]],
    ) -> GroundingResult:
        """Map, mask and boxes from the heads' attention ``att`` ``(len(layers), H, V)`` of one sample."""
        rows = torch.stack([att[layers.index(layer), head] for layer, head in sel.heads])  # (K, V)
        per_image = gm.split_grid(rows, layout, sizes)  # [(K, gh, gw)]
        maps = [heads_map(g, self.options.sigma) for g in per_image]
        mask, ranked = map_boxes(maps[0])
        cells = footprint_of(gm, sizes[0])  # where map 0's cells are in image 0
        boxes = [cells_to_pixels(box, cells, sizes[0]) for box, _ in ranked]
        extras = {
            "heads": [list(h) for h in sel.heads],
            "mask": mask.astype(int).tolist(),
            "box_masses": [mass for _, mass in ranked],
        }
        return GroundingResult(maps=maps, boxes=boxes, answer=None, extras=extras)


def _positive_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GroundingError(f"localization_heads: {option} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------------------ CLI


def _rows(paths: Sequence[str], split: str) -> list[Any]:
    """The image rows of each dataset's ``split`` (:func:`klal.data.io.load_split`), text-only rows left out.

    Discovery needs image-text pairs; how many text-only rows were left out is printed to stderr.
    """
    from klal.data.io import load_split

    parts = []
    for path in paths:
        kept, skipped = image_rows(load_split(path, split))
        if skipped:
            print(f"loc_heads: {path} [{split}]: skipping {skipped} text-only row(s) (no image)", file=sys.stderr)
        parts.append(kept)
    return parts


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


def discover(
    *,
    data: str | list[str],
    out: str,
    model: str = "tiny",
    adapter: str | None = None,
    split: str = "train",
    num: int = 1000,
    top_k: int = 5,
    mean_scale: float = 1.0,
    floor: float = 1e-3,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> HeadSelection:
    """Discover the localization heads of a VLM and save them as JSON.

    Args:
        data: dataset directories (``save_to_disk``, klal schema): one path or a list.
        out: JSON file to write.
        model: ``tiny``, a hub id or a local checkpoint directory.
        adapter: peft adapter directory trained on ``model``.
        split: split to discover on (default train, to keep test data unseen).
        num: image-text pairs to use, taken round-robin over the datasets.
        top_k: heads voted for per pair and kept in the end.
        mean_scale: spatial entropy: ``B = ReLU(A - mean_scale * mean A)``.
        floor: spatial entropy: components of ``B > floor``.
        min_pixels: processor lower bound on an image's resized area.
        max_pixels: processor upper bound on an image's resized area.

    Returns:
        The selection written to ``out``.

    Raises:
        ValueError: ``num`` or ``top_k`` below 1, a missing split, or no image rows (naming the option or dataset).
    """
    from klal.models.loader import ModelConfig

    for option_name, value in (("num", num), ("top_k", top_k)):
        if value < 1:
            raise ValueError(f"--{option_name} must be >= 1, got {value}")
    paths = [data] if isinstance(data, str) else list(data)
    parts = _rows(paths, split)
    total = min(num, sum(len(p) for p in parts))
    if total == 0:
        raise ValueError(f"the {split!r} split of {paths} has no rows with an image")
    gm = GroundingModel.load(ModelConfig(name_or_path=model, min_pixels=min_pixels, max_pixels=max_pixels), adapter)
    sel = discover_heads(
        gm,
        _interleave(parts, total),
        top_k=top_k,
        mean_scale=mean_scale,
        floor=floor,
        progress=True,
        total=total,
    )
    sel.save(out)
    heads = ", ".join(f"L{layer}H{head} ({n})" for (layer, head), n in zip(sel.heads, sel.frequencies))
    print(f"{sel.num_samples} samples -> heads (votes): {heads}; written to {out}")
    return sel


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> HeadSelection:
    """``klal discover-heads`` / ``python -m klal.grounding.loc_heads``: :func:`discover` from the command line."""
    from klal.cli import run

    return run(discover, argv, prog or "python -m klal.grounding.loc_heads")


__all__ = [
    "HeadSelection",
    "LocalizationHeads",
    "discover",
    "discover_heads",
    "head_statistics",
    "heads_map",
    "main",
    "map_boxes",
    "select_heads_for_sample",
]


if __name__ == "__main__":
    main()
