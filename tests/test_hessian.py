"""Hessians at x* and their eigen-solvers, checked against an independent dense reference.

The reference is ``torch.func.hessian`` of x ↦ loss(g(x), g*) in float64 on tiny models; the
closed forms, the generic forward-over-reverse path and every solver must agree with it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import vmap

from lavp_core.errors import ConfigError, ProxyError
from lavp_core.gradients import GradientOracle
from lavp_core.hessian import (
    HessianAtTruth,
    SolverConfig,
    _dense_matrix,
    _mirror_upper,
    _store_upper,
    closed_form_spectra,
    closed_form_tops,
    draw_generator,
    exact_spectra,
    lanczos_extreme,
    lanczos_top,
    lanczos_tops,
    paper_extremes,
    power_iteration,
    residual_of,
    retained_heap,
    solve,
    symmetric_spectrum,
    top_start_vector,
)
from lavp_core.losses import MatchingLoss, get_loss
from lavp_core.models import create_model, list_models


def _seeded(model: nn.Module, seed: int, scale: float) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def tiny_mlp() -> nn.Module:
    """(1, 2, 3, 3) -> 3 classes; its Hessians at x* are full rank (condition number ~50)."""
    return _seeded(nn.Sequential(nn.Flatten(), nn.Linear(18, 24), nn.Tanh(), nn.Linear(24, 3)), 0, 0.7)


def tiny_conv() -> nn.Module:
    """(1, 2, 5, 5) -> 4 classes through a convolution, a sigmoid and a linear layer."""
    return _seeded(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(27, 4)), 1, 0.8)


def image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def mlp_op() -> HessianAtTruth:
    return HessianAtTruth(GradientOracle(tiny_mlp(), dtype=torch.float64), image((2, 3, 3)), 1)


@pytest.fixture(scope="module")
def conv_op() -> HessianAtTruth:
    return HessianAtTruth(GradientOracle(tiny_conv(), dtype=torch.float64), image((2, 5, 5), 1), 2)


def reference_hessian(op: HessianAtTruth, loss: MatchingLoss) -> np.ndarray:
    """Independent dense Hessian (d, d) of x ↦ loss(g(x), g*) at x* by torch.func.hessian."""
    def matching_loss(x: torch.Tensor) -> torch.Tensor:
        return loss(op.gradient_fn(x), op.g_star, op.layout)

    return torch.func.hessian(matching_loss)(op.x_star).reshape(op.dim, op.dim).numpy()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("op_name", ["mlp_op", "conv_op"])
@pytest.mark.parametrize("loss_name", ["l2", "cos", "cos-layer"])
def test_dense_hessians_match_torch_func_hessian(op_name, loss_name, request):
    op = request.getfixturevalue(op_name)
    loss = get_loss(loss_name)
    reference = reference_hessian(op, loss)
    generic = op.dense(loss, closed_form=False)
    assert relative_error(generic, reference) < 1e-5
    if loss.closed_form is not None:
        assert relative_error(op.dense(loss), reference) < 1e-5


@pytest.mark.parametrize("loss_name", ["l2", "cos", "cos-layer"])
def test_hessian_vector_products_match_reference(mlp_op, loss_name):
    loss = get_loss(loss_name)
    reference = reference_hessian(mlp_op, loss)
    v = torch.randn(mlp_op.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = reference @ v.reshape(-1).numpy()
    for closed_form in (True, False):
        got = mlp_op.hvp(loss, v, closed_form=closed_form).reshape(-1).numpy()
        assert relative_error(got, expected) < 1e-5


def test_cosine_closed_form_is_rank_one_update_of_gram(mlp_op):
    gram = mlp_op.gram()
    w = mlp_op.vjp(mlp_op.unit_gradient).reshape(-1).numpy()
    expected = (gram - np.outer(w, w)) / mlp_op.g_norm ** 2
    mlp_op.cosine_from_gram(gram)
    np.testing.assert_allclose(gram, expected, rtol=1e-12, atol=1e-15)


def test_chunk_size_does_not_change_the_dense_hessian(mlp_op):
    loss = get_loss("cos")
    whole = mlp_op.dense(loss)
    for chunk in (1, 7):  # 7 does not divide d = 18: the last chunk is short
        np.testing.assert_allclose(mlp_op.dense(loss, config=SolverConfig(max_chunk=chunk)), whole,
                                   rtol=1e-12, atol=1e-14)
    generic = mlp_op.dense(loss, closed_form=False, config=SolverConfig(max_chunk=7))
    assert relative_error(generic, whole) < 1e-10


def test_dense_hessians_are_exactly_symmetric(mlp_op):
    for h in (mlp_op.gram(), mlp_op.dense(get_loss("cos-layer"), closed_form=False,
                                          config=SolverConfig(max_chunk=5))):
        np.testing.assert_array_equal(h, h.T)


def test_mirror_upper_copies_the_upper_triangle_across_blocks():
    rng = np.random.default_rng(1)
    d = 2100  # _block_rows(2100) = 998: three blocks, the last one short
    h = rng.standard_normal((d, d))
    expected = np.triu(h) + np.triu(h, 1).T
    _mirror_upper(h)
    np.testing.assert_array_equal(h, expected)


def test_symmetric_spectrum_matches_numpy_and_restores_the_matrix():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((60, 60))
    h = a @ a.T + np.diag(np.linspace(0, 1, 60))
    original = h.copy()
    eigenvalues, v_min, v_max = symmetric_spectrum(h)
    np.testing.assert_array_equal(h, original)  # one triangle was overwritten, and put back
    expected = np.linalg.eigvalsh(original)
    np.testing.assert_allclose(eigenvalues, expected, rtol=1e-10, atol=1e-12 * expected[-1])
    assert np.all(np.diff(eigenvalues) >= 0)
    for value, vector in ((expected[0], v_min), (expected[-1], v_max)):
        assert math.isclose(np.linalg.norm(vector), 1.0, rel_tol=1e-12)
        assert np.linalg.norm(original @ vector - value * vector) < 1e-10 * expected[-1]


@pytest.mark.parametrize("forms", [("l2", "cos"), ("l2",), ("cos",)])
@pytest.mark.parametrize("w_kind", ["random", "along e0", "zero"])
def test_closed_form_spectra_from_one_reduction_match_dense_references(forms, w_kind):
    """Both spectra from one reduction of A (after the reflection of w onto e0) against numpy on A and
    on (A − wwᵀ)·scale formed densely."""
    rng = np.random.default_rng(4)
    d = 50
    b = rng.standard_normal((d, 70))
    a = b @ b.T
    w = {"random": b @ rng.standard_normal(70) / 9, "along e0": np.eye(d)[0] * 2.5, "zero": np.zeros(d)}[w_kind]
    scale = 0.37
    expected = {"l2": a, "cos": (a - np.outer(w, w)) * scale}
    h = a.copy()
    got = closed_form_spectra(h, w if "cos" in forms else None, scale, forms)
    assert list(got) == list(forms)
    for form, (eigenvalues, v_min, v_max) in got.items():
        reference = np.linalg.eigvalsh(expected[form])
        norm = abs(reference).max()
        np.testing.assert_allclose(eigenvalues, reference, rtol=0, atol=1e-12 * norm)
        assert np.all(np.diff(eigenvalues) >= 0)
        for value, vector in ((eigenvalues[0], v_min), (eigenvalues[-1], v_max)):
            assert math.isclose(np.linalg.norm(vector), 1.0, rel_tol=1e-12)
            assert np.linalg.norm(expected[form] @ vector - value * vector) < 1e-11 * norm
    one = closed_form_spectra(np.array([[3.0]]), np.array([1.5]), 2.0, ("l2", "cos"))
    assert float(one["l2"][0][0]) == 3.0 and math.isclose(float(one["cos"][0][0]), (3.0 - 2.25) * 2.0)
    with pytest.raises(ValueError, match="forms"):
        closed_form_spectra(a.copy(), None, 1.0, ("cos",))


def test_gram_takes_jt_u_by_forward_mode_only_when_it_is_the_same_map(conv_op):
    """Jᵀ U of the dense path comes by forward mode over θ ↦ ∇ₓℓ(θ, x*) when that agrees with the vjp
    through g; an operator whose ℓ is not the loss g differentiates (another label) falls back to the vjp."""
    reference = reference_hessian(conv_op, get_loss("l2"))
    assert relative_error(conv_op.gram(), reference) < 1e-10 and conv_op.gram_transpose == "forward"
    u = vmap(conv_op.jvp)(image((3, 2, 5, 5), 9)[0])
    np.testing.assert_allclose(conv_op._transpose_columns()(u).numpy(), vmap(conv_op.vjp)(u).numpy(),
                               rtol=0, atol=1e-13 * float(vmap(conv_op.vjp)(u).abs().max()))
    mismatched = HessianAtTruth(conv_op.oracle, conv_op.x_star.unsqueeze(0), 2)
    mismatched.label = 0  # ℓ(θ, x) with label 0 while g differentiates the loss of label 2
    transpose = mismatched._transpose_columns()
    assert mismatched.gram_transpose == "reverse"
    assert torch.equal(transpose(u), vmap(mismatched.vjp)(u))
    assert relative_error(mismatched.gram(), reference) < 1e-10


def test_retained_heap_nests_and_leaves_results_alone(mlp_op):
    whole = mlp_op.gram()
    with retained_heap(), retained_heap():
        inside = mlp_op.gram()
        big = np.ones(5 * 2 ** 20)  # 40 MB from the heap while mmap is off
    assert float(big.sum()) == 5 * 2 ** 20
    np.testing.assert_array_equal(inside, whole)


def test_exact_spectra_match_reference(mlp_op):
    losses = [get_loss(name) for name in ("cos", "l2", "cos-layer")]
    spectra = exact_spectra(mlp_op, losses, SolverConfig())
    assert list(spectra) == ["cos", "l2", "cos-layer"]  # in the order asked
    for loss in losses:
        expected = np.linalg.eigvalsh(reference_hessian(mlp_op, loss))
        result = spectra[loss.name]
        assert result.eigenvalues.shape == (mlp_op.dim,)
        np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-5, atol=1e-9 * expected[-1])
        assert math.isclose(result.max.value, expected[-1], rel_tol=1e-8)
        assert math.isclose(result.min.value, expected[0], rel_tol=1e-6)
        for extreme in (result.max, result.min):
            assert extreme.method == "exact" and extreme.converged
            assert extreme.residual < 1e-8 and extreme.iterations == mlp_op.dim and extreme.seconds >= 0


def test_lanczos_matches_exact(mlp_op):
    for name in ("l2", "cos"):
        loss = get_loss(name)
        expected = np.linalg.eigvalsh(reference_hessian(mlp_op, loss))
        top = lanczos_extreme(mlp_op, loss, "max", SolverConfig(tol=1e-8))
        bottom = lanczos_extreme(mlp_op, loss, "min", SolverConfig(tol=1e-8), scale=abs(top.value))
        assert math.isclose(top.value, expected[-1], rel_tol=1e-8)
        assert math.isclose(bottom.value, expected[0], rel_tol=1e-6)
        assert top.converged and bottom.converged and top.method == "lanczos"
        assert top.residual <= 1e-8 and bottom.residual <= 1e-8 and 0 < top.iterations <= 600


def test_linearised_products_equal_forward_mode():
    op = HessianAtTruth(GradientOracle(tiny_conv(), dtype=torch.float64), image((2, 5, 5), 1), 2, "forward")
    v = image((2, 5, 5), 7)[0]
    before = op.single_jvp(v)  # plain jvp until linearise() is called
    op.linearise()
    after = op.single_jvp(v)
    assert torch.allclose(before, op.jvp(v), rtol=0, atol=0)
    assert float((after - before).norm()) <= 1e-12 * float(before.norm())


def test_reverse_jacobian_products_equal_forward_mode(conv_op):
    """Jv as the transpose of the stored vjp equals forward-mode Jv, single and vmapped, and so do
    the Hessian-vector products built on either."""
    assert conv_op.jacobian_products == "reverse"
    directions = image((3, 2, 5, 5), 8)[0]
    forward = torch.stack([conv_op.jvp(v) for v in directions])
    for got in (torch.stack([conv_op.jv(v) for v in directions]), vmap(conv_op.jv)(directions)):
        assert float((got - forward).norm()) <= 1e-13 * float(forward.norm())
    forward_op = HessianAtTruth(conv_op.oracle, conv_op.x_star.unsqueeze(0), 2, "forward")
    v = directions[0]
    for loss in (get_loss("l2"), get_loss("cos")):
        a, b = conv_op.hvp(loss, v), forward_op.hvp(loss, v)
        assert float((a - b).norm()) <= 1e-13 * float(b.norm())
    with pytest.raises(ConfigError, match="jacobian_products"):
        HessianAtTruth(conv_op.oracle, conv_op.x_star.unsqueeze(0), 2, "sideways")


def test_lanczos_top_with_restarts_and_budget(mlp_op):
    loss = get_loss("cos")
    expected = np.linalg.eigvalsh(reference_hessian(mlp_op, loss))
    start = top_start_vector(mlp_op, torch.Generator().manual_seed(0))
    assert math.isclose(float(start.norm()), 1.0, rel_tol=1e-12)
    seen = []
    value, vector, products, converged = lanczos_top(mlp_op, loss, start, tol=1e-10, budget=200, basis_size=3,
                                                     on_step=lambda k, theta: seen.append((k, theta)))
    assert converged and math.isclose(value, expected[-1], rel_tol=1e-9)
    assert [k for k, _ in seen] == list(range(1, products + 1))
    hv = mlp_op.hvp(loss, vector)
    assert float((hv - value * vector).norm()) <= 1e-8 * abs(value)
    # Ritz values only ever approach λ_max from below within one basis
    assert all(theta <= expected[-1] * (1 + 1e-12) for _, theta in seen)
    value, _, products, converged = lanczos_top(mlp_op, loss, start, tol=1e-14, budget=2, basis_size=3)
    assert products == 2 and not converged and value <= expected[-1] * (1 + 1e-12)


def test_lanczos_out_of_budget_is_marked_unconverged(mlp_op):
    loss = get_loss("l2")
    expected = np.linalg.eigvalsh(reference_hessian(mlp_op, loss))
    result = lanczos_extreme(mlp_op, loss, "min", SolverConfig(lanczos_min_products=4, lanczos_ncv_min=4))
    assert not result.converged and result.iterations == 4
    assert "did not converge" in result.note
    assert result.value >= expected[0] - 1e-12  # a Ritz value never undershoots λ_min
    assert result.residual > result.tolerance


def test_paper_recipe_finds_lambda_max_and_reports_honestly():
    model = tiny_mlp()
    x = image((2, 3, 3)).float()
    op = HessianAtTruth(GradientOracle(model, dtype=torch.float64), x, 1)
    fd_op = HessianAtTruth(GradientOracle(model), x, 1)  # the model's own float32, as in the paper
    loss = get_loss("l2")
    expected = np.linalg.eigvalsh(reference_hessian(op, loss))
    config = SolverConfig(paper_iterations=300, paper_fd_step=1e-2)
    top, bottom = paper_extremes(fd_op, op, loss, config)
    assert math.isclose(top.value, expected[-1], rel_tol=1e-3)
    assert top.method == bottom.method == "paper"
    for result in (top, bottom):
        assert result.converged == (result.residual <= config.tol)
        assert 1 <= result.iterations <= 300
    short = paper_extremes(fd_op, op, loss, SolverConfig(paper_iterations=3))[1]
    assert not short.converged and short.iterations == 3 and "budget" in short.note


def test_power_iteration_on_a_known_spectrum():
    diagonal = torch.tensor([1.0, 2.0, 5.0, 10.0], dtype=torch.float64)

    def apply(v):
        return diagonal * v

    start = torch.ones(4, dtype=torch.float64)
    steps = list(power_iteration(apply, start, max_iterations=200))
    assert math.isclose(steps[-1].value, 10.0, rel_tol=1e-12) and steps[-1].residual < 1e-10
    assert [s.iteration for s in steps] == list(range(1, 201))
    shifted = list(power_iteration(apply, start, shift=10.0, max_iterations=200))
    assert math.isclose(shifted[-1].value, 1.0, rel_tol=1e-10)


def test_loss_with_a_kink_at_the_truth_is_refused(mlp_op):
    def l1(g, g_star, layout=None):
        return torch.sum(torch.abs(g - g_star))

    with pytest.raises(ProxyError, match="'l1' is not twice differentiable"):
        solve(mlp_op, [MatchingLoss("l1", "sum of absolute differences", l1)], "exact")


def test_loss_with_a_non_finite_hessian_is_refused(mlp_op):
    def root(g, g_star, layout=None):
        return torch.sqrt(torch.sum((g - g_star) ** 2))

    with pytest.raises(ProxyError, match="'root'"):
        solve(mlp_op, [MatchingLoss("root", "unsquared distance", root)], "lanczos")
    with pytest.raises(ProxyError, match="non-finite"):  # the dense path checks too
        mlp_op.dense(MatchingLoss("root", "unsquared distance", root), closed_form=False)


def test_zero_gradient_makes_the_cosine_hessian_undefined():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1000.0, 0.0]))  # softmax is exactly one-hot: g* = 0
    op = HessianAtTruth(GradientOracle(model, dtype=torch.float64), image((1, 2, 2)), 0)
    assert op.g_norm == 0
    with pytest.raises(ProxyError, match="cosine"):
        solve(op, [get_loss("cos")], "exact")


def test_bad_solver_settings():
    with pytest.raises(ConfigError):
        SolverConfig(precision="float16")
    with pytest.raises(ConfigError):
        SolverConfig(tol=0)
    with pytest.raises(ConfigError):
        SolverConfig(paper_iterations=0)
    with pytest.raises(ConfigError, match="unknown eigen-solver"):
        solve(HessianAtTruth(GradientOracle(tiny_mlp()), image((2, 3, 3)).float(), 0), [get_loss("l2")],
              "power")


@pytest.mark.parametrize("spec", list_models(), ids=lambda spec: spec.name)
def test_reverse_jacobian_products_hold_on_every_registered_model(spec):
    """The transpose of the stored vjp needs every layer's backward to be differentiable with
    respect to its incoming gradient; check it against forward mode on each architecture."""
    model = create_model(spec.name, 10, weights="random", seed=0)
    size = 32 if spec.input_size <= 32 else 16  # the 224×224 models are fully convolutional
    op = HessianAtTruth(GradientOracle(model, dtype=torch.float64), image((3, size, size), 2), 3)
    v = image((3, size, size), 3)[0]
    forward = op.jvp(v)
    assert float(forward.norm()) > 0
    assert float((op.jv(v) - forward).norm()) <= 1e-10 * float(forward.norm())


@pytest.mark.parametrize("spec", list_models(), ids=lambda spec: spec.name)
def test_dense_path_takes_jt_u_by_forward_mode_on_every_registered_model(spec):
    """The dense path's Jᵀ U by forward mode over the parameters agrees with the vjp through g (the
    check _transpose_columns makes) on each architecture, so none falls back to the slower vjp."""
    model = create_model(spec.name, 10, weights="random", seed=0)
    size = 32 if spec.input_size <= 32 else 16
    op = HessianAtTruth(GradientOracle(model, dtype=torch.float64), image((3, size, size), 2), 3)
    u = torch.randn(op.num_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = op.vjp(u)
    assert float((op._input_gradient_jvp(u) - expected).norm()) <= 1e-10 * float(expected.norm())
    op._transpose_columns()
    assert op.gram_transpose == "forward"


@pytest.mark.parametrize("basis_size", [60, 4])  # 4: thick restarts along the way
def test_closed_form_tops_share_one_subspace(conv_op, basis_size):
    references = {form: np.linalg.eigvalsh(reference_hessian(conv_op, get_loss(form)))[-1] for form in ("l2", "cos")}
    seen = []
    tops = closed_form_tops(conv_op, ["l2", "cos"], torch.Generator().manual_seed(0), tol=1e-10, budget=300,
                            basis_size=basis_size, on_step=lambda k, thetas: seen.append((k, dict(thetas))))
    for form, top in tops.items():
        assert top.converged and math.isclose(top.value, references[form], rel_tol=1e-9)
        # the residual assembled from stored products is the true one
        true = residual_of(conv_op, get_loss(form), top.value, top.vector) / abs(top.value)
        assert math.isclose(top.residual, true, rel_tol=1e-6, abs_tol=1e-14) and true <= 1e-10
        # Rayleigh–Ritz values never exceed λ_max
        assert all(thetas[form] <= references[form] * (1 + 1e-12) for _, thetas in seen)
    products = [k for k, _ in seen]
    assert products == list(range(1, products[-1] + 1))
    alone = {form: closed_form_tops(conv_op, [form], torch.Generator().manual_seed(0), tol=1e-10, budget=300,
                                    basis_size=basis_size)[form].products for form in ("l2", "cos")}
    assert products[-1] < sum(alone.values())  # both together cost less than one after the other


def test_closed_form_tops_budget_and_bad_forms(mlp_op):
    tops = closed_form_tops(mlp_op, ["cos"], torch.Generator().manual_seed(0), tol=1e-15, budget=2, basis_size=10)
    assert not tops["cos"].converged and tops["cos"].products == 2 and tops["cos"].residual > 1e-15
    with pytest.raises(ConfigError, match="closed forms"):
        closed_form_tops(mlp_op, ["cos-layer"], torch.Generator().manual_seed(0), tol=1e-4, budget=10, basis_size=5)
    with pytest.raises(ConfigError, match="closed-form losses only"):
        lanczos_tops(mlp_op, [get_loss("cos-layer")])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_dense_matrix_pages_become_resident_only_where_written():
    """The exact path writes only the upper triangle while its chunks run; with numpy's default
    (transparent huge pages) the whole matrix would become resident at once."""
    def resident_mib() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    d = 3000
    h = _dense_matrix(d)
    assert h.shape == (d, d) and h.dtype == np.float64 and h.flags.c_contiguous and h.flags.writeable
    before = resident_mib()
    rows = np.ones((100, d))
    for start in range(0, d, 100):
        _store_upper(h, start, rows, "l2")
    grown = resident_mib() - before
    assert grown < 0.7 * 8 * d * d / 2 ** 20
    _mirror_upper(h)
    assert bool((h == 1.0).all())


def test_draw_generators_are_keyed_by_seed_and_purpose():
    def draw(seed, *purpose):
        return torch.randn(4, generator=draw_generator(seed, *purpose), dtype=torch.float64)

    assert torch.equal(draw(0, "paper", "cos", "min"), draw(0, "paper", "cos", "min"))
    others = [draw(1, "paper", "cos", "min"), draw(0, "paper", "cos", "max"), draw(0, "paper", "l2", "min"),
              draw(0, "paper", "cosmin"), draw(0, "paper", "cos min")]
    assert all(not torch.equal(draw(0, "paper", "cos", "min"), other) for other in others)


def _as_tuple(result):
    return (result.value, result.residual, result.iterations, result.converged, result.note)


def test_paper_values_do_not_depend_on_the_other_losses_requested():
    """Each start vector has its own generator: cos's values are bit-identical alone or after l2
    (with one generator shared across losses, cos_min with 5 iterations moved by half)."""
    model = tiny_mlp()
    x = image((2, 3, 3)).float()
    op = HessianAtTruth(GradientOracle(model, dtype=torch.float64), x, 1)
    fd_op = HessianAtTruth(GradientOracle(model), x, 1)
    config = SolverConfig(paper_iterations=5)
    alone = solve(op, [get_loss("cos")], "paper", config, fd_op=fd_op)["cos"]
    after_l2 = solve(op, [get_loss("l2"), get_loss("cos")], "paper", config, fd_op=fd_op)["cos"]
    assert not alone.min.converged  # a budget-limited value: it depends on its start vector
    for which in ("max", "min"):
        assert _as_tuple(getattr(alone, which)) == _as_tuple(getattr(after_l2, which))
    other_seed = solve(op, [get_loss("cos")], "paper", SolverConfig(paper_iterations=5, seed=1), fd_op=fd_op)
    assert other_seed["cos"].min.value != alone.min.value


def test_lanczos_values_do_not_depend_on_the_other_losses_requested(mlp_op):
    """λ_min of every loss, and λ_max of a loss without a closed form, are bit-identical whichever
    other losses are solved alongside; λ_max of the closed forms shares one subspace, so it only
    agrees to the tolerance."""
    config = SolverConfig(lanczos_min_products=6, lanczos_ncv_min=4)
    names = ("cos", "cos-layer")
    alone = {name: solve(mlp_op, [get_loss(name)], "lanczos", config)[name] for name in names}
    together = solve(mlp_op, [get_loss(name) for name in ("l2", *names)], "lanczos", config)
    for name in names:
        assert not alone[name].min.converged  # budget-limited: it depends on its start vector
        assert _as_tuple(alone[name].min) == _as_tuple(together[name].min)
    assert _as_tuple(alone["cos-layer"].max) == _as_tuple(together["cos-layer"].max)
    assert math.isclose(alone["cos"].max.value, together["cos"].max.value, rel_tol=config.tol)


def test_solvers_leave_torch_global_generator_alone(mlp_op, monkeypatch):
    def refuse(seed):
        raise AssertionError("torch.manual_seed was called")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    state = torch.get_rng_state()
    config = SolverConfig(paper_iterations=3, lanczos_min_products=6, lanczos_ncv_min=4)
    for method in ("exact", "lanczos", "paper"):
        solve(mlp_op, [get_loss("l2"), get_loss("cos-layer")], method, config)
    assert torch.equal(torch.get_rng_state(), state)


def test_import_leaves_warning_filters_alone_and_forward_mode_is_quiet():
    """Importing the package changes no warning filter; torch's two forward-mode notices are silenced
    only around the package's own forward-mode calls. In a fresh process: the first torch.func.jvp
    of a process is the one that warns."""
    script = textwrap.dedent("""
        import warnings
        import numpy, scipy.linalg, scipy.sparse.linalg, torch, torch.nn as nn
        import lavp_core.errors, lavp_core.gradients, lavp_core.losses
        before = list(warnings.filters)
        import lavp_core.hessian
        from lavp_core.hessian import HessianAtTruth, exact, krylov, paper, solver
        assert warnings.filters == before, "importing lavp_core.hessian changed warnings.filters"
        from lavp_core.gradients import GradientOracle
        from lavp_core.losses import get_loss
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        x = torch.linspace(-1, 1, 4, dtype=torch.float64).view(1, 1, 2, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = HessianAtTruth(GradientOracle(model, dtype=torch.float64), x, 1, "forward")
            op.jvp(x[0])
            op.linearise()
            op.autodiff_hvp(get_loss("cos-layer"), x[0])
            notices = [str(w.message) for w in caught if "jit.script" in str(w.message) or "get_attr" in str(w.message)]
            assert not notices, notices
            # outside the package's calls the same notice is not filtered
            warnings.warn("`torch.jit.script` is deprecated (outside the package)", FutureWarning)
            assert "outside the package" in str(caught[-1].message)
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
