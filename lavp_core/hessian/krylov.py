"""The ``lanczos`` method: matrix-free Krylov solvers for large inputs.

λ_max of the closed forms by one subspace iteration over products of JᵀJ started from Jᵀĝ
(:func:`closed_form_tops`: Rayleigh–Ritz for ``l2`` and ``cos`` at once, the cosine's rank-one term
exact because Jᵀĝ stays in the basis; the top of these Hessians is well separated and Jᵀĝ leans
towards it, so a handful of products certify both), of other losses by Lanczos with full
reorthogonalisation (:func:`lanczos_top`); λ_min by ARPACK's implicitly restarted Lanczos
(``scipy.sparse.linalg.eigsh``) within a product budget.

Random draws: unless a generator is passed, each draw has its own generator from
:func:`~lavp_core.hessian.draws.draw_generator`, keyed by ``config.seed`` and what it is for, so that
λ_min of a loss, and λ_max of a loss without a closed form, do not depend on which other losses are
solved alongside. λ_max of the closed forms does: ``l2`` and ``cos`` share one subspace (both for the
cost of about one), grown by whichever form's residual is worst, so asking for one or both gives
values that agree to the tolerance, not bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sparse_linalg
import torch

from ..errors import ConfigError, ProxyError
from ..losses import MatchingLoss
from .config import CLOSED_FORMS, DEFAULT_SOLVER, EXTREMES, ClosedForm, EigenResult, Extreme, SolverConfig
from .draws import draw_generator
from .operators import HessianAtTruth
from .residuals import _result, _to_input


class _BudgetSpent(Exception):
    pass


class _RecordingOperator(sparse_linalg.LinearOperator):
    """H as a float64 LinearOperator; remembers the last ``keep`` (v, Hv) pairs and stops at a budget."""

    def __init__(self, op: HessianAtTruth, loss: MatchingLoss, budget: int, keep: int):
        super().__init__(dtype=np.float64, shape=(op.dim, op.dim))
        self.op, self.loss, self.budget, self.keep = op, loss, budget, keep
        self.products = 0
        self.history: list[tuple[np.ndarray, np.ndarray]] = []

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        if self.products >= self.budget:
            raise _BudgetSpent
        self.products += 1
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        hv = self.op.hvp(self.loss, _to_input(self.op, v)).reshape(-1).detach()
        hv = hv.to("cpu", torch.float64).numpy()
        if not np.isfinite(hv).all():
            raise ProxyError(f"a Hessian-vector product of matching loss {self.loss.name!r} at x* is not "
                             f"finite; the loss or the model is not twice differentiable at this image")
        self.history = (self.history + [(v.copy(), hv)])[-self.keep:]
        return hv

    def ritz(self, which: Extreme) -> tuple[float, np.ndarray] | None:
        """The extreme Ritz pair of H on the span of the remembered vectors (Rayleigh–Ritz)."""
        if not self.history:
            return None
        v = np.stack([p[0] for p in self.history], axis=1)  # (d, m)
        hv = np.stack([p[1] for p in self.history], axis=1)  # (d, m)
        u, s, wt = np.linalg.svd(v, full_matrices=False)
        rank = int(np.sum(s > s[0] * 1e-10))
        basis = u[:, :rank]  # orthonormal (d, r)
        h_basis = hv @ (wt[:rank].T / s[:rank])  # H basis (d, r), since basis = v wtᵀ diag(1/s)
        small = basis.T @ h_basis
        values, vectors = np.linalg.eigh(0.5 * (small + small.T))
        i = -1 if which == "max" else 0
        return float(values[i]), basis @ vectors[:, i]


def top_start_vector(op: HessianAtTruth, generator: torch.Generator) -> torch.Tensor:
    """A unit start vector (C, H, W) for λ_max: Jᵀĝ, the input direction that moves the weight
    gradient most along itself, which leans strongly towards the top eigenvector of JᵀJ (and of the
    cosine Hessian), plus a small random part so that no eigen-direction is missed entirely."""
    noise = torch.randn(op.dim, generator=generator, dtype=torch.float64).to(op.device, op.dtype).view(op.shape)
    noise = noise / noise.norm()
    lean = op.vjp(op.g_star / op.g_norm) if op.g_norm > 0 and math.isfinite(op.g_norm) else torch.zeros_like(noise)
    norm = float(lean.norm())
    v = lean / norm + 1e-2 * noise if norm > 0 and math.isfinite(norm) else noise
    return v / v.norm()


def lanczos_top(op: HessianAtTruth, loss: MatchingLoss, start: torch.Tensor, *, tol: float, budget: int,
                basis_size: int, on_step: Callable[[int, float], None] | None = None
                ) -> tuple[float, torch.Tensor | None, int, bool]:
    """λ_max of one loss's Hessian at x* by a Lanczos iteration with full reorthogonalisation.

    After each Hessian-vector product the largest Ritz value θ of the tridiagonal matrix and its
    residual estimate β·|s_last| (equal to ‖Hy − θy‖ for the Ritz vector y in exact arithmetic) are
    updated; the iteration stops when that estimate is at most ``tol``·|θ|, when the Krylov space is
    invariant, or after ``budget`` products. Every ``basis_size`` products it restarts from the
    current Ritz vector. ``on_step(products, θ)`` sees each estimate (for benchmarks).

    Returns ``(θ, Ritz vector (C, H, W) or None, products, converged)``.
    """
    q = start / start.norm()
    products, theta, ritz, converged = 0, math.nan, None, False
    while products < budget and not converged:
        basis: list[torch.Tensor] = []  # orthonormal Lanczos vectors, flattened (d,)
        alphas: list[float] = []
        betas: list[float] = []
        q = q.reshape(-1)
        while len(basis) < basis_size and products < budget:
            basis.append(q)
            w = op.hvp(loss, q.view(op.shape)).reshape(-1).detach()
            products += 1
            if not bool(torch.isfinite(w).all()):
                raise ProxyError(f"a Hessian-vector product of matching loss {loss.name!r} at x* is not "
                                 f"finite; the loss or the model is not twice differentiable at this image")
            alphas.append(float(torch.dot(q, w)))
            stacked = torch.stack(basis, dim=1)  # (d, k)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - stacked @ (stacked.T @ w)
            beta = float(w.norm())
            values, vectors = scipy.linalg.eigh_tridiagonal(np.asarray(alphas), np.asarray(betas))
            theta, s = float(values[-1]), vectors[:, -1]
            estimate = beta * abs(float(s[-1]))
            if on_step is not None:
                on_step(products, theta)
            coefficients = torch.as_tensor(s, dtype=stacked.dtype, device=stacked.device)
            ritz = stacked @ coefficients
            if estimate <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-300):
                converged = True
                break
            betas.append(beta)
            q = w / beta
        q = ritz  # explicit restart from the Ritz vector
    return theta, (ritz.view(op.shape) if ritz is not None else None), products, converged


@dataclass
class TopRitz:
    """The current top Ritz pair of one closed-form Hessian in :func:`closed_form_tops`."""

    value: float = math.nan
    vector: torch.Tensor | None = None  # (C, H, W)
    residual: float = math.inf  # ‖Hy − θy‖ / |θ|, computed explicitly from the stored products
    products: int = 0  # products of JᵀJ spent when it converged (or so far)
    seconds: float = 0.0
    converged: bool = False


def closed_form_tops(op: HessianAtTruth, forms: Sequence[ClosedForm], generator: torch.Generator, *, tol: float,
                     budget: int, basis_size: int,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, TopRitz]:
    """λ_max of the closed-form Hessians (``"l2"``: A = JᵀJ; ``"cos"``: (A − wwᵀ)/‖g*‖², w = Jᵀĝ)
    from one subspace of products of A, so that asking for both costs little more than one.

    The basis V (orthonormal, d × k) starts with ŵ = w/‖w‖, and the products AV are kept. Because w
    lies in span(V), each Hessian's Rayleigh–Ritz matrix is exact without further products:
    VᵀAV for ``l2``, (VᵀAV − zzᵀ)/‖g*‖² with z = Vᵀw for ``cos``; and so is each Ritz vector's residual,
    Hy − θy, assembled from AV. After each product the forms whose relative residual is at most
    ``tol`` are done; V grows by the residual of the worst remaining one (a random direction of norm
    1e-2 is added to the first such step, so that no eigen-direction is missed entirely). For one form
    this spans the same Krylov space as Lanczos from ŵ. At ``basis_size`` vectors V restarts thick,
    from ŵ and the current Ritz vectors, whose products are combinations of AV (no product spent).
    Stops when every form is done, when V cannot grow (the subspace is invariant, so the Ritz pairs
    are exact), or after ``budget`` products. ``on_step(products, {form: θ})`` sees each estimate.
    ``generator`` draws the one random direction (d,); it is drawn even if never used.

    The forms share the subspace, so each form's θ depends on which forms are asked for (to within
    ``tol``, when converged): λ_max of ``cos`` alone and with ``l2`` are not bit-identical.
    """
    unknown = [form for form in forms if form not in CLOSED_FORMS]
    if unknown or not forms:
        raise ConfigError(f"closed_form_tops takes the closed forms 'l2' and 'cos', got {list(forms)!r}")
    began = time.perf_counter()
    d = op.dim
    has_gradient = op.g_norm > 0 and math.isfinite(op.g_norm)
    w = (op.vjp(op.unit_gradient).reshape(-1).detach() if has_gradient or "cos" in forms
         else torch.zeros(d, dtype=op.dtype, device=op.device))
    scale = op.g_norm ** 2 if has_gradient else 1.0
    noise = torch.randn(d, generator=generator, dtype=torch.float64).to(op.device, op.dtype)
    basis: list[torch.Tensor] = []  # orthonormal (d,)
    images: list[torch.Tensor] = []  # A v for each v in basis
    found = {form: TopRitz() for form in forms}
    products = 0

    def grow(v: torch.Tensor) -> bool:
        nonlocal products
        before = float(v.norm())
        if basis:
            stacked = torch.stack(basis, dim=1)
            for _ in range(2):  # orthogonalise twice
                v = v - stacked @ (stacked.T @ v)
        norm = float(v.norm())
        if not norm > 1e-10 * before or not math.isfinite(norm):
            return False
        v = v / norm
        av = op.vjp(op.single_jvp(v.view(op.shape))).reshape(-1).detach()
        products += 1
        if not bool(torch.isfinite(av).all()):
            raise ProxyError("a Hessian-vector product at x* is not finite; the model is not twice "
                             "differentiable at this image")
        basis.append(v)
        images.append(av)
        return True

    w_norm = float(w.norm())
    first = w / w_norm if w_norm > 0 and math.isfinite(w_norm) else noise
    grow(first)
    noise_added = first is noise
    while True:
        v_mat, av_mat = torch.stack(basis, dim=1), torch.stack(images, dim=1)  # (d, k)
        projected = (v_mat.T @ av_mat).detach().to("cpu", torch.float64).numpy()
        projected = 0.5 * (projected + projected.T)
        z = (v_mat.T @ w).detach().to("cpu", torch.float64).numpy()
        worst, worst_residual = None, -1.0
        for form, state in found.items():
            if state.converged:
                continue
            matrix = projected if form == "l2" else (projected - np.outer(z, z)) / scale
            values, vectors = np.linalg.eigh(matrix)
            theta, coefficients = float(values[-1]), vectors[:, -1]
            c = torch.as_tensor(coefficients, dtype=op.dtype, device=op.device)
            y, ay = v_mat @ c, av_mat @ c
            hy = ay if form == "l2" else (ay - w * torch.dot(w, y)) / scale
            r = hy - theta * y
            relative = float(r.norm()) / abs(theta) if theta != 0 else math.inf
            state.value, state.vector, state.residual = theta, y.view(op.shape), relative
            state.products, state.seconds = products, time.perf_counter() - began
            if relative <= tol:
                state.converged = True
            elif relative > worst_residual:
                worst, worst_residual = r, relative
        if on_step is not None:
            on_step(products, {form: state.value for form, state in found.items()})
        if worst is None or products >= budget:
            break
        if len(basis) >= basis_size:  # thick restart from ŵ and the Ritz vectors: no products spent
            keep = [v_mat.T @ state.vector.reshape(-1) for state in found.values()]  # V orthonormal
            coefficients = torch.stack([torch.eye(len(basis), dtype=op.dtype, device=op.device)[0], *keep], 1)
            q, _ = torch.linalg.qr(coefficients)
            basis, images = list((v_mat @ q).T), list((av_mat @ q).T)
        if not noise_added:
            worst = worst + 1e-2 * float(worst.norm()) * noise / float(noise.norm())
            noise_added = True
        if not grow(worst):  # the subspace is invariant: its Ritz pairs are exact
            for state in found.values():
                state.converged = state.converged or state.residual <= tol
            break
    return found


def lanczos_tops(op: HessianAtTruth, losses: Sequence[MatchingLoss], config: SolverConfig = DEFAULT_SOLVER,
                 generator: torch.Generator | None = None) -> dict[str, EigenResult]:
    """λ_max of closed-form losses by :func:`closed_form_tops` (one shared subspace), each certified
    by an exact residual. Losses without a closed form are refused (use :func:`lanczos_extreme`).

    The subspace's random direction comes from ``generator``, or by default from
    ``draw_generator(config.seed, "closed-form-tops", *forms)`` (forms ``l2`` first): keyed by the set
    of forms, since the shared subspace makes each value depend on that set anyway (see
    :func:`closed_form_tops`), and by nothing else.
    """
    if any(loss.closed_form is None for loss in losses):
        raise ConfigError("lanczos_tops takes closed-form losses only ('l2', 'cos')")
    forms = sorted({loss.closed_form for loss in losses}, key=lambda form: form != "l2")
    if generator is None:
        generator = draw_generator(config.seed, "closed-form-tops", *forms)
    tops = closed_form_tops(op, forms, generator, tol=config.tol, budget=config.lanczos_max_products,
                            basis_size=max(3, min(config.lanczos_ncv_max, op.dim)))
    out = {}
    for loss in losses:
        top = tops[loss.closed_form]
        note = "" if top.converged else (f"Lanczos did not converge within {config.lanczos_max_products} "
                                         f"Hessian-vector products; the value is the best Ritz estimate so far")
        out[loss.name] = _result(op, loss, "max", "lanczos", top.value, top.vector, top.products, top.seconds,
                                 config, abs(top.value), top.converged, note)
    return out


def lanczos_extreme(op: HessianAtTruth, loss: MatchingLoss, which: Extreme,
                    config: SolverConfig = DEFAULT_SOLVER, generator: torch.Generator | None = None,
                    scale: float | None = None) -> EigenResult:
    """λ_max or λ_min of one loss's Hessian at x* by Lanczos on Hessian-vector products.

    λ_max: :func:`lanczos_top` from :func:`top_start_vector`. λ_min: ARPACK's implicitly restarted
    Lanczos (the bottom of these spectra is clustered). Each stops at ``config.tol`` or at its product
    budget; an unconverged value is the best Rayleigh–Ritz estimate so far, marked unconverged.
    ``scale`` (|λ_max| when known) gives ``residual_vs_norm``.

    The start vector comes from ``generator`` when one is passed, else from its own generator,
    ``draw_generator(config.seed, "lanczos-top", loss name)`` for λ_max (closed forms: see
    :func:`lanczos_tops`) and ``draw_generator(config.seed, "lanczos-min", loss name)`` for λ_min; so
    λ_min of a loss, like λ_max of a loss without a closed form, does not depend on which other losses
    were solved before it.
    """
    if which not in EXTREMES:
        raise ConfigError(f"which must be 'max' or 'min', got {which!r}")
    if which == "max" and op.dim > 2 and loss.closed_form is not None:
        return lanczos_tops(op, [loss], config, generator)[loss.name]
    if generator is None:
        generator = draw_generator(config.seed, "lanczos-top" if which == "max" else "lanczos-min", loss.name)
    if which == "max" and op.dim > 2:
        # Never a linearize trace for λ_max (forward products): ten products cost less than building one.
        start = time.perf_counter()
        value, vector, products, solver_ok = lanczos_top(
            op, loss, top_start_vector(op, generator), tol=config.tol, budget=config.lanczos_max_products,
            basis_size=min(config.lanczos_ncv_max, op.dim))
        seconds = time.perf_counter() - start
        note = "" if solver_ok else (f"Lanczos did not converge within {config.lanczos_max_products} "
                                     f"Hessian-vector products; the value is the best Ritz estimate so far")
        return _result(op, loss, which, "lanczos", value, vector, products, seconds, config,
                       scale if scale is not None else abs(value), solver_ok, note)
    budget = config.lanczos_max_products if which == "max" else config.lanczos_min_products
    ncv = config.lanczos_ncv_max if which == "max" else config.lanczos_ncv_min
    ncv = min(ncv, op.dim - 1) if op.dim > 2 else op.dim
    operator = _RecordingOperator(op, loss, budget, keep=max(ncv, 2))
    start_vector = torch.randn(op.dim, generator=generator, dtype=torch.float64).numpy()
    start = time.perf_counter()
    if op.dim > 2:
        op.linearise()  # forward products: λ_min takes hundreds, so trace once (no-op for reverse)
    solver_ok, note = True, ""
    if op.dim <= 2:  # ARPACK needs k < d − 1; two products give the whole matrix
        for e in np.eye(op.dim):
            operator.matvec(e)
        found = operator.ritz(which)
    else:
        try:
            values, vectors = sparse_linalg.eigsh(operator, k=1, which="LA" if which == "max" else "SA",
                                                  tol=config.tol, ncv=ncv, v0=start_vector,
                                                  maxiter=max(1, budget))
            found = (float(values[0]), vectors[:, 0])
        except (_BudgetSpent, sparse_linalg.ArpackNoConvergence):
            solver_ok = False
            found = operator.ritz(which)
            note = (f"Lanczos did not converge within {budget} Hessian-vector products; the value is the "
                    f"best Rayleigh–Ritz estimate so far")
    seconds = time.perf_counter() - start
    if found is None:
        return EigenResult(math.nan, which, "lanczos", math.inf, False, operator.products, seconds,
                           config.tol, math.nan, "no Hessian-vector product was computed")
    value, vector = found
    if scale is None and which == "max":
        scale = abs(value)
    return _result(op, loss, which, "lanczos", value, vector, operator.products, seconds, config, scale,
                   solver_ok, note)
