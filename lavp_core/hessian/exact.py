"""The ``exact`` method: every eigenvalue of the dense Hessian.

The dense d × d Hessian in float64 is built a chunk of columns at a time
(:meth:`~lavp_core.hessian.operators.HessianAtTruth.dense`), then every eigenvalue (the spectrum) and
the two extreme eigenvectors come from one in-place tridiagonal reduction (:func:`symmetric_spectrum`).
The ``l2`` and ``cos`` Hessians (JᵀJ and its rank-one update) share one reduction
(:func:`closed_form_spectra`): the reduction is what costs (O(d³), memory-bound), the rest is O(d²).
Peak memory is the larger of the d × d matrix's upper half plus ``memory_mb`` (while the chunks run)
and the whole matrix (while it is decomposed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack
import torch

from ..errors import ProxyError
from ..losses import MatchingLoss
from .config import DEFAULT_SOLVER, LossSpectrum, SolverConfig
from .memory import _block_rows
from .operators import HessianAtTruth
from .residuals import _certified


def symmetric_spectrum(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) of a symmetric float64 matrix h (d, d), and unit eigenvectors of
    the smallest and the largest, from one Householder tridiagonal reduction done in place.

    LAPACK's ``dsytrd`` overwrites one triangle of h and never reads the other; h is restored from
    that other triangle afterwards, so the caller gets its matrix back and no second d × d copy is
    ever made. Returns ``(eigenvalues (d,), v_min (d,), v_max (d,))``.
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.dtype != np.float64 or not h.flags.c_contiguous:
        raise ValueError("symmetric_spectrum needs a square C-contiguous float64 matrix")
    d = h.shape[0]
    if d == 1:
        one = np.ones(1)
        return h[0].copy(), one, one.copy()
    diagonal = h.diagonal().copy()
    reflectors, t_diag, t_off, tau = _tridiagonalise(h)
    eigenvalues, vectors = _tridiagonal_extremes(t_diag, t_off)
    _apply_q(reflectors, tau, vectors)
    if np.shares_memory(reflectors, h):  # otherwise LAPACK worked on a copy and h is intact
        _restore_upper(h, diagonal)
    vectors /= np.linalg.norm(vectors, axis=0, keepdims=True)
    return eigenvalues, vectors[:, 0].copy(), vectors[:, 1].copy()


def _tridiagonalise(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """LAPACK ``dsytrd`` of h's upper triangle, in place: (reflectors, T's diagonal, T's
    off-diagonal, tau), h = Q T Qᵀ with Q = H_0 H_1 … H_{d−2}, H_k = I − tau_k v_k v_kᵀ and
    v_k = (0…0, 1, reflectors[k+2:, k]); Q e₀ = e₀."""
    lwork = int(lapack.dsytrd_lwork(h.shape[0], lower=1)[0])
    # h.T is h's memory in Fortran order: LAPACK's lower triangle of it is h's upper triangle.
    reflectors, t_diag, t_off, tau, info = lapack.dsytrd(h.T, lower=1, lwork=max(lwork, 1), overwrite_a=1)
    if info != 0:
        raise ProxyError(f"the tridiagonal reduction failed (LAPACK info {info})")
    return reflectors, t_diag, t_off, tau


def _tridiagonal_extremes(t_diag: np.ndarray, t_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) of a symmetric tridiagonal T, and unit eigenvectors of T for the
    smallest and the largest as the columns of a (d, 2) array."""
    d = t_diag.shape[0]
    eigenvalues = scipy.linalg.eigh_tridiagonal(t_diag, t_off, eigvals_only=True)
    _, low = scipy.linalg.eigh_tridiagonal(t_diag, t_off, select="i", select_range=(0, 0))
    _, high = scipy.linalg.eigh_tridiagonal(t_diag, t_off, select="i", select_range=(d - 1, d - 1))
    return np.sort(eigenvalues), np.concatenate([low, high], axis=1)


