"""The ``exact`` method: every eigenvalue of the dense Hessian.

The dense d × d Hessian in float64 is built a chunk of columns at a time
(:meth:`~lavp_core.hessian.operators.HessianAtTruth.dense`), then every eigenvalue (the spectrum) and
the two extreme eigenvectors come from one in-place tridiagonal reduction (:func:`symmetric_spectrum`).
Peak memory is the larger of the d × d matrix's upper half plus ``memory_mb`` (while the chunks run)
and the whole matrix (while it is decomposed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.linalg.lapack as lapack

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
    lwork = int(lapack.dsytrd_lwork(d, lower=1)[0])
    # h.T is h's memory in Fortran order: LAPACK's lower triangle of it is h's upper triangle.
    reflectors, t_diag, t_off, tau, info = lapack.dsytrd(h.T, lower=1, lwork=max(lwork, 1), overwrite_a=1)
    if info != 0:
        raise ProxyError(f"the tridiagonal reduction failed (LAPACK info {info})")
    eigenvalues = scipy.linalg.eigh_tridiagonal(t_diag, t_off, eigvals_only=True)
    _, low = scipy.linalg.eigh_tridiagonal(t_diag, t_off, select="i", select_range=(0, 0))
    _, high = scipy.linalg.eigh_tridiagonal(t_diag, t_off, select="i", select_range=(d - 1, d - 1))
    vectors = np.concatenate([low, high], axis=1)  # (d, 2), eigenvectors of the tridiagonal T
    # h = Q T Qᵀ with Q = H_0 H_1 ... H_{d-2}, H_k = I − tau_k v_k v_kᵀ, v_k = (0…0, 1, reflectors[k+2:, k]).
    for k in range(d - 2, -1, -1):
        tail = reflectors[k + 2:, k]
        s = tau[k] * (vectors[k + 1] + tail @ vectors[k + 2:])  # (2,)
        vectors[k + 1] -= s
        vectors[k + 2:] -= np.outer(tail, s)
    if np.shares_memory(reflectors, h):  # otherwise LAPACK worked on a copy and h is intact
        _restore_upper(h, diagonal)
    vectors /= np.linalg.norm(vectors, axis=0, keepdims=True)
    return np.sort(eigenvalues), vectors[:, 0].copy(), vectors[:, 1].copy()


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

    The closed-form losses share one pass over the input: JᵀJ is built once and turned into the
    cosine Hessian in place by a rank-one update after its own spectrum is taken.
    """
    needed = 8 * op.dim ** 2 / 2 ** 30
    if needed > config.exact_max_gb:
        raise ProxyError(f"the exact method needs a dense {op.dim:,} × {op.dim:,} Hessian ({needed:.1f} GB, "
                         f"more than exact_max_gb = {config.exact_max_gb:g}); use method 'lanczos'")
    decomposed: dict[str, tuple] = {}
    closed = sorted((loss for loss in losses if loss.closed_form is not None),
                    key=lambda loss: loss.closed_form != "l2")  # l2 first: cos is built from it
    if closed:
        start = time.perf_counter()
        h = op.gram(config)
        build = time.perf_counter() - start
        form = "l2"
        for loss in closed:
            t0 = time.perf_counter()
            if loss.closed_form == "cos" and form == "l2":
                op.cosine_from_gram(h)
                form = "cos"
            decomposed[loss.name] = _decompose(h, build + time.perf_counter() - t0)
        del h
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
