import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from lavp_core import metrics
from lavp_core.metrics import image_metrics, lpips_status, psnr, score_reconstruction, ssim


def _pair():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand((3, 32, 32), generator=gen)
    b = (a + 0.05 * torch.randn((3, 32, 32), generator=gen)).clamp(0, 1)
    return a, b


def test_mse_and_psnr_known_values():
    a = torch.zeros(3, 16, 16)
    b = torch.full((3, 16, 16), 0.1)
    scores = image_metrics(b, a)
    assert scores["mse"] == pytest.approx(0.01)
    assert scores["psnr"] == pytest.approx(20.0)
    assert psnr(a, a) == math.inf
    assert math.isnan(ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)))  # smaller than the window


def test_ssim_matches_scikit_image_reference():
    a, b = _pair()
    ref = structural_similarity(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(),
                                data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim(b, a) == pytest.approx(ref, rel=1e-12)
    assert ssim(a, a) == pytest.approx(1.0)


def test_lpips_reports_unavailable_with_reason_when_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    metrics._lpips_model.cache_clear()
    try:
        status = lpips_status()
        assert not status.available and "AlexNet" in status.reason and str(tmp_path) in status.reason
        a, b = _pair()
        scores = image_metrics(a, b)
        assert scores["lpips"] is None and scores["lpips_reason"] == status.reason
    finally:
        metrics._lpips_model.cache_clear()


def test_lpips_uses_cached_alexnet_weights_when_present(tmp_path, monkeypatch):
    import torchvision

    # A stand-in for the real file: same layout, different numbers. LPIPS must load exactly these.
    fake = torchvision.models.alexnet(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(fake, tmp_path / "checkpoints" / metrics.ALEXNET_WEIGHTS)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    metrics._lpips_model.cache_clear()
    try:
        model, status = metrics._lpips_model()
        assert status.available, status.reason
        assert torch.equal(getattr(model.net.slice1, "0").weight, fake["features.0.weight"])
        assert torch.equal(getattr(model.net.slice5, "10").bias, fake["features.10.bias"])
        a, b = _pair()
        assert metrics.lpips_distance(a, a) == pytest.approx(0.0, abs=1e-6)
        assert metrics.lpips_distance(a, b) > 0
    finally:
        metrics._lpips_model.cache_clear()


def test_score_reconstruction_denormalises_and_handles_missing(photos_val):
    x01, _ = photos_val[0]
    x = photos_val.info.normalize(x01)[None]
    assert score_reconstruction(x, x, photos_val.info)["psnr"] == math.inf
    missing = score_reconstruction(None, x, photos_val.info)
    assert np.isnan(missing["mse"]) and "diverged" in missing["lpips_reason"]


def test_relative_mse_and_correlation_on_synthetic_reconstructions():
    """The truth itself, its mean colour, noise, and a brightness-shifted copy: each where it must be."""
    gen = torch.Generator().manual_seed(4)
    truth = (0.25 + 0.5 * torch.rand((3, 32, 32), generator=gen))
    mean_colour = truth.mean(dim=(1, 2), keepdim=True).expand_as(truth)
    noise = torch.rand((3, 32, 32), generator=gen)
    shifted = (truth + 0.2).clamp(0, 1)
    exact = image_metrics(truth, truth)
    assert exact["rel_mse"] == 0.0 and exact["correlation"] == pytest.approx(1.0) and exact["recovered"]
    flat = image_metrics(mean_colour, truth)
    assert flat["rel_mse"] == pytest.approx(1.0, rel=1e-9)  # "no better than the mean colour", by definition
    assert abs(flat["correlation"]) < 0.1 and not flat["recovered"]  # only the channel means correlate
    assert math.isnan(metrics.pixel_correlation(torch.full((3, 32, 32), 0.3), truth))  # a flat image
    noisy = image_metrics(noise, truth)
    # independent uniform noise: E[(u - t)^2] = var(u) + (mean(u) - t)^2 over a truth of variance 1/48
    assert noisy["rel_mse"] > 3.0 and abs(noisy["correlation"]) < 0.1 and not noisy["recovered"]
    copy = image_metrics(shifted, truth)
    assert copy["correlation"] > 0.99 and copy["rel_mse"] > 1.0  # MSE punishes the shift, correlation does not
    reference = np.corrcoef(shifted.flatten().numpy(), truth.flatten().numpy())[0, 1]
    assert copy["correlation"] == pytest.approx(reference, rel=1e-9)
    variance = truth.double().flatten(1).var(dim=1, unbiased=False).mean()
    assert copy["rel_mse"] == pytest.approx(float(((shifted.double() - truth.double()) ** 2).mean() / variance))


def test_recovered_is_the_documented_ssim_threshold():
    assert metrics.is_recovered(metrics.RECOVERED_SSIM) and not metrics.is_recovered(metrics.RECOVERED_SSIM - 1e-9)
    assert not metrics.is_recovered(math.nan)
