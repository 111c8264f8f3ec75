"""Helpers shared by the tile-major families' real-geometry replicas (tests/test_smolvlm.py, tests/test_internvl.py).

A replica forces the tower's patch embedding to output each patch's own row, column, their squares and the index of
the view (tile or global) it belongs to (:func:`coordinate_features`), and replaces whatever follows the pixel shuffle
by a projection that averages each of those channels over the patches a token folds in; what the model then scatters
at each image-token position names the view and the patch block that token holds (:func:`token_patches`).
"""

from __future__ import annotations

import numpy as np
import torch


def coordinate_features(_module, _args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook for the patch embedding's conv: ``(views, D, n, n)`` -> row, column, their squares and the view
    index in channels 0-4 (the conv's own spatial layout names each patch)."""
    n = out.shape[-1]
    r, c = torch.meshgrid(torch.arange(n, dtype=out.dtype), torch.arange(n, dtype=out.dtype), indexing="ij")
    feat = torch.zeros_like(out)
    feat[:, 0], feat[:, 1], feat[:, 2], feat[:, 3] = r, c, r * r, c * c
    feat[:, 4] = torch.arange(out.shape[0], dtype=out.dtype)[:, None, None]
    return feat


def averaging_projection(weight: torch.Tensor, d: int, blocks: int) -> None:
    """Set a ``(out, blocks * d)`` projection weight so output channel ``k < 5`` is the mean of input channel ``k``
    over the ``blocks`` patches a shuffled token concatenates."""
    with torch.no_grad():
        weight.zero_()
        for k in range(5):
            for b in range(blocks):
                weight[k, b * d + k] = 1.0 / blocks


def token_patches(family, model, image_token_id: int, batch) -> np.ndarray:
    """``(V, 5)`` per image token in sequence order: ``(view, r0, c0, r1, c1)``, the view it came from and the patch
    rows / columns ``[r0, r1)`` x ``[c0, c1)`` it folds in, from what the model scattered at that position."""
    seen = {}

    def grab(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = family.language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**{k: batch[k] for k in family.input_keys if k in batch})
    finally:
        handle.remove()
    cells = batch["input_ids"][0] == image_token_id
    f = seen["embeds"][0, cells, :5].double()  # (V, 5): mean r, mean c, mean r^2, mean c^2, view
    mr, mc = f[:, 0], f[:, 1]
    # k consecutive patches have variance (k^2 - 1) / 12 along that axis.
    kr, kc = (12 * (f[:, 2] - mr**2) + 1).sqrt(), (12 * (f[:, 3] - mc**2) + 1).sqrt()
    out = torch.stack([f[:, 4], mr - (kr - 1) / 2, mc - (kc - 1) / 2, mr + (kr + 1) / 2, mc + (kc + 1) / 2], 1)
    return out.numpy()


def reference_target(ref: np.ndarray, views: np.ndarray, box: list[float]) -> np.ndarray:
    """The area-mode box target over the tokens: the box area inside each token's footprint ``ref`` (``(V, 4)``
    ``x0, y0, x1, y1`` in original pixels), with the families' policy that every view the box leaves mass on gets an
    equal share."""
    ov = np.clip(np.minimum(ref[:, 2], box[2]) - np.maximum(ref[:, 0], box[0]), 0, None) * np.clip(
        np.minimum(ref[:, 3], box[3]) - np.maximum(ref[:, 1], box[1]), 0, None
    )
    hit = [v for v in np.unique(views) if ov[views == v].sum() > 0]
    want = np.zeros(len(ov))
    for v in hit:
        want[views == v] = ov[views == v] / ov[views == v].sum() / len(hit)
    return want


def box_for(w: int, h: int) -> list[float]:
    """The evidence box of an image: a corner box on 1000 x 300 (the first tile only), else an off-centre box."""
    if (w, h) == (1000, 300):
        return [0.0, 0.0, 130.0, 70.0]
    return [0.23 * w, 0.31 * h, 0.61 * w, 0.77 * h]


def noise_row(w: int, h: int, box: list[float]) -> dict:
    """A schema row with a noise image and one evidence box."""
    from PIL import Image

    return {
        "id": f"{w}x{h}",
        "image": Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8")),
        "question": "Where is it?",
        "answer": "here",
        "evidence": {"boxes": [box], "points": [], "polylines": []},
    }
