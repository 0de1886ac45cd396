"""R-CONV (lavp_core.analytic): exact recovery on its family, and a refusal for every unsupported case."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from lavp_core.analytic import (
    AnalyticResult,
    RConvConfig,
    check_rconv_supported,
    format_layer_table,
    reconstruct_rconv,
    reconstruct_rconv_from_gradient,
)
from lavp_core.data import load_dataset
from lavp_core.errors import ConfigError, UnsupportedModelError
from lavp_core.gradients import GradientOracle, client_update
from lavp_core.models import create_model, init_random, list_models

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def photos():
    return load_dataset("photos", "val")


def build(layers: list[tuple[str, nn.Module]], seed: int = 1) -> nn.Module:
    """A named nn.Sequential with DLG-uniform weights U(-0.5, 0.5) from an explicit generator."""
    with torch.device("meta"):
        model = nn.Sequential(OrderedDict(layers))
    model = model.to_empty(device="cpu")
    return init_random(model, torch.Generator().manual_seed(seed), "dlg-uniform").eval()


def exact_update(model: nn.Module, photos, index: int):
    """(image01 (1, C, H, W) float64, float64 client update) for photos/val[index]."""
    image01, label = photos[index]
    image01 = image01.double().unsqueeze(0)
    update = client_update(GradientOracle(model, dtype=torch.float64), photos.info.normalize(image01), label)
    return image01, update


def mse01(result: AnalyticResult, image01: torch.Tensor, photos) -> float:
    """Mean squared difference of the de-normalised (unclamped) reconstruction and the image in [0, 1]."""
    recovered01 = photos.info.denormalize(result.reconstruction, clamp=False)
    return float(((recovered01 - image01) ** 2).mean())


def variant_cnn() -> nn.Module:
    """A second member of the family: 4x4 stride-2 first layer, sigmoid and tanh later, explicit Flatten."""
    return build([
        ("conv1", nn.Conv2d(3, 16, 4, stride=2, padding=1)), ("act1", nn.LeakyReLU(0.1)),  # (16, 16, 16)
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("act2", nn.Sigmoid()),  # (32, 16, 16)
        ("conv3", nn.Conv2d(32, 16, 5, padding=2)), ("act3", nn.Tanh()),  # (16, 16, 16)
        ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 16 * 16, 10)),
    ])


# --------------------------------------------------------------------------------------------
# Exact recovery


def test_cnn_rconv_is_registered_with_uniform_weights():
    spec = {m.name: m for m in list_models()}["cnn-rconv"]
    assert spec.init == "dlg-uniform" and spec.input_size == 32
    weights = torch.cat([p.detach().reshape(-1) for p in create_model("cnn-rconv", 10, seed=0).parameters()])
    assert -0.5 <= float(weights.min()) < -0.49 and 0.49 < float(weights.max()) <= 0.5


@pytest.mark.parametrize("index", [0, 7])
def test_exact_recovery_on_cnn_rconv(photos, index):
    model = create_model("cnn-rconv", 10, seed=0)
    image01, update = exact_update(model, photos, index)
    result = reconstruct_rconv(model, update)

    assert result.reconstruction.shape == (1, *SHAPE) and result.reconstruction.dtype == torch.float64
    assert mse01(result, image01, photos) <= 1e-10
    assert result.gradient_residual <= 1e-9
    assert result.label == update.label
    assert [(r.name, r.kind, r.method) for r in result.layers] == [
        ("body.0", "conv", "forward"), ("body.2", "conv", "gradient"), ("body.4", "conv", "gradient"),
        ("fc", "linear", "linear")]
    first, second, third, fc = result.layers
    # The first layer: 400 gradient equations per channel for 1,024 unknowns, so forward constraints.
    assert (first.constraints_available, first.unknowns, first.rank) == (16 * 16 * 16, 3072, 3072)
    # Later layers: full rank from a fraction of their gradient constraints (32 filters x k^2 per channel).
    assert (second.constraints_available, second.unknowns, second.rank) == (16 * 32 * 25, 16 * 256, 16 * 256)
    assert (third.constraints_available, third.unknowns, third.rank) == (32 * 32 * 9, 32 * 64, 32 * 64)
    assert third.unknowns <= third.constraints_needed < third.constraints_available / 2
    assert second.unknowns <= second.constraints_needed < second.constraints_available
    assert (fc.unknowns, fc.rank) == (2048, 2048)
    assert all(r.residual <= 1e-10 for r in result.layers)
    assert "body.4" in format_layer_table(result)


def test_exact_recovery_with_only_the_selected_rows(photos):
    """The paper's solve: only the rows added while the rank grew enter the least squares."""
    model = create_model("cnn-rconv", 10, seed=2)
    image01, update = exact_update(model, photos, 3)
    result = reconstruct_rconv(model, update, config=RConvConfig(solve_rows="selected"))
    assert mse01(result, image01, photos) <= 1e-10
    for report in result.layers[1:3]:
        assert report.constraints_used == report.constraints_needed < report.constraints_available


