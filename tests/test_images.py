"""klal.data.images: every PIL mode read by what its pixels mean, undecoded images named, the declared size checked."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from klal.data.images import ImageReadError, check_declared_size, to_rgb

GREY = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20  # 0..220


def stored(im: Image.Image, fmt: str = "PNG") -> dict:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return {"bytes": buf.getvalue(), "path": None}


def rgb(im) -> np.ndarray:
    out = to_rgb(im, "s1")
    assert out.mode == "RGB"
    return np.asarray(out)


def test_sixteen_bit_png_keeps_its_brightness():
    im16 = Image.open(io.BytesIO(stored(Image.fromarray(GREY.astype(np.uint16) * 257))["bytes"]))
    assert im16.mode == "I;16"
    assert (np.asarray(im16.convert("RGB")) == 255).mean() > 0.9  # what PIL's convert did: almost all white
    out = rgb(im16)
    assert np.array_equal(out[..., 0], GREY) and np.array_equal(out[..., 1], GREY)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_int32_and_float_images_use_their_own_range(mode):
    values = np.array([[-5.0, 0.0], [5.0, 15.0]])
    im = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    assert np.array_equal(rgb(im)[..., 2], np.array([[0, 64], [128, 255]], dtype=np.uint8))
    assert np.array_equal(rgb(Image.fromarray(np.full((2, 2), 7, np.int32), mode="I")), np.zeros((2, 2, 3)))


def test_non_finite_float_image_is_refused():
    im = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), mode="F")
    with pytest.raises(ImageReadError, match=r"sample 's1'.*NaN or infinite"):
        to_rgb(im, "s1")


@pytest.mark.parametrize("mode", ["LA", "RGBA", "PA"])
def test_transparent_pixels_are_white(mode):
    base = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    base.putpixel((1, 0), (0, 0, 0, 0))
    im = base.convert(mode) if mode != "PA" else base.convert("RGB").convert("P").convert("PA")
    if mode == "PA":
        im.putpixel((1, 0), (im.getpixel((1, 0))[0], 0))
    out = rgb(im)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) != (255, 255, 255)


def test_palette_with_transparency_key_is_composited():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    assert [tuple(p) for p in rgb(im)[0]] == [(255, 255, 255), (200, 100, 50)]


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV"])
def test_modes_pil_converts_exactly(mode):
    src = Image.fromarray(np.stack([GREY, GREY, GREY], -1))
    im = src.convert(mode)
    assert np.array_equal(rgb(im), np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("mode", ["LAB", "La"])
def test_other_modes_are_refused_naming_the_sample(mode):
    im = Image.new(mode, (2, 2)) if mode == "LAB" else Image.frombytes("La", (2, 2), b"\0" * 8)
    with pytest.raises(ImageReadError, match=rf"sample 's1': image mode '{mode}' is not supported"):
        to_rgb(im, "s1")
    with pytest.raises(ImageReadError, match=r"^data \[train\]: sample 's1' \(row 3\): image mode"):
        to_rgb(im, "s1", where="data [train]: sample 's1' (row 3)")


def test_undecoded_images_decode_and_a_damaged_one_is_named():
    assert np.array_equal(rgb(stored(Image.fromarray(GREY))), np.stack([GREY] * 3, -1))
    with pytest.raises(ImageReadError, match=r"sample 's1': cannot decode the image in its stored bytes: Unidentified"):
        to_rgb({"bytes": b"\x89PNG\r\n\x1a\nnot an image", "path": None}, "s1")
    with pytest.raises(ImageReadError, match=r"sample 's1': cannot decode the image in file /no/such.png"):
        to_rgb({"bytes": None, "path": "/no/such.png"}, "s1")
    with pytest.raises(TypeError, match="sample 's1'"):
        to_rgb(3, "s1")


def test_declared_size_must_match_the_image():
    im = Image.new("RGB", (224, 224))
    check_declared_size({"width": 224, "height": 224}, im, "x")
    check_declared_size({"id": "no columns"}, im, "x")
    with pytest.raises(ValueError, match=r"^d \[train\]: sample 'a' \(row 0\): .* say 448 x 100 but its image is 224"):
        check_declared_size({"width": 448, "height": 100}, im, "d [train]: sample 'a' (row 0)")
    with pytest.raises(ValueError, match=r"declares width x height 0 x 0"):
        check_declared_size({"width": 0, "height": 0}, im, "x")
