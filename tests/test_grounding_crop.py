"""Crops: outward rounding to whole pixels, clipping, and the zoom to the original image's area."""

from __future__ import annotations

import numpy as np
from PIL import Image

from klal.grounding.crop import crop_image, whole_pixel_box


def test_crop_image_rounds_outward_and_clips():
    img = Image.new("RGB", (100, 80))
    assert crop_image(img, (10.4, 5.6, 20.2, 30.0)).size == (11, 25)
    assert crop_image(img, (-5.0, 70.0, 120.0, 90.0)).size == (100, 10)
    assert whole_pixel_box(img, (-5.0, 70.0, 120.0, 90.0)) == (0, 70, 100, 80)
    # A box outside the image still gives a 1 px crop at the nearest edge.
    assert whole_pixel_box(img, (150.0, 90.0, 160.0, 95.0)) == (99, 79, 100, 80)


def test_crop_image_zoom():
    image = Image.fromarray(np.arange(100 * 80 * 3, dtype=np.uint32).reshape(80, 100, 3).astype(np.uint8))
    box = whole_pixel_box(image, (10.4, 20.0, 59.6, 60.0))
    assert box == (10, 20, 60, 60)
    crop = crop_image(image, (10.4, 20.0, 59.6, 60.0), zoom=False)
    assert crop.size == (50, 40)
    assert np.array_equal(np.array(crop), np.array(image)[20:60, 10:60])
    zoomed = crop_image(image, (10.0, 20.0, 60.0, 60.0), zoom=True)
    assert zoomed.size == (100, 80)  # area of the original, aspect of the crop
    whole = crop_image(image, (0, 0, 100, 80), zoom=True)
    assert whole.size == (100, 80)  # never downscaled