def test_exact_recovery_on_a_second_architecture(photos):
    model = variant_cnn()
    image01, update = exact_update(model, photos, 5)
    result = reconstruct_rconv(model, update)
    assert mse01(result, image01, photos) <= 1e-10
    assert [r.method for r in result.layers] == ["forward", "gradient", "gradient", "linear"]
    assert [r.name for r in result.layers] == ["conv1", "conv2", "conv3", "fc"]


def test_exact_recovery_across_the_family_corners(photos):
    """No conv bias, 'valid' and 'same' padding, dilation, a ReLU between convolutions (its exact zeros
    come back as rounding noise), a convolution without activation, and two linear layers."""
    model = build([
        ("conv1", nn.Conv2d(3, 16, 4, stride=2, padding="valid", bias=False)), ("act1", nn.LeakyReLU(0.2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding="same", dilation=2)), ("act2", nn.ReLU()),  # (32, 15, 15)
        ("conv3", nn.Conv2d(32, 32, 3, padding=1)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(32 * 15 * 15, 10)), ("act4", nn.ReLU()),
        ("fc2", nn.Linear(10, 10)),
    ])
    image01, update = exact_update(model, photos, 4)
    result = reconstruct_rconv(model, update)
    assert mse01(result, image01, photos) <= 1e-10
    assert [(r.name, r.method) for r in result.layers] == [
        ("conv1", "forward"), ("conv2", "gradient"), ("conv3", "gradient"), ("fc1", "linear")]


@pytest.mark.parametrize("arch", ["registry", "relu-tanh"])
def test_exact_recovery_on_an_mlp(photos, arch):
    if arch == "registry":
        model = create_model("mlp-rconv", 10, seed=0)
    else:
        model = build([("flatten", nn.Flatten()), ("fc1", nn.Linear(3072, 64)), ("act1", nn.ReLU()),
                       ("fc2", nn.Linear(64, 32)), ("act2", nn.Tanh()), ("fc3", nn.Linear(32, 10))])
    image01, update = exact_update(model, photos, 2)
    result = reconstruct_rconv_from_gradient(model, update.gradient, SHAPE)
    assert mse01(result, image01, photos) <= 1e-10
    assert len(result.layers) == 1 and result.layers[0].method == "linear"
    assert result.layers[0].unknowns == result.layers[0].rank == 3072


def test_the_model_is_left_untouched(photos):
    model = create_model("cnn-rconv", 10, seed=0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, update = exact_update(model, photos, 0)
    reconstruct_rconv(model, update)
    assert model.training
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and param.grad is None
        assert torch.equal(param, before[name])


# --------------------------------------------------------------------------------------------
# Refusals: each names the layer and the reason


def refused(match: str, layer: str, model: nn.Module) -> str:
    with pytest.raises(UnsupportedModelError, match=match) as info:
        check_rconv_supported(model, SHAPE)
    assert f"'{layer}'" in str(info.value)
    return str(info.value)


def test_refuses_pooling():
    model = build([("conv1", nn.Conv2d(3, 16, 3, padding=1)), ("act1", nn.LeakyReLU(0.2)),
                   ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 256, 10))])
    refused("pooling", "pool", model)


