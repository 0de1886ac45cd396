"""compute_proxies, the proxy registry, fusion, bad input, and the ``proxies`` CLI command."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import assert_model_unchanged, snapshot_model

from lavp_core import proxies
from lavp_core.cli import main
from lavp_core.errors import ConfigError, ModelError, ProxyError
from lavp_core.gradients import GradientOracle
from lavp_core.hessian import SolverConfig
from lavp_core.losses import list_losses
from lavp_core.proxies import (
    ProxyResult,
    compute_proxies,
    geometric_fusion,
    proxy_definition,
    proxy_key,
    proxy_order,
    proxy_table,
    proxy_title,
    resolve_method,
)

SIX = ("grad_norm", "l2_max", "l2_min", "cos_max", "cos_min", "fusion")


def tiny_mlp() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 24), nn.Tanh(), nn.Linear(24, 3))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.7)
    return model


def tiny_bn_convnet() -> nn.Module:
    """A convolution with batch norm (running statistics set), as resnet8 has: eval mode matters."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(), nn.Flatten(),
                          nn.Linear(4 * 9, 3))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        model[1].running_mean.copy_(torch.randn(4, generator=generator))
        model[1].running_var.copy_(torch.rand(4, generator=generator) + 0.5)
    return model.train()  # a model handed over in train mode must still be evaluated in eval mode


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn((1, 2, 3, 3), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exact_result(x) -> ProxyResult:
    return compute_proxies(tiny_mlp(), x, 1)


def test_the_six_proxies_are_floats(exact_result):
    assert set(SIX) <= set(exact_result)
    for key in SIX:
        assert type(exact_result[key]) is float and math.isfinite(exact_result[key])
    assert exact_result.method == "exact" and exact_result.input_dim == 18
    assert exact_result["l2_max"] >= exact_result["l2_min"] > 0
    assert exact_result["cos_max"] >= exact_result["cos_min"] > 0
    assert dict(exact_result) == exact_result.proxy_values


def test_fusion_is_the_geometric_mean_of_l2_max_and_cos_min(exact_result):
    expected = math.sqrt(exact_result["l2_max"] * exact_result["cos_min"])
    assert math.isclose(exact_result["fusion"], expected, rel_tol=1e-12)
    fused = geometric_fusion(exact_result, [("l2", "max"), ("cos", "min")])
    assert math.isclose(fused, expected, rel_tol=1e-12)


def test_grad_norm_is_the_norm_of_the_client_gradient(exact_result, x):
    expected = float(GradientOracle(tiny_mlp()).gradient(x, 1).norm())
    assert math.isclose(exact_result["grad_norm"], expected, rel_tol=1e-6)


def test_diagnostics_and_spectra(exact_result):
    for key in ("l2_max", "l2_min", "cos_max", "cos_min"):
        diag = exact_result.diagnostics[key]
        assert diag.method == "exact" and diag.converged and diag.residual < 1e-8
        assert diag.value == exact_result[key] and diag.which == key.rsplit("_", 1)[1]
    for loss in ("l2", "cos"):
        spectrum = exact_result.spectra[loss]
        assert spectrum.shape == (18,) and np.all(np.diff(spectrum) >= 0)
        assert spectrum[0] == exact_result[f"{loss}_min"] and spectrum[-1] == exact_result[f"{loss}_max"]
    assert exact_result.unconverged == [] and all(exact_result.converged(k) for k in exact_result)


def test_to_dict_is_json(exact_result):
    payload = json.loads(json.dumps(exact_result.to_dict(include_spectra=True)))
    assert set(SIX) <= set(payload["values"]) and len(payload["spectra"]["l2"]) == 18
    assert payload["diagnostics"]["cos_min"]["method"] == "exact"
    assert payload["converged"]["fusion"] is True


def test_methods_agree_on_a_small_problem(exact_result, x):
    lanczos = compute_proxies(tiny_mlp(), x, 1, method="lanczos", config=SolverConfig(tol=1e-8))
    for key in SIX:
        assert math.isclose(lanczos[key], exact_result[key], rel_tol=1e-6), key
    assert lanczos.spectra == {} and lanczos.method == "lanczos"
    paper = compute_proxies(tiny_mlp(), x, 1, method="paper", config=SolverConfig(paper_iterations=400))
    assert math.isclose(paper["l2_max"], exact_result["l2_max"], rel_tol=1e-3)
    for key, diag in paper.diagnostics.items():
        assert diag.method == "paper" and diag.converged == (diag.residual <= diag.tolerance), key


def test_auto_picks_exact_for_small_inputs_and_lanczos_for_large():
    assert resolve_method("auto", 12_288) == "exact"
    assert resolve_method("auto", 12_289) == "lanczos"
    assert resolve_method("auto", 100, SolverConfig(exact_max_dim=50)) == "lanczos"
    assert resolve_method("paper", 10) == "paper"
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_method("dense", 10)


def test_any_classifier_is_left_untouched():
    model = tiny_bn_convnet()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot_model(model)
    x = torch.randn((1, 2, 3, 3), generator=torch.Generator().manual_seed(1))
    result = compute_proxies(model, x, 2, losses=("l2", "cos", "cos-layer"))
    assert_model_unchanged(model, before)
    assert {"cos_layer_max", "cos_layer_min"} <= set(result) and "cos-layer" in result.spectra
    assert result["cos_layer_max"] >= result["cos_layer_min"]
    # eval mode: batch norm used its running statistics, not the batch's (train mode would give g = 0
    # for a batch of one through the normalisation, and another gradient)
    eval_norm = float(GradientOracle(model).gradient(x, 2).norm())
    assert math.isclose(result["grad_norm"], eval_norm, rel_tol=1e-6)


def test_custom_fusions(x):
    result = compute_proxies(tiny_mlp(), x, 0, losses=("l2", "cos-layer"),
                             fusions={"mixed": [("l2", "max"), ("cos-layer", "min")]})
    assert "fusion" not in result  # the paper's fusion needs l2 and cos
    assert math.isclose(result["mixed"], math.sqrt(result["l2_max"] * result["cos_layer_min"]), rel_tol=1e-12)
    assert result.converged("mixed")
    with pytest.raises(ConfigError, match="not among the losses"):
        compute_proxies(tiny_mlp(), x, 0, losses=("l2",), fusions={"bad": [("cos", "min")]})
    with pytest.raises(ConfigError, match="already a proxy name"):
        compute_proxies(tiny_mlp(), x, 0, losses=("l2",), fusions={"l2_max": [("l2", "min")]})


def test_geometric_fusion_rules():
    values = {"a_max": 4.0, "b_min": 9.0, "c_min": -1.0, "z_max": 0.0}
    assert math.isclose(geometric_fusion(values, [("a", "max"), ("b", "min")]), 6.0)
    assert math.isclose(geometric_fusion(values, [("a", "max")]), 4.0)
    assert math.isnan(geometric_fusion(values, [("a", "max"), ("c", "min")]))
    assert geometric_fusion(values, [("z", "max"), ("b", "min")]) == 0.0
    with pytest.raises(ConfigError, match="was not computed"):
        geometric_fusion(values, [("q", "max")])
    with pytest.raises(ConfigError):
        geometric_fusion(values, [])


def test_the_proxy_table_covers_every_loss_in_order():
    names = [d.name for d in proxy_table()]
    assert names[0] == "grad_norm" and names[-1] == "fusion"
    for loss in list_losses():
        for extreme in ("max", "min"):
            key = proxy_key(loss.name, extreme)
            assert key in names and key.isidentifier()
            definition = proxy_definition(key)
            assert (definition.kind, definition.loss, definition.extreme) == ("eigenvalue", loss.name, extreme)
    assert proxy_key("cos-layer", "min") == "cos_layer_min"
    assert proxy_definition("fusion").parts == (("l2", "max"), ("cos", "min"))
    assert [d.paper_name for d in proxy_table(["l2", "cos"])][1:5] == ["max", "min", "ang_max", "ang_min"]
    assert [d.name for d in proxy_table(["l2"])] == ["grad_norm", "l2_max", "l2_min"]  # no fusion without cos
    assert proxy_order(["fusion", "mine", "cos_min", "grad_norm", "l2_max"]) == [
        "grad_norm", "l2_max", "cos_min", "fusion", "mine"]
    assert proxy_title("l2_max") == "λ_max of H_l2 (paper: max)" and proxy_title("mine") == "mine"
    with pytest.raises(ConfigError, match="unknown proxy"):
        proxy_definition("l3_max")


def test_a_registered_proxy_is_computed_by_compute_proxies(monkeypatch):
    """The seam: one registration adds a gradient proxy and a fusion to compute_proxies' output."""
    monkeypatch.setattr(proxies, "_GRADIENT_PROXIES", dict(proxies._GRADIENT_PROXIES))
    monkeypatch.setattr(proxies, "_FUSIONS", dict(proxies._FUSIONS))
    proxies.register_gradient_proxy("grad_abs_max", "max |g*|", "the largest gradient entry",
                                    lambda g: float(g.abs().max()))
    proxies.register_fusion("l2_spread", [("l2", "max"), ("l2", "min")], "√(l2_max · l2_min)", "a test fusion")
    model = tiny_mlp()
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    result = compute_proxies(model, x, 1, losses=("l2",), method="exact")
    gradient = GradientOracle(model).gradient(x, 1)
    assert list(result) == ["grad_norm", "grad_abs_max", "l2_max", "l2_min", "l2_spread"]
    assert result["grad_abs_max"] == pytest.approx(float(gradient.abs().max()), rel=1e-12)
    assert result["l2_spread"] == pytest.approx(math.sqrt(result["l2_max"] * result["l2_min"]), rel=1e-12)
    assert result.fusions["l2_spread"] == (("l2", "max"), ("l2", "min"))


class _ThreeD(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :6].reshape(1, 2, 3)


class _WithWeights(_ThreeD):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return super().forward(x) * self.w


@pytest.mark.parametrize("case, error, match", [
    ("output", ModelError, "must return \\(1, classes\\)"),
    ("label", ConfigError, "out of range"),
    ("negative label", ConfigError, "out of range"),
    ("float label", ConfigError, "label must be an int"),
    ("3-d image", ModelError, "shape \\(1, C, H, W\\)"),
    ("batch of two", ModelError, "shape \\(1, C, H, W\\)"),
    ("wrong size", ModelError, "cannot take an image"),
    ("loss", ConfigError, "unknown matching loss"),
    ("no loss", ConfigError, "at least one"),
    ("method", ConfigError, "unknown method"),
])
def test_bad_input_raises_a_clear_error(case, error, match, x):
    model, image, label, kwargs = tiny_mlp(), x, 1, {}
    if case == "output":
        model = _WithWeights()
    elif case == "label":
        label = 3
    elif case == "negative label":
        label = -1
    elif case == "float label":
        label = 1.0
    elif case == "3-d image":
        image = x[0]
    elif case == "batch of two":
        image = torch.cat([x, x])
    elif case == "wrong size":
        image = torch.zeros(1, 2, 4, 4)
    elif case == "loss":
        kwargs = {"losses": ("l2", "l3")}
    elif case == "no loss":
        kwargs = {"losses": ()}
    elif case == "method":
        kwargs = {"method": "svd"}
    with pytest.raises(error, match=match):
        compute_proxies(model, image, label, **kwargs)


def test_a_saturated_model_has_no_cosine_proxy():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1000.0, 0.0]))
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProxyError, match="cosine"):
        compute_proxies(model, x, 0)
    assert compute_proxies(model, x, 0, losses=("l2",))["grad_norm"] == 0.0


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


LENET = ["proxies", "--dataset", "photos", "--index", "3", "--arch", "lenet", "--weights", "random",
         "--seed", "0", "--device", "cpu"]


def test_cli_json_on_lenet():
    code, text = run_cli(LENET + ["--method", "paper", "--paper-iterations", "5", "--json"])
    assert code == 0
    payload = json.loads(text)
    assert set(SIX) <= set(payload["values"])
    assert payload["method"] == "paper" and payload["input_dim"] == 3072
    assert payload["diagnostics"]["l2_min"]["iterations"] == 5
    assert payload["converged"]["l2_min"] is False  # 5 power steps cannot certify λ_min


def test_cli_table_marks_uncertain_values(capsys):
    code, text = run_cli(LENET + ["--method", "paper", "--paper-iterations", "3", "--losses", "l2"])
    assert code == 0
    assert "l2_min" in text and "UNCERTAIN" in text and "fusion" not in text


def test_cli_reports_a_bad_loss_as_one_line(capsys):
    assert main(LENET + ["--losses", "l3"]) == 2
    assert "unknown matching loss" in capsys.readouterr().err
