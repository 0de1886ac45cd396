"""The eigen-solvers' vocabulary, settings and results.

The typed vocabulary (:data:`SolverMethod`, :data:`Extreme`, :data:`JacobianProducts`,
:data:`Precision`, :data:`ClosedForm`) is the single source of the tuples that validate what a user
passes (``METHODS``, ``EXTREMES``, ``JACOBIAN_PRODUCTS``, ``PRECISIONS``, ``CLOSED_FORMS``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, cast, get_args

import numpy as np
import torch

from ..errors import ConfigError

SolverMethod = Literal["exact", "lanczos", "paper"]
Extreme = Literal["max", "min"]
JacobianProducts = Literal["reverse", "forward"]
Precision = Literal["float64", "model"]
ClosedForm = Literal["l2", "cos"]

METHODS: tuple[SolverMethod, ...] = get_args(SolverMethod)
EXTREMES: tuple[Extreme, ...] = get_args(Extreme)
JACOBIAN_PRODUCTS: tuple[JacobianProducts, ...] = get_args(JacobianProducts)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
CLOSED_FORMS: tuple[ClosedForm, ...] = get_args(ClosedForm)


def _check_jacobian_products(value: str) -> JacobianProducts:
    """``value`` if it is one of :data:`JACOBIAN_PRODUCTS`, else ``ConfigError``."""
    if value not in JACOBIAN_PRODUCTS:
        raise ConfigError(f"jacobian_products must be 'reverse' or 'forward', got {value!r}")
    return cast(JacobianProducts, value)


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the eigen-solvers.

    Args:
        tol: a value counts as converged when its relative residual ‖Hv − λv‖/|λ| is at most this;
            also ARPACK's tolerance and the power iterations' stopping rule.
        exact_max_dim: ``method="auto"`` uses ``exact`` up to this many input values, else ``lanczos``.
        precision: dtype of the autodiff products of ``exact``, ``lanczos`` and of every residual:
            ``"float64"`` (a private float64 copy of the model) or ``"model"`` (the model's dtype).
        jacobian_products: how Jv is computed: ``"reverse"`` (the transpose of the stored reverse-mode
            linearisation) or ``"forward"`` (``torch.func.jvp``/``linearize``); see :mod:`lavp_core.hessian.operators`.
        memory_mb: working memory for one chunk of Hessian columns; the upper half of the dense
            d × d float64 matrix of ``exact`` (4·d² bytes) comes on top while chunks run.
        exact_max_gb: ``exact`` refuses inputs whose dense Hessian would need more than this.
        max_chunk: upper bound on the columns per chunk.
        lanczos_ncv_max: basis size for λ_max before a restart (closed forms: thick, from Jᵀĝ and the
            Ritz vectors; other losses: explicit, from the Ritz vector).
        lanczos_ncv_min: ARPACK's Lanczos basis size for λ_min (larger: the bottom is clustered).
        lanczos_max_products: Hessian-vector products allowed for λ_max by ``lanczos``.
        lanczos_min_products: Hessian-vector products allowed for λ_min by ``lanczos``.
        paper_iterations: power iterations allowed for λ_max, and again for λ_min, by ``paper``.
        paper_seconds: optional wall-time budget of each ``paper`` power iteration.
        paper_fd_step: step of the central finite difference along a unit direction (``paper``).
        seed: seed of the random draws (start vectors of ``lanczos`` and ``paper``, the direction of
            the smoothness check); each draw has its own generator derived from this seed and what it
            is for (:func:`~lavp_core.hessian.draws.draw_generator`).
        check_smoothness: for losses without a closed form, compare one autodiff Hessian-vector
            product with a finite difference first, to refuse losses that are not twice
            differentiable at x*.
    """

    tol: float = 1e-4
    exact_max_dim: int = 12_288
    precision: Precision = "float64"
    jacobian_products: JacobianProducts = "reverse"
    memory_mb: float = 256.0
    exact_max_gb: float = 8.0
    max_chunk: int = 256
    lanczos_ncv_max: int = 24
    lanczos_ncv_min: int = 20
    lanczos_max_products: int = 600
    lanczos_min_products: int = 600
    paper_iterations: int = 100
    paper_seconds: float | None = None
    paper_fd_step: float = 1e-2
    seed: int = 0
    check_smoothness: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be 'float64' or 'model', got {self.precision!r}")
        _check_jacobian_products(self.jacobian_products)
        if not self.tol > 0:
            raise ConfigError(f"tol must be positive, got {self.tol}")
        for name in ("exact_max_dim", "max_chunk", "lanczos_max_products", "lanczos_min_products",
                     "paper_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.lanczos_ncv_max, self.lanczos_ncv_min) < 3:
            raise ConfigError("lanczos_ncv_max and lanczos_ncv_min must be at least 3")
        if not self.memory_mb > 0 or not self.exact_max_gb > 0 or not self.paper_fd_step > 0:
            raise ConfigError("memory_mb, exact_max_gb and paper_fd_step must be positive")


DEFAULT_SOLVER = SolverConfig()


@dataclass(frozen=True)
class EigenResult:
    """One extreme eigenvalue with the evidence for it.

    ``residual`` is ‖Hv − λv‖/|λ| and ``residual_vs_norm`` is ‖Hv − λv‖/|λ_max| (the residual on
    the scale of the whole matrix; NaN when λ_max is unknown), both with the exact autodiff H.
    ``iterations`` counts power steps (``paper``), Hessian-vector products (``lanczos``), or the
    Hessian columns formed (``exact``); ``seconds`` is the wall time to obtain the value (a pass
    shared by several values is counted in each).
    """

    value: float
    which: Extreme
    method: SolverMethod
    residual: float
    converged: bool
    iterations: int
    seconds: float
    tolerance: float
    residual_vs_norm: float = math.nan
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LossSpectrum:
    """Both extremes of one loss's Hessian at x*; ``eigenvalues`` (ascending, float64) only for ``exact``."""

    loss: str
    max: EigenResult
    min: EigenResult
    eigenvalues: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PowerStep:
    """A snapshot of a power iteration: the current eigenvalue estimate of H and its unit vector.

    ``residual`` is relative to |value| and measured with the iteration's own operator (finite
    differences for the paper recipe).
    """

    iteration: int
    value: float
    residual: float
    seconds: float
    vector: torch.Tensor = field(repr=False)  # (C, H, W), unit norm
