"""Hessians of gradient-matching losses at the ground truth x*, and their extreme eigenvalues.

The code lives in :mod:`lavp_core.hessian.krylov` for now; every name stays importable from here.
"""

# A re-export hub: the private names are imported by the tests and benchmarks, not listed in __all__.
# ruff: noqa: F401

from .krylov import (
    DEFAULT_SOLVER,
    EXTREMES,
    FORWARD_AD_LOCK,
    JACOBIAN_PRODUCTS,
    METHODS,
    EigenResult,
    HessianAtTruth,
    LossSpectrum,
    PowerStep,
    SolverConfig,
    TopRitz,
    _block_rows,
    _BudgetSpent,
    _certified,
    _check_finite,
    _check_jacobian_products,
    _decompose,
    _dense_matrix,
    _mirror_upper,
    _not_differentiable,
    _RecordingOperator,
    _relative_gap,
    _restore_upper,
    _result,
    _store_upper,
    _to_input,
    closed_form_tops,
    exact_spectra,
    lanczos_extreme,
    lanczos_top,
    lanczos_tops,
    paper_extremes,
    power_iteration,
    release_freed_memory,
    residual_of,
    solve,
    symmetric_spectrum,
    top_start_vector,
)

__all__ = [
    "DEFAULT_SOLVER", "EXTREMES", "FORWARD_AD_LOCK", "JACOBIAN_PRODUCTS", "METHODS", "EigenResult",
    "HessianAtTruth", "LossSpectrum", "PowerStep", "SolverConfig", "TopRitz", "closed_form_tops", "exact_spectra",
    "lanczos_extreme", "lanczos_top", "lanczos_tops", "paper_extremes", "power_iteration", "release_freed_memory",
    "residual_of", "solve", "symmetric_spectrum", "top_start_vector",
]
