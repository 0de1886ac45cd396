"""Residuals: every eigenvalue carries its own certificate.

Every residual is ‖Hv − λv‖ / |λ| with H applied by exact autodiff (the closed form when the loss has
one), whatever produced λ and v; a value counts as converged only when that residual is at most
``SolverConfig.tol`` (and the solver itself did not give up).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..losses import MatchingLoss
from .config import EigenResult, Extreme, LossSpectrum, SolverConfig, SolverMethod
from .operators import HessianAtTruth


def _to_input(op: HessianAtTruth, v: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v).reshape(op.shape).to(op.device, op.dtype)


def residual_of(op: HessianAtTruth, loss: MatchingLoss, value: float,
                vector: np.ndarray | torch.Tensor) -> float:
    """‖Hv − λv‖ / ‖v‖ with H by exact autodiff (closed form when the loss has one)."""
    v = _to_input(op, vector)
    norm = float(v.norm())
    if norm == 0 or not math.isfinite(value):
        return math.inf
    hv = op.hvp(loss, v / norm)
    return float((hv - value * (v / norm)).norm())


def _result(op: HessianAtTruth, loss: MatchingLoss, which: Extreme, method: SolverMethod, value: float,
            vector, iterations: int, seconds: float, config: SolverConfig, scale: float | None,
            solver_ok: bool = True, note: str = "") -> EigenResult:
    """The :class:`EigenResult` of a solver's (value, vector (d,) or (C, H, W)), its residual measured
    by :func:`residual_of`; ``scale`` (|λ_max| or the spectral norm) gives ``residual_vs_norm``."""
    absolute = residual_of(op, loss, value, vector) if vector is not None else math.inf
    relative = absolute / abs(value) if value != 0 and math.isfinite(value) else math.inf
    vs_norm = absolute / abs(scale) if scale else math.nan
    converged = bool(solver_ok and relative <= config.tol)
    if relative > config.tol:
        above = f"relative residual {relative:.1e} is above the tolerance {config.tol:g}"
        note = f"{note}; {above}" if note else above
    return EigenResult(float(value), which, method, float(relative), converged, int(iterations),
                       float(seconds), float(config.tol), float(vs_norm), note)


def _certified(op: HessianAtTruth, loss: MatchingLoss, eigenvalues: np.ndarray, v_min: np.ndarray,
               v_max: np.ndarray, seconds: float, config: SolverConfig) -> LossSpectrum:
    """Both extremes of a dense spectrum (eigenvalues (d,) ascending, unit v_min, v_max (d,)), each
    certified by its exact residual."""
    top, bottom = float(eigenvalues[-1]), float(eigenvalues[0])
    scale = max(abs(top), abs(bottom))
    results = {which: _result(op, loss, which, "exact", value, vector, op.dim, seconds, config, scale)
               for which, value, vector in (("max", top, v_max), ("min", bottom, v_min))}
    return LossSpectrum(loss.name, results["max"], results["min"], eigenvalues)
