"""Datasets: the bundled ``photos`` and ``faces`` sets, CIFAR, image folders, and single user images.

Every dataset yields images in [0, 1] as float32 tensors of shape (C, H, W) plus an integer label,
and carries its normalisation in :class:`DatasetInfo`. Attacks optimise the *normalised* image
(what the model consumes); metrics are computed on de-normalised images clamped to [0, 1].

Bundled data needs no download:

* ``photos``: 32x32 RGB crops cut deterministically from the colour photographs that ship inside
  scikit-image, one class per source photo (10 classes). Each photo is resized to four scales
  (short side 96, 128, 160 and 192 pixels) and tiled with 32x32 windows at stride 16. A crop whose
  source rows lie entirely in the top 70 % of the photo goes to ``train``; entirely in the bottom
  25 % goes to ``val``; crops that straddle the gap are discarded, so the two splits come from
  disjoint regions. Near-constant crops (pixel std below 0.03) are dropped. The validation split
  holds 16 crops per class (160 images), interleaved by class so that any prefix is balanced.
* ``faces``: the LFW subset shipped with scikit-image (100 faces, 100 non-faces, 25x25 grey).
  Each image is upsampled to 32x32 (bilinear, half-pixel centres) and its grey channel repeated
  three times, so it fits every 32x32 RGB architecture. Classes: 0 = face, 1 = non-face. Every
  fourth image of each class is validation (50 images, alternating face / non-face).
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, DatasetError, ImageError

CIFAR10_MEAN = (0.4915, 0.4823, 0.4468)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an attack need to know about a dataset.

    Args:
        name: registry name.
        num_classes: number of labels.
        image_shape: (C, H, W) of the model input.
        mean, std: per-channel normalisation; the model consumes (x - mean) / std.
        class_names: one name per label.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        return mean, std

    def normalize(self, image01: torch.Tensor) -> torch.Tensor:
        """Map an image in [0, 1], shape (..., C, H, W), to the model's input space."""
        mean, std = self._stats(image01)
        return (image01 - mean) / std

    def denormalize(self, image: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Map a normalised image (..., C, H, W) back to [0, 1] (clamped unless ``clamp=False``)."""
        mean, std = self._stats(image)
        out = image * std + mean
        return out.clamp(0.0, 1.0) if clamp else out

    def bounds(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """Per-channel box of the normalised space: ((C,1,1) lower, (C,1,1) upper)."""
        like = torch.empty(0, dtype=dtype, device=device)
        mean, std = self._stats(like)
        return (0.0 - mean) / std, (1.0 - mean) / std


class ImageSet:
    """An indexable split of a dataset: ``images[i] -> (image01 (C,H,W) float32, label int)``."""

    def __init__(self, info: DatasetInfo, split: str, images: torch.Tensor | None = None,
                 labels: Sequence[int] | None = None, loader: Callable[[int], tuple] | None = None,
                 length: int | None = None, descriptions: Sequence[str] | None = None):
        self.info = info
        self.split = split
        self._images = images  # (N, C, H, W) uint8 or float, or None when lazy
        self._labels = list(labels) if labels is not None else None
        self._loader = loader
        self._length = len(self._labels) if self._labels is not None else int(length or 0)
        self._descriptions = list(descriptions) if descriptions is not None else None

    def __len__(self) -> int:
        return self._length

    def _check_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise ConfigError(f"image index must be an integer, got {index!r}")
        if not 0 <= int(index) < self._length:
            raise ConfigError(
                f"image index {index} is out of range for {self.info.name}/{self.split} "
                f"({self._length} images): choose 0..{self._length - 1}")
        return int(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        if self._images is not None:
            image = self._images[index]
            if image.dtype == torch.uint8:
                image = image.float() / 255.0
            return image.float(), int(self._labels[index])
        return self._loader(index)

    def label(self, index: int) -> int:
        index = self._check_index(index)
        if self._labels is not None:
            return int(self._labels[index])
        return self[index][1]

    def describe(self, index: int) -> str:
        """A short human-readable origin of image ``index`` (for captions)."""
        index = self._check_index(index)
        label = self.label(index)
        base = f"{self.info.name}/{self.split} #{index} ({self.info.class_names[label]})"
        if self._descriptions is not None:
            return f"{base}: {self._descriptions[index]}"
        return base

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack several images: ((B, C, H, W) float32 in [0,1], (B,) int64 labels)."""
        items = [self[i] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    builder: Callable[..., ImageSet]
    needs_root: bool = False


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, description: str, needs_root: bool = False):
    """Decorator: register ``builder(split, root, download, resolution) -> ImageSet`` under ``name``."""

    def wrap(builder):
        _DATASETS[name] = DatasetSpec(name, description, builder, needs_root)
        return builder

    return wrap


def list_datasets() -> list[DatasetSpec]:
    """All registered datasets, in registration order."""
    return list(_DATASETS.values())


def load_dataset(name: str, split: str = "val", *, root: str | os.PathLike | None = None,
                 download: bool = False, resolution: int | None = None) -> ImageSet:
    """Load a split of a registered dataset.

    Args:
        name: registry name (``photos``, ``faces``, ``cifar10``, ``cifar100``, ``imagefolder``).
        split: ``"train"`` or ``"val"``.
        root: folder for datasets that live on disk (CIFAR, image folders).
        download: CIFAR only: download into ``root`` if missing (only when asked).
        resolution: image folders only: side of the square model input (default 224).
    """
    if name not in _DATASETS:
        known = ", ".join(_DATASETS)
        raise ConfigError(f"unknown dataset {name!r}: choose one of {known}")
    if split not in ("train", "val"):
        raise ConfigError(f"unknown split {split!r}: use 'train' or 'val'")
    spec = _DATASETS[name]
    if spec.needs_root and root is None:
        raise DatasetError(f"dataset {name!r} lives on disk: give its folder with --data-root "
                           f"(for CIFAR add --download to fetch it there)")
    return spec.builder(split=split, root=root, download=download, resolution=resolution)


# --------------------------------------------------------------------------------------------
# photos


PHOTO_SOURCES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "retina", "immunohistochemistry", "stereo_motorcycle", "colorwheel", "logo",
)
PHOTO_SCALES = (96, 128, 160, 192)
PHOTO_CROP = 32
PHOTO_STRIDE = 16
PHOTO_TRAIN_FRACTION = 0.70
PHOTO_VAL_FRACTION = 0.25
PHOTO_VAL_PER_CLASS = 16
PHOTO_TRAIN_PER_CLASS = 400
PHOTO_MIN_STD = 0.03


