"""One conversion of a dataset row's image to the RGB PIL image the processor reads, for training and evaluation.

Both the collator (:class:`klal.data.collate.KLALCollator`) and the model session's row helpers
(:func:`klal.session.sample_images`) call :func:`to_rgb`, so an image is read the same way wherever it is used.

Every PIL mode is converted by what its pixels mean, never by PIL's plain ``convert("RGB")`` where that is wrong:

* ``RGB`` is used as it is; ``L``, ``1``, ``P`` (without transparency), ``RGBX``, ``CMYK``, ``YCbCr`` and ``HSV``
  through PIL's conversion, which is exact for them.
* Modes with an alpha channel (``LA``, ``PA``, ``RGBA``, ``RGBa``, and ``L`` / ``P`` / ``RGB`` with a transparency
  key) are composited over white, as transformers' ``convert_to_rgb`` does: a transparent background reads as
  paper, not as the black its hidden colour values often hold.
* 16-bit greyscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``; 16-bit PNG and TIFF) is scaled by the format's range,
  ``v * 255 / 65535``, so a dark image stays dark. PIL's own conversion clips these values at 255, which turned a
  16-bit picture almost entirely white.
* 32-bit integer (``I``) and float (``F``) images have no fixed range: they are scaled by the image's own range,
  its minimum to 0 and its maximum to 255 (a constant image becomes black). NaN or infinite values are refused.
* Any other mode (``LAB``, which PIL cannot convert colorimetrically, ``La``, multi-band float modes) is refused with
  the sample named.

An undecoded image (``{"bytes", "path"}``, a ``datasets.Image(decode=False)`` column) is decoded here, as
``datasets.Image`` decodes it: bytes first, then the EXIF orientation applied (:func:`upright`), so a photo stored
sideways with an orientation tag gives the same pixels, size and target map in a decoded and an undecoded column. One
that cannot be decoded is an :class:`ImageReadError` naming the sample and the file (or "its stored bytes").
Wherever klal reads only an image's header for its size (the converters), :func:`upright_size` gives the size after
that orientation.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
from PIL import Image, ImageOps

DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises on data it cannot decode: ``UnidentifiedImageError`` and "image file is truncated" (OSError),
broken PNG chunks (SyntaxError), bad header values (ValueError), images over the decompression-bomb limit."""

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
"""16-bit greyscale modes, scaled by 255 / 65535."""
RANGE_MODES = ("I", "F")
"""32-bit integer and float greyscale modes, scaled by the image's own range."""
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
"""Modes with an alpha channel, composited over white."""
DIRECT_MODES = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV")
"""Modes PIL converts to RGB exactly."""


class ImageReadError(ValueError):
    """An image that cannot be decoded or converted to RGB; the message names the sample (and the file)."""


def is_stored_image(value: Any) -> bool:
    """Whether ``value`` is an undecoded image as ``datasets.Image(decode=False)`` gives it: ``{"bytes", "path"}``."""
    return isinstance(value, dict) and ("bytes" in value or "path" in value)


ORIENTATION_TAG = 0x0112
"""The EXIF tag that says how a stored image is to be turned for display (values 1-8)."""
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
"""Orientations that transpose the image: its displayed width is its stored height."""


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says, as ``datasets.Image`` does when it decodes (an image without the tag
    is returned as it is)."""
    if im.getexif().get(ORIENTATION_TAG) is None:
        return im
    return ImageOps.exif_transpose(im)


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of ``im`` (opened, not necessarily decoded) after :func:`upright`, read from the header."""
    width, height = im.size
    return (height, width) if im.getexif().get(ORIENTATION_TAG) in SWAPPING_ORIENTATIONS else (width, height)


def decode_stored(value: dict[str, Any]) -> Image.Image:
    """Decode an undecoded image ``{"bytes", "path"}`` completely and turn it upright, as ``datasets.Image`` does
    (bytes first, then the EXIF orientation); PIL's errors (:data:`DECODE_ERRORS`) pass through for the caller to name
    the sample."""
    data, path = value.get("bytes"), value.get("path")
    im = Image.open(io.BytesIO(data)) if data else Image.open(path)
    im.load()
    return upright(im)