def test_refuses_batch_norm():
    model = build([("conv1", nn.Conv2d(3, 16, 5, stride=2, padding=2)), ("bn", nn.BatchNorm2d(16)),
                   ("act1", nn.LeakyReLU(0.2)), ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 256, 10))])
    refused("normalisation", "bn", model)


def test_refuses_a_linear_layer_without_bias():
    model = build([("conv1", nn.Conv2d(3, 16, 5, stride=2, padding=2)), ("act1", nn.LeakyReLU(0.2)),
                   ("flatten", nn.Flatten()), ("fc", nn.Linear(16 * 256, 10, bias=False))])
    refused("without bias", "fc", model)


def test_refuses_too_few_gradient_constraints_under_relu():
    """4 filters x 9 taps = 36 equations per channel for 1,024 unknowns, and ReLU hides the pre-activation."""
    model = build([("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("act1", nn.ReLU()),
                   ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 1024, 10))])
    message = refused("not invertible", "conv1", model)
    assert "36 equations" in message and "1024 unknowns" in message


def test_refuses_too_few_forward_constraints():
    model = build([("conv1", nn.Conv2d(3, 2, 3, padding=1)), ("act1", nn.LeakyReLU(0.2)),
                   ("flatten", nn.Flatten()), ("fc", nn.Linear(2 * 1024, 10))])
    message = refused("rank deficient", "conv1", model)
    assert "2048 equations for 3072 unknowns" in message


def test_refuses_pixels_no_kernel_reads():
    model = build([("conv1", nn.Conv2d(3, 64, 1, stride=2)), ("act1", nn.LeakyReLU(0.2)),
                   ("flatten", nn.Flatten()), ("fc", nn.Linear(64 * 256, 10))])
    refused("no kernel tap", "conv1", model)


def test_refuses_a_rank_deficient_system_found_in_the_data(photos):
    """conv2 has 288 >= 256 equations per channel, but with stride 2 and a 3x3 kernel the even-even
    pixels are read by one tap only (32 equations for 64 of them): the rank falls short at run time."""
    model = build([
        ("conv1", nn.Conv2d(3, 16, 5, stride=2, padding=2)), ("act1", nn.LeakyReLU(0.2)),  # (16, 16, 16)
        ("conv2", nn.Conv2d(16, 32, 3, stride=2, padding=1)), ("act2", nn.ReLU()),  # (32, 8, 8)
        ("flatten", nn.Flatten()), ("fc", nn.Linear(32 * 64, 10)),
    ])
    check_rconv_supported(model, SHAPE)  # structurally fine
    _, update = exact_update(model, photos, 0)
    with pytest.raises(UnsupportedModelError, match=r"'conv2'.*rank \d+ of 256 unknowns.*not invertible"):
        reconstruct_rconv(model, update)


def test_refuses_a_residual_connection():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 5, stride=2, padding=2)
            self.act1 = nn.LeakyReLU(0.2)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.act2 = nn.LeakyReLU(0.2)
            self.fc = nn.Linear(16 * 256, 10)

        def forward(self, x):
            h = self.act1(self.conv1(x))
            return self.fc((h + self.act2(self.conv2(h))).flatten(1))

    with torch.device("meta"):
        model = Residual()
    model = init_random(model.to_empty(device="cpu"), torch.Generator().manual_seed(0), "dlg-uniform")
    refused("not an nn.Module layer", "fc", model)


def test_refuses_a_mini_batch_gradient(photos):
    model = create_model("cnn-rconv", 10, seed=0)
    _, first = exact_update(model, photos, 0)
    _, second = exact_update(model, photos, 1)
    with pytest.raises(UnsupportedModelError, match=r"'fc'.*more than one image"):
        reconstruct_rconv_from_gradient(model, (first.gradient + second.gradient) / 2, SHAPE)


def test_rejects_an_invalid_config():
    with pytest.raises(ConfigError, match="solve_rows"):
        RConvConfig(solve_rows="some").validated()
