"""Hessians of gradient-matching losses with respect to the input at the ground truth x*, and their
extreme eigenvalues (the paper's LAVP).

One concept per module; each uses only the ones above it in this list:

* :mod:`~lavp_core.hessian.config`: the vocabulary (``SolverMethod``, ``Extreme``, ``JacobianProducts``,
  ...), :class:`SolverConfig`, and the results :class:`EigenResult`, :class:`LossSpectrum`, :class:`PowerStep`.
* :mod:`~lavp_core.hessian.draws`: :func:`draw_generator`, one generator per random draw.
* :mod:`~lavp_core.hessian.memory`: the dense d × d matrix's memory (no huge pages, one triangle at a
  time, a heap that keeps its pages while the chunks run, ``malloc_trim``).
* :mod:`~lavp_core.hessian.operators`: :class:`HessianAtTruth`, the Jacobian and Hessian-vector products at
  x* and the dense Hessian; the forward-mode lock and its scoped warning filters.
* :mod:`~lavp_core.hessian.residuals`: :func:`residual_of`, the certificate every eigenvalue carries.
* :mod:`~lavp_core.hessian.exact`, :mod:`~lavp_core.hessian.krylov`, :mod:`~lavp_core.hessian.paper`: the
  three eigen-solvers ``exact`` (the whole spectrum of the dense Hessian), ``lanczos`` (matrix-free) and
  ``paper`` (the paper's recipe: finite differences and power iteration).
* :mod:`~lavp_core.hessian.solver`: :func:`solve`, the entry point.

Every residual is ‖Hv − λv‖ / |λ| with H applied by exact autodiff, whatever produced λ and v; a value
counts as converged only when that residual is at most ``SolverConfig.tol``.

Every name importable from the former single module ``lavp_core/hessian.py`` is importable from here.
"""

# A re-export hub: the private names are imported by the tests, not listed in __all__.
# ruff: noqa: F401

from .config import (
    CLOSED_FORMS,
    DEFAULT_SOLVER,
    EXTREMES,
    JACOBIAN_PRODUCTS,
    METHODS,
    PRECISIONS,
    ClosedForm,
    EigenResult,
    Extreme,
    JacobianProducts,
    LossSpectrum,
    PowerStep,
    Precision,
    SolverConfig,
    SolverMethod,
    _check_jacobian_products,
)
from .draws import draw_generator
from .exact import _decompose, _restore_upper, closed_form_spectra, exact_spectra, symmetric_spectrum
from .krylov import (
    TopRitz,
    _BudgetSpent,
    _RecordingOperator,
    closed_form_tops,
    lanczos_extreme,
    lanczos_top,
    lanczos_tops,
    top_start_vector,
)
from .memory import (
    _block_rows,
    _check_finite,
    _dense_matrix,
    _mirror_upper,
    _store_upper,
    release_freed_memory,
    retained_heap,
)
from .operators import FORWARD_AD_LOCK, HessianAtTruth, _not_differentiable, _relative_gap, forward_mode
from .paper import paper_extremes, power_iteration
from .residuals import _certified, _result, _to_input, residual_of
from .solver import solve

__all__ = [
    "CLOSED_FORMS", "DEFAULT_SOLVER", "EXTREMES", "FORWARD_AD_LOCK", "JACOBIAN_PRODUCTS", "METHODS", "PRECISIONS",
    "ClosedForm", "EigenResult", "Extreme", "HessianAtTruth", "JacobianProducts", "LossSpectrum", "PowerStep",
    "Precision", "SolverConfig", "SolverMethod", "TopRitz", "closed_form_spectra", "closed_form_tops",
    "draw_generator", "exact_spectra", "forward_mode", "lanczos_extreme", "lanczos_top", "lanczos_tops",
    "paper_extremes", "power_iteration", "release_freed_memory", "residual_of", "retained_heap", "solve",
    "symmetric_spectrum", "top_start_vector",
]
