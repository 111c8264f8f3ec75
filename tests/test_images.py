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


# -- EXIF orientation: one decode, as datasets decodes --------------------------------------------------------------

# The upright image is 112 x 168 (4 x 6 tokens of 28 px); the object, red, fills tokens (rows 1-2, columns 0-1), a
# place no flip or turn maps onto itself. Each orientation stores the pixels turned the other way with the tag that
# turns them back (PIL's own table, ImageOps.exif_transpose).
UPRIGHT_W, UPRIGHT_H, OBJECT_BOX = 112, 168, [0.0, 28.0, 56.0, 84.0]
UNDO = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # orientation 6 is undone by ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # orientation 8 is undone by ROTATE_90
}


def oriented_jpeg(orientation: int) -> bytes:
    upright = np.full((UPRIGHT_H, UPRIGHT_W, 3), 235, np.uint8)
    x0, y0, x1, y1 = map(int, OBJECT_BOX)
    upright[y0:y1, x0:x1] = (220, 20, 20)
    im = Image.fromarray(upright)
    if UNDO[orientation] is not None:
        im = im.transpose(UNDO[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def exif_dataset(tmp_path_factory):
    """One split, a row per EXIF orientation 1-8 declaring the upright size; saved once with the image column decoded
    and once undecoded (``datasets.Image(decode=False)``, the original bytes)."""
    import datasets

    from klal.data.schema import FEATURES

    rows = [
        {
            "id": f"exif-{o}",
            "task": "test",
            "image": {"bytes": oriented_jpeg(o), "path": None},
            "question": "Where is the red square?",
            "answer": "left",
            "width": UPRIGHT_W,
            "height": UPRIGHT_H,
            "evidence": {"boxes": [OBJECT_BOX], "points": [], "polylines": []},
            "meta": "{}",
        }
        for o in range(1, 9)
    ]
    ds = datasets.Dataset.from_list(rows, features=FEATURES)
    out = {}
    for kind, column in (("decoded", ds), ("undecoded", ds.cast_column("image", datasets.Image(decode=False)))):
        out[kind] = str(tmp_path_factory.mktemp(kind) / "ds")
        datasets.DatasetDict({"train": column}).save_to_disk(out[kind])
    return out


def test_exif_orientation_header_size_is_the_upright_size():
    from klal.data.images import upright_size

    for o in range(1, 9):
        with Image.open(io.BytesIO(oriented_jpeg(o))) as im:
            assert upright_size(im) == (UPRIGHT_W, UPRIGHT_H), o


@pytest.mark.parametrize("kind", ["decoded", "undecoded"])
def test_exif_orientation_map_lies_on_the_object_the_model_sees(kind, exif_dataset, tiny_processor):
    """For each orientation the collated target map puts its mass on the red object in the image the collator feeds
    the processor, and the decoded and undecoded columns give the same pixels (what datasets' decoding gives)."""
    import datasets

    from klal.data.collate import KLALCollator
    from klal.data.io import load_split, read_row

    ds = load_split(exif_dataset[kind], "train")
    assert isinstance(ds.features["image"], datasets.Image) and ds.features["image"].decode == (kind == "decoded")
    reference = datasets.load_from_disk(exif_dataset["decoded"])["train"]  # datasets' own decoding
    rows = [read_row(ds, i, exif_dataset[kind]) for i in range(len(ds))]
    batch = KLALCollator(tiny_processor)(rows)
    for i, row in enumerate(rows):
        fed = np.asarray(row["image"].convert("RGB"), dtype=np.float64)
        np.testing.assert_array_equal(fed, np.asarray(reference[i]["image"].convert("RGB"), dtype=np.float64))
        assert batch["grids"][i] == [(6, 4)]
        # Per token, whether the fed image is red there (independent of the evidence and of klal's map).
        red = (fed[..., 0] > 150) & (fed[..., 1] < 100)
        on_object = red.reshape(6, 28, 4, 28).mean(axis=(1, 3)) > 0.5  # (6, 4)
        assert on_object.sum() == 4, row["id"]
        target = batch["target"][i, :24].reshape(6, 4).numpy()
        mass = float(target[on_object].sum() / target.sum())
        assert mass > 0.99, f"{row['id']}: {mass:.3f} of the map on the object"
