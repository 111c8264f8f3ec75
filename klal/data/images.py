"""One conversion of a dataset row's image to the RGB PIL image the processor reads, for training and evaluation.

Both the collator (:class:`klal.data.collate.KLALCollator`) and the model session's row helpers
(:func:`klal.session.sample_images`) call :func:`to_rgb`, so an image is read the same way wherever it is used.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def to_rgb(im: Any, sample_id: str) -> Image.Image:
    """The image ``im`` (a PIL image, or an undecoded ``datasets.Image`` dict with ``bytes`` or ``path``) as RGB.

    Raises:
        TypeError: ``im`` is neither a PIL image nor an undecoded image dict (naming the sample).
    """
    if isinstance(im, dict) and ("bytes" in im or "path" in im):
        im = Image.open(io.BytesIO(im["bytes"])) if im.get("bytes") else Image.open(im["path"])
    if not isinstance(im, Image.Image):
        raise TypeError(f"sample {sample_id!r}: image must be a PIL image (datasets Image column), got {type(im)}")
    return im.convert("RGB") if im.mode != "RGB" else im