def decode_message(error: BaseException) -> str:
    """``Type: message`` of a decoding error, without the ``<_io.BytesIO object at 0x...>`` PIL puts in it."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(stored bytes)", str(error))
    return f"{type(error).__name__}: {text}"


def open_image(value: dict[str, Any], sample_id: str) -> Image.Image:
    """:func:`decode_stored`, with a failure named.

    Raises:
        ImageReadError: the data is not an image PIL can decode, naming the sample and the file or "stored bytes".
    """
    data, path = value.get("bytes"), value.get("path")
    source = f"file {path}" if not data and path else "its stored bytes" + (f" ({path})" if path else "")
    try:
        im = decode_stored(value)
    except DECODE_ERRORS as e:
        message = f"sample {sample_id!r}: cannot decode the image in {source}: {decode_message(e)}"
        raise ImageReadError(message) from None
    return im


def _scaled_to_l(arr: np.ndarray, lo: float, hi: float) -> Image.Image:
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _over_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Any, sample_id: str, where: str | None = None) -> Image.Image:
    """The image ``im`` (a PIL image, or an undecoded ``datasets.Image`` dict with ``bytes`` or ``path``) as RGB,
    converted by its mode as the module docstring describes.

    Args:
        im: the image.
        sample_id: the row's id, named in errors.
        where: how errors name the row instead (``PATH [SPLIT]: sample 'ID' (row N)``, :func:`klal.data.io.row_name`).

    Raises:
        TypeError: ``im`` is neither a PIL image nor an undecoded image dict (naming the sample).
        ImageReadError: an undecoded image that does not decode, a mode that cannot be converted, or a float image
            with NaN or infinite values (naming the sample).
    """
    name = where or f"sample {sample_id!r}"
    if is_stored_image(im):
        im = open_image(im, sample_id)
    if not isinstance(im, Image.Image):
        raise TypeError(f"{name}: image must be a PIL image (datasets Image column), got {type(im)}")
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in SIXTEEN_BIT_MODES:
        return _scaled_to_l(np.asarray(im).astype(np.float64), 0.0, 65535.0).convert("RGB")
    if mode in RANGE_MODES:
        arr = np.asarray(im).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ImageReadError(f"{name}: its {mode}-mode image holds NaN or infinite values")
        return _scaled_to_l(arr, float(arr.min()), float(arr.max())).convert("RGB")
    if mode in ALPHA_MODES or (mode in ("L", "P", "RGB") and "transparency" in im.info):
        return _over_white(im)
    if mode in DIRECT_MODES:
        return im.convert("RGB")
    raise ImageReadError(
        f"{name}: image mode {mode!r} is not supported (klal reads 1, L, LA, P, PA, RGB, RGBA, RGBX, "
        "CMYK, YCbCr, HSV, 16-bit I;16 and 32-bit I / F greyscale); convert the image to RGB before storing it"
    )


def check_declared_size(row: dict[str, Any], image: Image.Image, where: str) -> None:
    """Refuse a row whose ``width`` / ``height`` columns disagree with its decoded image.

    Evidence is in pixels of the image the columns describe; when the stored image has another size the target maps
    would be built at the wrong place, silently. Text-only rows (no image) and rows without the columns are not
    checked, nor rows with several images (the columns cannot describe each).

    Args:
        row: a schema row with a single decoded image.
        image: that image.
        where: how to name the row, e.g. ``"data/x [train]: sample 'q1' (row 4)"``.

    Raises:
        ValueError: naming the row, the declared and the decoded size (a declared 0 x 0 says the row is text-only).
    """
    if "width" not in row or "height" not in row or row["width"] is None or row["height"] is None:
        return
    declared = (int(row["width"]), int(row["height"]))
    if declared == image.size:
        return
    if declared == (0, 0):
        raise ValueError(
            f"{where}: declares width x height 0 x 0 (a text-only sample) but has a {image.width} x {image.height} "
            "image; store the image's size in the width/height columns"
        )
    raise ValueError(
        f"{where}: its width/height columns say {declared[0]} x {declared[1]} but its image is {image.width} x "
        f"{image.height}; evidence is read in the declared pixels, so store the image at that size or the size of "
        "the stored image in the columns (and its evidence in that image's pixels)"
    )


__all__ = [
    "ALPHA_MODES",
    "DECODE_ERRORS",
    "DIRECT_MODES",
    "ImageReadError",
    "ORIENTATION_TAG",
    "RANGE_MODES",
    "SIXTEEN_BIT_MODES",
    "SWAPPING_ORIENTATIONS",
    "check_declared_size",
    "decode_message",
    "decode_stored",
    "is_stored_image",
    "open_image",
    "to_rgb",
    "upright",
    "upright_size",
]
