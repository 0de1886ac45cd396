"""Image similarity scores between a reconstruction and the ground truth.

All scores take images in [0, 1] (de-normalised and clamped by the caller, or by
:func:`score_reconstruction`): MSE, PSNR = 10 log10(1 / MSE) (``inf`` for identical images),
SSIM (scikit-image, Gaussian window sigma 1.5, data_range 1, over channels) and LPIPS (the
``lpips`` package with its AlexNet backbone).

LPIPS needs AlexNet's ImageNet weights, which torchvision downloads into the torch hub cache on first
use. This project never downloads at run time: where the file is not already in the cache, LPIPS is
reported as unavailable with the reason, never computed with random weights. On a machine with
internet, ``python -m lavp_core fetch-lpips`` puts it there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
SSIM_WINDOW = 11  # side of the Gaussian window (sigma 1.5, truncated at 3.5 sigma)
RECOVERED_SSIM = 0.5  # an attack "recovered" the image when its SSIM reaches this (README: studies)


@dataclass(frozen=True)
class LpipsStatus:
    available: bool
    reason: str


def alexnet_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS


@functools.lru_cache(maxsize=1)
def _lpips_model():
    """(model or None, LpipsStatus): built once per process, from cached weights only."""
    try:
        import lpips  # noqa: F401
    except ImportError as exc:
        return None, LpipsStatus(False, f"the lpips package is not installed ({exc})")
    path = alexnet_weights_path()
    if not path.is_file():
        return None, LpipsStatus(False, f"AlexNet backbone weights are not in the torch hub cache ({path}); "
                                        f"this machine cannot download them. On a machine with internet run "
                                        f"'python -m lavp_core fetch-lpips'")
    import lpips

    try:
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        # lpips splits AlexNet's feature stack into slices whose modules keep their original indices
        backbone = model.net
        own = {}
        for slice_name in ("slice1", "slice2", "slice3", "slice4", "slice5"):
            for idx, _ in getattr(backbone, slice_name).named_children():
                for param in ("weight", "bias"):
                    key = f"{idx}.{param}"
                    if key in features:
                        own[f"{slice_name}.{idx}.{param}"] = features[key]
        missing = backbone.load_state_dict(own, strict=False)
        if missing.missing_keys:
            return None, LpipsStatus(False, f"AlexNet weights at {path} do not fit lpips: {missing.missing_keys[:3]}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, LpipsStatus(True, "LPIPS (AlexNet) from cached weights")
    except Exception as exc:  # any failure here means: not available, say why
        return None, LpipsStatus(False, f"LPIPS could not be built ({exc.__class__.__name__}: {exc})")


def lpips_status() -> LpipsStatus:
    """Whether LPIPS can be computed on this machine, and why not if it cannot."""
    return _lpips_model()[1]


def mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean squared error of two images in [0, 1] (same shape)."""
    return float(torch.mean((x.double() - ref.double()) ** 2))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with data range 1; ``inf`` for identical images."""
    err = mse(x, ref)
    return math.inf if err == 0.0 else 10.0 * math.log10(1.0 / err)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """SSIM of two images (C, H, W) or (1, C, H, W) in [0, 1], scikit-image with a Gaussian window
    (sigma 1.5, 11x11). Images smaller than the window have no SSIM: NaN."""
    from skimage.metrics import structural_similarity

    if min(x.shape[-2:]) < SSIM_WINDOW:
        return math.nan

    a = x.detach().double().cpu().reshape(-1, *x.shape[-2:]).numpy()
    b = ref.detach().double().cpu().reshape(-1, *ref.shape[-2:]).numpy()
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))


def lpips_distance(x: torch.Tensor, ref: torch.Tensor) -> float | None:
    """LPIPS (AlexNet) of two images in [0, 1], or ``None`` when unavailable (see :func:`lpips_status`)."""
    model, status = _lpips_model()
    if model is None:
        return None
    a = x.detach().float().cpu().reshape(1, *x.shape[-3:]) * 2 - 1
    b = ref.detach().float().cpu().reshape(1, *ref.shape[-3:]) * 2 - 1
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return float(model(a, b).reshape(-1)[0])


def relative_mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """MSE divided by the mean over channels of ``ref``'s pixel variance: 1 means "no better than a flat
    image of ``ref``'s mean colour", 0 a perfect copy. ``inf`` (or NaN for a perfect copy) when ``ref``
    is flat. Images (C, H, W) or (1, C, H, W) in [0, 1]."""
    r = ref.detach().double().reshape(-1, *ref.shape[-2:])  # (C, H, W)
    variance = float(r.flatten(1).var(dim=1, unbiased=False).mean())
    err = mse(x, ref)
    if variance == 0.0:
        return math.nan if err == 0.0 else math.inf
    return err / variance


def pixel_correlation(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Pearson correlation of all pixel values of two images (every channel together); NaN when either
    image is flat. Unlike MSE it ignores a global change of brightness or contrast."""
    a = x.detach().double().flatten()
    b = ref.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return math.nan if norm == 0.0 else float((a @ b) / norm)


def is_recovered(ssim_value: float) -> bool:
    """The project's criterion for "the attack recovered the image": SSIM >= :data:`RECOVERED_SSIM`
    (see the README's section on studies for example images at and around the threshold)."""
    return bool(ssim_value >= RECOVERED_SSIM)


def image_metrics(x01: torch.Tensor, ref01: torch.Tensor) -> dict:
    """All scores for images in [0, 1]: ``mse``, ``psnr``, ``ssim``, ``rel_mse`` (:func:`relative_mse`),
    ``correlation`` (:func:`pixel_correlation`), ``recovered`` (:func:`is_recovered`), ``lpips`` (float
    or None) and ``lpips_reason`` (why LPIPS is missing, or an empty string)."""
    if x01.shape != ref01.shape:
        raise ValueError(f"images differ in shape: {tuple(x01.shape)} vs {tuple(ref01.shape)}")
    value = lpips_distance(x01, ref01)
    structural = ssim(x01, ref01)
    return {"mse": mse(x01, ref01), "psnr": psnr(x01, ref01), "ssim": structural,
            "rel_mse": relative_mse(x01, ref01), "correlation": pixel_correlation(x01, ref01),
            "recovered": is_recovered(structural), "lpips": value,
            "lpips_reason": "" if value is not None else lpips_status().reason}


def score_reconstruction(reconstruction: torch.Tensor | None, truth: torch.Tensor, info) -> dict:
    """Scores of a normalised reconstruction (1, C, H, W) against the normalised truth; de-normalises and
    clamps both to [0, 1] first. A missing reconstruction (every restart diverged) scores NaN."""
    if reconstruction is None:
        return {"mse": math.nan, "psnr": math.nan, "ssim": math.nan, "rel_mse": math.nan,
                "correlation": math.nan, "recovered": False, "lpips": None,
                "lpips_reason": "no reconstruction (every restart diverged)"}
    return image_metrics(info.denormalize(reconstruction.detach().float().cpu()),
                         info.denormalize(truth.detach().float().cpu()))


def to_uint8_image(image01: torch.Tensor) -> np.ndarray:
    """(C, H, W) or (1, C, H, W) in [0, 1] -> (H, W, 3) uint8 for display or PNG."""
    x = image01.detach().float().cpu().reshape(-1, *image01.shape[-2:])
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def image_file_bytes(image01: torch.Tensor, fmt: str = "PNG") -> bytes:
    """A (C, H, W) or (1, C, H, W) image in [0, 1] encoded as ``fmt`` (``PNG``, ``JPEG``) by Pillow."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8_image(image01)).save(buffer, format=fmt)
    return buffer.getvalue()

