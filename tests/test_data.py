import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lavp_core.data import PHOTO_TRAIN_FRACTION, PHOTO_VAL_FRACTION, _photos_crops, load_dataset, load_image
from lavp_core.errors import ConfigError, DatasetError, ImageError


def test_photos_shape_classes_and_balance(photos_val):
    assert len(photos_val) >= 100
    assert photos_val.info.num_classes >= 8
    x, y = photos_val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    first100 = [photos_val.label(i) for i in range(100)]
    counts = np.bincount(first100, minlength=photos_val.info.num_classes)
    assert counts.min() == counts.max() == 100 // photos_val.info.num_classes


def test_photos_are_deterministic(photos_val):
    before = photos_val.batch(range(len(photos_val)))[0].clone()
    _photos_crops.cache_clear()
    again = load_dataset("photos", "val")
    assert torch.equal(again.batch(range(len(again)))[0], before)


def test_photos_train_and_val_come_from_disjoint_regions():
    from lavp_core.data import _photo_array

    heights = {}
    for split, lo, hi in (("train", 0.0, PHOTO_TRAIN_FRACTION), ("val", 1 - PHOTO_VAL_FRACTION, 1.0)):
        ds = load_dataset("photos", split)
        for i in range(len(ds)):
            name, scale, top, bottom = re.match(r"(\w+) at scale (\d+), rows (\d+)-(\d+)",
                                                ds._descriptions[i]).groups()
            if name not in heights:
                heights[name] = _photo_array(name).shape[:2]
            h, w = heights[name]
            height = max(32, round(h * int(scale) / min(h, w)))  # the scaled photo's height
            assert lo - 1e-9 <= int(top) / height and int(bottom) / height <= hi + 1e-9, ds._descriptions[i]
    assert PHOTO_TRAIN_FRACTION < 1 - PHOTO_VAL_FRACTION


def test_faces_are_model_ready():
    faces = load_dataset("faces", "val")
    x, y = faces[0]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated
    assert {faces.label(i) for i in range(len(faces))} == {0, 1}
    assert faces.info.class_names == ("face", "non-face")


def test_normalise_round_trip(photos_val):
    x, _ = photos_val[4]
    info = photos_val.info
    back = info.denormalize(info.normalize(x))
    assert torch.allclose(back, x, atol=1e-6)
    lo, hi = info.bounds()
    assert torch.allclose(info.denormalize(lo, clamp=False).flatten(), torch.zeros(3), atol=1e-6)
    assert torch.allclose(info.denormalize(hi, clamp=False).flatten(), torch.ones(3), atol=1e-6)


def test_cifar_missing_root_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError, match="--download") as err:
        load_dataset("cifar10", root=tmp_path)
    assert "cifar-10-batches-py" in str(err.value)
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset("cifar100")


