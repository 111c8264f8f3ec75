"""Cutting a crop out of an image, for every method that zooms (EGG, ViCrop, LASER): one rounding rule, one zoom.

A crop box in original pixels is widened to whole pixels (left and top edges rounded down, right and bottom up),
clipped to the image and kept at least one pixel wide and tall (:func:`whole_pixel_box`). With ``zoom`` the crop is
then upscaled to the original image's area (:func:`upscale_to_area`), the analogue of resizing a crop to a fixed-size
encoder's input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image


def whole_pixel_box(image: Image.Image, box_px: Sequence[float]) -> tuple[int, int, int, int]:
    """``box_px`` rounded outward to whole pixels and clipped to the image, at least 1 px per side."""
    x0, y0, x1, y1 = box_px
    left = min(max(math.floor(x0), 0), image.width - 1)
    top = min(max(math.floor(y0), 0), image.height - 1)
    right = max(min(math.ceil(x1), image.width), left + 1)
    bottom = max(min(math.ceil(y1), image.height), top + 1)
    return left, top, right, bottom


def upscale_to_area(crop: Image.Image, area: float) -> Image.Image:
    """``crop`` resized (bicubic, aspect kept) to about ``area`` pixels; never downscaled.

    This is the zoom: Qwen2.5-VL encodes an image at (about) its own resolution, so a crop encoded as it is gets few
    visual tokens and shows no more detail than the original. Upscaled to the original image's area, the processor
    gives it the original's token budget (its processed area; ``max_pixels`` still bounds it).
    """
    factor = math.sqrt(float(area) / (crop.width * crop.height))
    if factor <= 1:
        return crop
    size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
    return crop.resize(size, Image.Resampling.BICUBIC)


def crop_image(image: Image.Image, box_px: Sequence[float], zoom: bool = False) -> Image.Image:
    """Cut :func:`whole_pixel_box` of ``box_px`` out of ``image``; with ``zoom``, upscale it to the image's area."""
    crop = image.crop(whole_pixel_box(image, box_px))
    return upscale_to_area(crop, image.width * image.height) if zoom else crop


__all__ = ["crop_image", "upscale_to_area", "whole_pixel_box"]