def _photo_array(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.shape[-1] == 4:  # RGBA logo: composite on white
        alpha = image[..., 3:4].astype(np.float64) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return image


def _evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in picks]


@functools.lru_cache(maxsize=1)
def _photos_crops() -> dict:
    """Cut every crop once per process: {'train': (imgs, labels, desc), 'val': (...), 'mean', 'std'}."""
    per_split = {"train": ([], [], []), "val": ([], [], [])}
    for name in PHOTO_SOURCES:
        photo = Image.fromarray(_photo_array(name))
        width, height = photo.size
        found = {"train": [], "val": []}
        for short in PHOTO_SCALES:
            factor = short / min(width, height)
            w, h = max(PHOTO_CROP, round(width * factor)), max(PHOTO_CROP, round(height * factor))
            scaled = np.asarray(photo.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None))
            for top in range(0, h - PHOTO_CROP + 1, PHOTO_STRIDE):
                lo, hi = top / h, (top + PHOTO_CROP) / h  # crop rows as fractions of the photo
                if hi <= PHOTO_TRAIN_FRACTION:
                    split = "train"
                elif lo >= 1.0 - PHOTO_VAL_FRACTION:
                    split = "val"
                else:
                    continue
                for left in range(0, w - PHOTO_CROP + 1, PHOTO_STRIDE):
                    crop = scaled[top:top + PHOTO_CROP, left:left + PHOTO_CROP]
                    if crop.std() / 255.0 < PHOTO_MIN_STD:
                        continue
                    found[split].append((crop, f"{name} at scale {short}, rows {top}-{top + PHOTO_CROP}, "
                                               f"cols {left}-{left + PHOTO_CROP}"))
        for split, cap in (("train", PHOTO_TRAIN_PER_CLASS), ("val", PHOTO_VAL_PER_CLASS)):
            chosen = _evenly(found[split], cap)
            if split == "val" and len(chosen) < PHOTO_VAL_PER_CLASS:
                raise DatasetError(f"photo {name!r} gave only {len(chosen)} validation crops")
            per_split[split][0].append([c for c, _ in chosen])
            per_split[split][2].append([d for _, d in chosen])
    out = {}
    for split, (groups, _, descs) in per_split.items():
        images, labels, descriptions = [], [], []
        if split == "val":  # interleave by class so any prefix is balanced
            for k in range(PHOTO_VAL_PER_CLASS):
                for label, group in enumerate(groups):
                    images.append(group[k])
                    labels.append(label)
                    descriptions.append(descs[label][k])
        else:
            for label, group in enumerate(groups):
                images.extend(group)
                labels.extend([label] * len(group))
                descriptions.extend(descs[label])
        tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N,3,32,32)
        out[split] = (tensor, labels, descriptions)
    train = out["train"][0].double() / 255.0
    out["mean"] = tuple(round(v, 4) for v in train.mean(dim=(0, 2, 3)).tolist())
    out["std"] = tuple(round(v, 4) for v in train.std(dim=(0, 2, 3)).tolist())
    return out