def _apply_q(reflectors: np.ndarray, tau: np.ndarray, vectors: np.ndarray) -> None:
    """vectors (d, k) ← Q vectors in place, Q from :func:`_tridiagonalise`: H_{d−2} first, H_0 last."""
    d = vectors.shape[0]
    for k in range(d - 2, -1, -1):
        tail = reflectors[k + 2:, k]
        s = tau[k] * (vectors[k + 1] + tail @ vectors[k + 2:])  # one per column
        vectors[k + 1] -= s
        vectors[k + 2:] -= np.outer(tail, s)


def closed_form_spectra(h: np.ndarray, w: np.ndarray | None, cos_scale: float, forms: Sequence[str]
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every eigenvalue and the extreme unit eigenvectors of A = h (``"l2"``, A = JᵀJ) and of
    (A − wwᵀ)·cos_scale (``"cos"``) from ONE tridiagonal reduction; h is overwritten (consumed).

    A Householder reflection P (P = Pᵀ = P⁻¹) with P w = α e₀, |α| = ‖w‖, is applied to h first
    (P A P, a rank-two update, O(d²)); ``dsytrd`` then gives P A P = Q T Qᵀ with Q e₀ = e₀, so
    Qᵀ P w = α e₀ and P (A − wwᵀ) P = Q (T − α² e₀e₀ᵀ) Qᵀ: the cosine's tridiagonal is the L2's with
    its first diagonal entry lowered by ‖w‖². Each spectrum then costs O(d²) (``eigh_tridiagonal``)
    and an eigenvector y of a tridiagonal is v = P Q y. Both are the same float64 computations as
    reducing each matrix on its own, to round-off (the explicit A − wwᵀ carries the same
    cancellation). Returns form -> (eigenvalues (d,) ascending, v_min (d,), v_max (d,)) for the
    requested ``forms`` (``w`` is needed only for ``"cos"``).
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.dtype != np.float64 or not h.flags.c_contiguous:
        raise ValueError("closed_form_spectra needs a square C-contiguous float64 matrix")
    unknown = [form for form in forms if form not in ("l2", "cos")]
    if unknown or not forms or ("cos" in forms and w is None):
        raise ValueError(f"closed_form_spectra takes the forms 'l2' and 'cos' (with w), got {list(forms)!r}")
    d = h.shape[0]
    reflection = _householder_to_e0(h, w) if w is not None and "cos" in forms else None
    if d == 1:
        t_diag, t_off, reflectors, tau = h[0].copy(), np.zeros(0), None, None
    else:
        reflectors, t_diag, t_off, tau = _tridiagonalise(h)
    out = {}
    for form in forms:
        diagonal, off = t_diag, t_off
        if form == "cos":
            diagonal = diagonal.copy()
            diagonal[0] -= float(w @ w)
            diagonal, off = diagonal * cos_scale, off * cos_scale
        if d == 1:
            eigenvalues, vectors = diagonal.copy(), np.ones((1, 2))
        else:
            eigenvalues, vectors = _tridiagonal_extremes(diagonal, off)
        out[form] = (eigenvalues, vectors)
    if d > 1:
        stacked = np.concatenate([vectors for _, vectors in out.values()], axis=1)  # (d, 2 per form)
        _apply_q(reflectors, tau, stacked)
        if reflection is not None:
            v, beta = reflection
            stacked -= np.outer(v, beta * (v @ stacked))
        stacked /= np.linalg.norm(stacked, axis=0, keepdims=True)
        for i, form in enumerate(out):
            out[form] = (out[form][0], stacked[:, 2 * i].copy(), stacked[:, 2 * i + 1].copy())
    else:
        out = {form: (values, np.ones(1), np.ones(1)) for form, (values, _) in out.items()}
    return out


def _householder_to_e0(h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Overwrite h's upper triangle (and diagonal) with that of P h P, P = I − β v vᵀ the reflection
    with P w = α e₀, α = −sign(w₀)‖w‖ (so v = w − α e₀ has no cancellation); return (v, β), or None
    for w = 0 (P = I). h's strict lower triangle is left stale (LAPACK never reads it)."""
    d = h.shape[0]
    norm = float(np.linalg.norm(w))
    if d == 1 or norm == 0 or not math.isfinite(norm):
        return None
    alpha = -math.copysign(norm, float(w[0]))
    v = w.astype(np.float64, copy=True)
    v[0] -= alpha
    vv = float(v @ v)
    if vv == 0:
        return None
    beta = 2.0 / vv
    # h.T is h's memory in Fortran order: BLAS's lower triangle of it is h's upper triangle.
    p = blas.dsymv(beta, h.T, v, lower=1)  # β A v
    q = p - (0.5 * beta * float(v @ p)) * v  # P A P = A − v qᵀ − q vᵀ
    updated = blas.dsyr2(-1.0, v, q, lower=1, a=h.T, overwrite_a=1)
    if not np.shares_memory(updated, h):  # BLAS worked on a copy: update h a block of rows at a time
        del updated
        block = _block_rows(d)
        for i in range(0, d, block):
            i1 = min(i + block, d)
            h[i:i1, i:] -= np.outer(v[i:i1], q[i:]) + np.outer(q[i:i1], v[i:])
    return v, beta


def _restore_upper(h: np.ndarray, diagonal: np.ndarray) -> None:
    """Copy h's strictly lower triangle onto its upper triangle and put the diagonal back."""
    d = h.shape[0]
    block = _block_rows(d)
    for i in range(0, d, block):
        i1 = min(i + block, d)
        h[i:i1, i1:] = h[i1:, i:i1].T
        square = h[i:i1, i:i1]
        lower = np.tril(square, -1)
        square[...] = lower + lower.T
    h[np.diag_indices(d)] = diagonal


def exact_spectra(op: HessianAtTruth, losses: Sequence[MatchingLoss],
                  config: SolverConfig = DEFAULT_SOLVER) -> dict[str, LossSpectrum]:
    """Every eigenvalue of each loss's dense Hessian at x* (float64), and certified extremes.

    The closed-form losses share one pass over the input and one tridiagonal reduction: JᵀJ is built
    once and both spectra come from it (:func:`closed_form_spectra`); the seconds of each are those of
    the shared computation.
    """
    needed = 8 * op.dim ** 2 / 2 ** 30
    if needed > config.exact_max_gb:
        raise ProxyError(f"the exact method needs a dense {op.dim:,} × {op.dim:,} Hessian ({needed:.1f} GB, "
                         f"more than exact_max_gb = {config.exact_max_gb:g}); use method 'lanczos'")
    decomposed: dict[str, tuple] = {}
    closed = [loss for loss in losses if loss.closed_form is not None]
    if closed:
        start = time.perf_counter()
        forms = sorted({loss.closed_form for loss in closed}, key=lambda form: form != "l2")
        w = (op.vjp(op.unit_gradient).reshape(-1).detach().to("cpu", torch.float64).numpy()
             if "cos" in forms else None)  # refuses a zero gradient before the columns run
        h = op.gram(config)
        scale = 1.0 / op.g_norm ** 2 if w is not None else 1.0  # w exists only for a nonzero gradient
        spectra = closed_form_spectra(h, w, scale, forms)  # consumes h
        del h
        seconds = time.perf_counter() - start
        for loss in closed:
            decomposed[loss.name] = (*spectra[loss.closed_form], seconds)
    for loss in losses:
        if loss.closed_form is None:
            start = time.perf_counter()
            h = op.dense(loss, closed_form=False, config=config)
            decomposed[loss.name] = _decompose(h, time.perf_counter() - start)
            del h
    # Residuals only now, with no d × d matrix alive: their products do not add to the peak memory.
    return {loss.name: _certified(op, loss, *decomposed[loss.name], config) for loss in losses}


def _decompose(h: np.ndarray, seconds_so_far: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(all eigenvalues, v_min, v_max, seconds including ``seconds_so_far``) of a dense Hessian."""
    start = time.perf_counter()
    eigenvalues, v_min, v_max = symmetric_spectrum(h)
    return eigenvalues, v_min, v_max, seconds_so_far + time.perf_counter() - start
