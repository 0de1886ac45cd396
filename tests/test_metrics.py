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