def test_unknown_dataset_and_index():
    with pytest.raises(ConfigError, match="photos"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="out of range"):
        load_dataset("photos")[10_000]


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_resizes_and_centre_crops(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            rgb = np.zeros((40, 80, 3), np.uint8)
            rgb[:, 20:60] = 200  # centre band: survives the centre crop
            Image.fromarray(rgb).save(tmp_path / cls / f"{k}.png")
    ds = load_dataset("imagefolder", root=tmp_path, resolution=32)
    assert len(ds) == 4 and ds.info.class_names == ("cat", "dog")
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and y == 1
    assert float(x.min()) > 0.7  # only the bright centre remains after centre-cropping 64x32 -> 32x32


def test_imagefolder_empty_or_missing(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", root=tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset("imagefolder", root=tmp_path)


def test_load_image_from_bytes_and_path(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    x = load_image(_png_bytes(rgba, "RGBA"), size=8)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[0], torch.ones(8, 8)) and torch.allclose(x[1], torch.zeros(8, 8))
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(path)
    g = load_image(path, size=16)
    assert torch.allclose(g, torch.full((3, 16, 16), 128 / 255))


def test_load_image_rejects_non_images_and_odd_channels(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(text)
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"\x00\x01garbage")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    wide = Image.fromarray(np.full((4, 4), 70_000, np.int32))  # mode I beyond 16 bits: no known white
    with pytest.raises(ImageError, match="no known white level"):
        load_image(_encoded(wide, "TIFF"), size=4)
    bright = Image.fromarray(np.full((4, 4), 2.0, np.float32))
    with pytest.raises(ImageError, match=r"values in \[0, 1\]"):
        load_image(_encoded(bright, "TIFF"), size=4)
    nan = Image.fromarray(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ImageError, match="NaN"):
        load_image(_encoded(nan, "TIFF"), size=4)


# ---- every mode Pillow reads, against a decoding written here ---------------------------------------


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _png16(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (so no Pillow code produced it): ``values`` (H, W[, bands]) uint16,
    colour type 0 (grey), 4 (grey + alpha), 2 (RGB) or 6 (RGBA)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = values.shape[:2]
    rows = values.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _ramp(shape, high: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high + 1, size=shape)


def _on_white(colour: np.ndarray, alpha: np.ndarray, white: float) -> np.ndarray:
    """Reference compositing in float64: c·a + 1·(1 − a), everything in [0, 1]."""
    a = alpha[..., None] / white
    return colour / white * a + (1.0 - a)


S = 6  # images are S x S, so load_image(size=S) neither resizes nor crops: values compare one to one


def _case_1():
    bits = _ramp((S, S), 1).astype(bool)
    return _encoded(Image.fromarray(bits), "PNG"), np.repeat(bits[..., None].astype(float), 3, 2), 0


def _case_L():
    grey = _ramp((S, S), 255).astype(np.uint8)
    return _encoded(Image.fromarray(grey), "PNG"), np.repeat(grey[..., None] / 255.0, 3, 2), 0


def _case_LA():
    grey, alpha = _ramp((S, S), 255, 1).astype(np.uint8), _ramp((S, S), 255, 2).astype(np.uint8)
    image = Image.fromarray(np.stack([grey, alpha], 2), "LA")
    expected = _on_white(grey[..., None].astype(float), alpha.astype(float), 255.0)
    return _encoded(image, "PNG"), np.repeat(expected, 3, 2), 0.5 / 255


def _case_P():
    palette = _ramp((16, 3), 255, 3).astype(np.uint8)
    index = _ramp((S, S), 15, 4).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.flatten().tolist())
    return _encoded(image, "PNG"), palette[index] / 255.0, 0


def _case_P_transparent():
    palette = _ramp((16, 3), 255, 5).astype(np.uint8)
    index = _ramp((S, S), 15, 6).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.flatten().tolist())
    expected = palette[index] / 255.0
    expected[index == 3] = 1.0  # colour 3 is transparent: white shows through
    return _encoded(image, "PNG", transparency=3), expected, 0


def _case_GIF():
    palette = _ramp((16, 3), 255, 7).astype(np.uint8)
    index = _ramp((S, S), 15, 8).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.flatten().tolist())
    return _encoded(image, "GIF"), palette[index] / 255.0, 0


def _case_RGB():
    rgb = _ramp((S, S, 3), 255, 9).astype(np.uint8)
    return _encoded(Image.fromarray(rgb), "PNG"), rgb / 255.0, 0


def _case_BMP():
    rgb = _ramp((S, S, 3), 255, 10).astype(np.uint8)
    return _encoded(Image.fromarray(rgb), "BMP"), rgb / 255.0, 0


def _case_WEBP():
    rgb = _ramp((S, S, 3), 255, 11).astype(np.uint8)
    return _encoded(Image.fromarray(rgb), "WEBP", lossless=True), rgb / 255.0, 0


def _case_RGBA():
    rgba = _ramp((S, S, 4), 255, 12).astype(np.uint8)
    expected = _on_white(rgba[..., :3].astype(float), rgba[..., 3].astype(float), 255.0)
    return _encoded(Image.fromarray(rgba, "RGBA"), "PNG"), expected, 0.5 / 255


def _case_CMYK():
    cmyk = _ramp((S, S, 4), 255, 13).astype(np.uint8).astype(float)
    expected = (1 - cmyk[..., :3] / 255) * (1 - cmyk[..., 3:] / 255)  # the usual ink-to-light formula
    image = Image.fromarray(cmyk.astype(np.uint8), "CMYK")
    return _encoded(image, "TIFF"), expected, 0.5 / 255


def _case_I16():
    grey = _ramp((S, S), 65535, 14).astype(np.uint16)
    return _encoded(Image.fromarray(grey), "PNG"), np.repeat(grey[..., None] / 65535.0, 3, 2), 1e-6


def _case_I16B():
    grey = _ramp((S, S), 65535, 15).astype(np.uint16)
    image = Image.frombytes("I;16B", (S, S), grey.astype(">u2").tobytes())
    return _encoded(image, "TIFF"), np.repeat(grey[..., None] / 65535.0, 3, 2), 1e-6


