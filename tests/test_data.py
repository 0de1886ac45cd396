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
    cmyk = Image.new("CMYK", (8, 8))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    with pytest.raises(ImageError, match="4 channels"):
        load_image(buf.getvalue())