@register_dataset("photos", "32x32 crops of scikit-image's colour photographs, 10 classes (bundled default)")
def _build_photos(split: str, **_) -> ImageSet:
    crops = _photos_crops()
    info = DatasetInfo("photos", len(PHOTO_SOURCES), (3, 32, 32), crops["mean"], crops["std"],
                       PHOTO_SOURCES)
    images, labels, descriptions = crops[split]
    return ImageSet(info, split, images=images, labels=labels, descriptions=descriptions)


# --------------------------------------------------------------------------------------------
# faces


@functools.lru_cache(maxsize=1)
def _faces_data() -> dict:
    import skimage.data

    raw = torch.from_numpy(np.asarray(skimage.data.lfw_subset(), dtype=np.float32))  # (200, 25, 25)
    up = F.interpolate(raw[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    up = up.clamp(0, 1).repeat(1, 3, 1, 1)  # (200, 3, 32, 32)
    labels = [0] * 100 + [1] * 100
    val_faces = [i for i in range(100) if i % 4 == 3]
    val_other = [i + 100 for i in val_faces]
    val_idx = [i for pair in zip(val_faces, val_other) for i in pair]
    train_idx = [i for i in range(200) if i not in set(val_idx)]
    out = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        out[split] = (up[idx], [labels[i] for i in idx], [f"LFW subset image {i}" for i in idx])
    train = out["train"][0].double()
    out["mean"] = tuple(round(v, 4) for v in train.mean(dim=(0, 2, 3)).tolist())
    out["std"] = tuple(round(v, 4) for v in train.std(dim=(0, 2, 3)).tolist())
    return out


@register_dataset("faces", "LFW subset from scikit-image (faces vs non-faces), 25x25 grey upsampled to 32x32 RGB")
def _build_faces(split: str, **_) -> ImageSet:
    data = _faces_data()
    info = DatasetInfo("faces", 2, (3, 32, 32), data["mean"], data["std"], ("face", "non-face"))
    images, labels, descriptions = data[split]
    return ImageSet(info, split, images=images, labels=labels, descriptions=descriptions)


# --------------------------------------------------------------------------------------------
# CIFAR


def _build_cifar(kind: str, split: str, root, download: bool, **_) -> ImageSet:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    try:
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise DatasetError(
            f"{kind} not found: expected {Path(root) / folder}; rerun with --download to fetch it "
            f"into {root} (needs internet), or copy the extracted '{folder}' folder there") from exc
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if kind == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    info = DatasetInfo(kind, len(ds.classes), (3, 32, 32), mean, std, tuple(ds.classes))
    return ImageSet(info, split, images=images, labels=list(ds.targets))


@register_dataset("cifar10", "CIFAR-10 from a folder you give (--data-root; --download to fetch)", needs_root=True)
def _build_cifar10(split: str, root, download: bool = False, **_) -> ImageSet:
    return _build_cifar("cifar10", split, root, download)


@register_dataset("cifar100", "CIFAR-100 from a folder you give (--data-root; --download to fetch)", needs_root=True)
def _build_cifar100(split: str, root, download: bool = False, **_) -> ImageSet:
    return _build_cifar("cifar100", split, root, download)


# --------------------------------------------------------------------------------------------
# image folders and single images


#: The largest image :func:`load_image` decodes by default, in pixels (width x height): 50 megapixels, e.g.
#: 8192 x 6104, above every camera photo in common use. An image is decoded in full before it is reduced
#: to the model's resolution, at up to 4 bytes per pixel (RGBA, 16-bit grey, 32-bit integer or float),
#: so this bounds the memory one image takes to about 200 MB. The size is read from the file's header and
#: checked before anything is decoded: a decompression bomb (a 20,000 x 20,000 PNG compresses to about
#: 1 MB) is refused without allocating its pixels. Callers serving many users pass a lower ``max_pixels``
#: (the app does).
MAX_IMAGE_PIXELS = 50_000_000
#: Images above this many pixels are first reduced by an integer factor in their own mode (JPEGs are
#: decoded at a reduced scale), keeping at least :data:`REDUCE_MARGIN` times the output size on the short
#: side, so that the colour conversion and the resampling never work on the full-size pixels.
REDUCE_ABOVE_PIXELS = 4_000_000
REDUCE_MARGIN = 4
_WHITE_16 = 65535.0  # the white level of 16-bit images (Pillow's I;16* modes, and I images holding them)
_COLOUR_MODES = ("RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # 8-bit, no alpha: Pillow's own conversion to RGB
_ALPHA_MODES = ("LA", "La", "PA", "P", "RGBA", "RGBa")  # 8-bit with (or possibly with) transparency


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an RGBA uint8 (H, W, 4) image laid on white: c·a + 255·(1 − a), rounded
    (integer arithmetic: n / 255 is never exactly halfway, so this is round-to-nearest)."""
    colour = rgba[..., :3].astype(np.int32)
    alpha = rgba[..., 3:4].astype(np.int32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _decode_pixels(image: Image.Image, source: str) -> np.ndarray:
    """The pixels of a decoded PIL image as RGB: uint8 (H, W, 3) for 8-bit images, float32 (H, W, 3) in
    [0, 1] for deeper ones. Grey is repeated; transparency is composited on white; 16-bit images are
    scaled by 65535; float images must already lie in [0, 1]."""
    mode = image.mode
    if mode == "1":
        grey = np.asarray(image.convert("L"))
    elif mode == "L":
        grey = np.asarray(image)
    elif mode == "RGB":
        return np.asarray(image)
    elif mode in _COLOUR_MODES:
        return np.asarray(image.convert("RGB"))
    elif mode in _ALPHA_MODES:
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    elif mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > _WHITE_16:
            raise ImageError(f"{source}: a {image.mode} image with values from {low} to {high} has no known white "
                             f"level (16-bit images hold 0..65535); save it as an 8- or 16-bit PNG")
        grey = (values.astype(np.float32) / np.float32(_WHITE_16)).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    elif mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ImageError(f"{source}: the floating-point image holds NaN or infinite values; save it as an "
                             f"8- or 16-bit PNG")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ImageError(f"{source}: a floating-point image must hold values in [0, 1] (this one spans "
                             f"{low:.4g} to {high:.4g}); rescale it, or save it as an 8- or 16-bit PNG")
        return np.repeat(values[..., None], 3, axis=2)
    else:
        raise ImageError(f"{source}: image mode {mode!r} ({len(image.getbands())} channels: "
                         f"{', '.join(image.getbands())}) is not one this program reads; save it as an RGB "
                         f"or greyscale PNG/JPEG")
    return np.repeat(grey[..., None], 3, axis=2)


def _reduce_large(image: Image.Image, size: int) -> Image.Image:
    """A large image (above :data:`REDUCE_ABOVE_PIXELS`) reduced by the largest integer factor that keeps
    its short side at least ``REDUCE_MARGIN * size`` (box average in its own mode; palette, bilevel and
    16-bit images are first brought to a mode that averages correctly). Smaller images are returned as
    they are."""
    width, height = image.size
    factor = min(width, height) // (REDUCE_MARGIN * size)
    if width * height <= REDUCE_ABOVE_PIXELS or factor < 2:
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = Image.fromarray(np.asarray(image).astype(np.int32))  # mode I keeps every 16-bit value
    return image.reduce(factor)


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre-crop: float32 (size, size, 3) in [0, 1]."""
    if pixels.dtype == np.uint8:  # 8-bit: resampled as an RGB image, as it always was
        return np.asarray(_resize_center_crop(Image.fromarray(pixels), size)).astype(np.float32) / 255.0
    channels = [np.asarray(_resize_center_crop(Image.fromarray(np.ascontiguousarray(pixels[..., c]), "F"), size))
                for c in range(pixels.shape[2])]  # deeper images: each channel resampled in float32
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


def _open_image(source: str | os.PathLike | bytes, label: str, max_pixels: int) -> Image.Image:
    """Open ``source`` and check its size from the header, before any pixel is decoded."""
    if isinstance(source, (bytes, bytearray)):
        handle = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{label}: no such file; give the path of a PNG or JPEG image")
        handle = path
    too_large = (f"images here may have at most {max_pixels / 1e6:g} megapixels; scale it down (or crop it) "
                 f"first")
    try:
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS, process-wide, left as it is) warns from 89 megapixels
        # and raises from 179; both mean the image is over our (lower) limit: make the warning an error here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "more pixels than Pillow decodes"
        raise ImageError(f"{label} declares {declared} (a decompression bomb, or a huge image): "
                         f"{too_large}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{label} is not a readable image ({exc.__class__.__name__}); "
                         f"give a PNG or JPEG file") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(f"{label} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels): "
                         f"{too_large}")
    if width == 0 or height == 0:
        image.close()
        raise ImageError(f"{label} has no pixels ({width}x{height}); give a PNG or JPEG image")
    return image


def load_image(source: str | os.PathLike | bytes, size: int = 32, channels: int = 3, *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Read an image file (path or bytes), resize its short side to ``size`` and centre-crop.

    Every mode Pillow decodes is read at its own depth: 8-bit images (bilevel, grey, palette, RGB, CMYK,
    YCbCr, with or without alpha) are scaled by 255, 16-bit ones (``I;16``, ``I;16B``, …, and ``I`` images
    holding 0..65535) by 65535, floating-point ones (``F``) must lie in [0, 1]. Transparency is composited
    on white, grey is repeated, and the EXIF orientation is applied (a photo taken upright comes out upright).

    Args:
        source: a path, or the file's bytes (an upload).
        size: side of the square output.
        channels: 3 (RGB) or 1 (the mean of R, G, B).
        max_pixels: the largest width x height accepted (default :data:`MAX_IMAGE_PIXELS`); checked from
            the file's header before anything is decoded.

    Returns:
        float32 tensor (channels, size, size) in [0, 1].

    Raises:
        ImageError: the data is not a readable image, is larger than ``max_pixels`` (decompression bombs
            included), or holds values this function cannot scale (negative or beyond 16-bit integers,
            floats outside [0, 1], NaN).
    """
    label = "uploaded image" if isinstance(source, (bytes, bytearray)) else str(source)
    if size <= 0:
        raise ConfigError(f"image size must be positive, got {size}")
    if channels not in (1, 3):
        raise ImageError(f"models here take 1 or 3 input channels, not {channels}")
    image = _open_image(source, label, max_pixels)
    try:
        width, height = image.size
        if image.format == "JPEG" and width * height > REDUCE_ABOVE_PIXELS:
            image.draft(None, (REDUCE_MARGIN * size, REDUCE_MARGIN * size))  # decode at 1/2, 1/4 or 1/8 scale
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        pixels = _decode_pixels(_reduce_large(image, size), label)
    except ImageError:
        raise
    except Exception as exc:  # a truncated or malformed file fails inside a decoder, in many ways
        raise ImageError(f"{label} is not a readable image ({exc.__class__.__name__}); "
                         f"give a PNG or JPEG file") from exc
    finally:
        image.close()
    cropped = _resize_pixels(pixels, size)
    tensor = torch.from_numpy(np.ascontiguousarray(cropped)).permute(2, 0, 1).float()  # (3, S, S)
    if channels == 1:
        tensor = tensor.mean(dim=0, keepdim=True)
    return tensor


@register_dataset("imagefolder", "any folder of class subfolders (ImageNette, ImageWoof, ImageNet val)",
                  needs_root=True)
def _build_imagefolder(split: str, root, resolution: int | None = None, **_) -> ImageSet:
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"image folder {base} does not exist: give a folder whose subfolders are "
                           f"classes holding images")
    for sub in (split, "validation" if split == "val" else "training"):
        if (base / sub).is_dir():
            base = base / sub
            break
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((base / cls).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DatasetError(f"no images found under {base}: expected {base}/<class>/<image>.png|jpg")
    size = resolution or 224
    info = DatasetInfo("imagefolder", len(classes), (3, size, size), IMAGENET_MEAN, IMAGENET_STD,
                       tuple(classes))

    def loader(index: int):
        return load_image(files[index], size=size), labels[index]

    return ImageSet(info, split, labels=labels, loader=loader,
                    descriptions=[str(f.relative_to(base)) for f in files])