def _case_I():
    grey = _ramp((S, S), 65535, 16).astype(np.int32)
    return _encoded(Image.fromarray(grey), "TIFF"), np.repeat(grey[..., None] / 65535.0, 3, 2), 1e-6


def _case_F():
    values = np.random.default_rng(17).random((S, S)).astype(np.float32)
    return _encoded(Image.fromarray(values), "TIFF"), np.repeat(values[..., None].astype(float), 3, 2), 1e-6


def _case_png16_grey():
    grey = _ramp((S, S), 65535, 18).astype(np.uint16)
    return _png16(grey, 0), np.repeat(grey[..., None] / 65535.0, 3, 2), 1e-6


def _case_png16_grey_alpha():
    values = _ramp((S, S, 2), 65535, 19).astype(np.uint16)
    expected = _on_white(values[..., :1].astype(float), values[..., 1].astype(float), 65535.0)
    return _png16(values, 4), np.repeat(expected, 3, 2), 1.5 / 255  # Pillow keeps 8 bits of LA


def _case_png16_rgb():
    values = _ramp((S, S, 3), 65535, 20).astype(np.uint16)
    return _png16(values, 2), values / 65535.0, 1.0 / 255  # Pillow keeps the high byte of 16-bit RGB


def _case_png16_rgba():
    values = _ramp((S, S, 4), 65535, 21).astype(np.uint16)
    expected = _on_white(values[..., :3].astype(float), values[..., 3].astype(float), 65535.0)
    return _png16(values, 6), expected, 1.5 / 255


MODE_CASES = {name[len("_case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_is_scaled_like_a_reference_decoding(case):
    data, expected, tolerance = MODE_CASES[case]()
    got = load_image(data, size=S).permute(1, 2, 0).double().numpy()  # (S, S, 3)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= tolerance + 1e-6, case


def test_a_16_bit_grey_png_of_mid_grey_is_mid_grey():
    """A 16-bit greyscale PNG came out 99.2 % white (mean 0.998): every value above 255 was clipped."""
    grey = np.full((40, 40), 32768, np.uint16)
    for data in (_png16(grey, 0), _encoded(Image.fromarray(grey), "PNG")):
        x = load_image(data, size=32)
        assert abs(float(x.mean()) - 32768 / 65535) < 1e-6


def _oriented(fmt: str, orientation: int) -> bytes:
    """A 12 x 8 (wide) image, black on the left third and white elsewhere, stored with an EXIF
    orientation tag (6: the camera was turned; viewers rotate it 90° clockwise)."""
    pixels = np.full((8, 12, 3), 255, np.uint8)
    pixels[:, :4] = 0
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    return _encoded(Image.fromarray(pixels), fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_exif_orientation_is_applied(fmt):
    """Orientation 6: the stored wide image is shown turned 90° clockwise, so it is tall and its black left
    third becomes the top third. Read at its own width (8), the centre crop keeps rows 2..9 of 12."""
    upright = load_image(_oriented(fmt, 6), size=8)  # (3, 8, 8): rows 0-1 of the crop are black (rows 2-3)
    assert float(upright[:, :2].max()) < 0.1 and float(upright[:, 3:].min()) > 0.9
    as_stored = load_image(_oriented(fmt, 1), size=8)  # no rotation: black is on the left
    assert float(as_stored[:, :, 0].max()) < 0.1 and float(as_stored[:, :, -1].min()) > 0.9
    turned = load_image(_oriented(fmt, 8), size=8)  # 90° counter-clockwise: black at the bottom
    assert float(turned[:, -2:].max()) < 0.1 and float(turned[:, :5].min()) > 0.9


def test_large_images_are_reduced_before_conversion_with_the_same_result():
    """Above 4 megapixels the image is reduced by an integer factor in its own mode first; a smooth image
    comes out as it would from the full-size pixels."""
    yy, xx = np.mgrid[0:2400, 0:2000]
    grey16 = ((xx + yy) * 65535 // (2400 + 2000)).astype(np.uint16)
    big = load_image(_encoded(Image.fromarray(grey16), "PNG"), size=32)
    small = load_image(_encoded(Image.fromarray(grey16[::20, ::20].copy()), "PNG"), size=32)
    assert float((big - small).abs().max()) < 0.02
    assert 0.45 < float(big.mean()) < 0.55
