"""The ``paper`` method: the paper's recipe.

Finite-difference Jacobian-vector products, power iteration for λ_max, then power iteration on
(λ_max·I − H) for λ_min, each within an iteration budget; residuals re-measured with exact autodiff.
Unless a generator is passed, each start vector has its own generator keyed by
(``config.seed``, ``"paper"``, loss name, ``"max"``/``"min"``), so a loss's values do not depend on
which other losses are solved alongside.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch

from ..errors import ProxyError
from ..losses import MatchingLoss
from .config import DEFAULT_SOLVER, EXTREMES, EigenResult, PowerStep, SolverConfig
from .draws import draw_generator
from .operators import HessianAtTruth
from .residuals import _result


def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *,
                    shift: float | None = None, max_iterations: int = 100,
                    max_seconds: float | None = None) -> Iterator[PowerStep]:
    """Power iteration on H (``shift=None``, finds λ_max) or on (shift·I − H) (finds λ_min).

    ``apply`` is v (C, H, W) ↦ Hv; each snapshot holds the estimate of the eigenvalue *of H* and the
    relative residual ‖Hv − λv‖/|λ| with that same operator. Stops after ``max_iterations`` steps or
    ``max_seconds``.
    """
    v = start / start.norm()
    began = time.perf_counter()
    for iteration in range(1, max_iterations + 1):
        hv = apply(v)
        w = hv if shift is None else shift * v - hv  # the operator being iterated, applied to v
        rayleigh = float(torch.dot(v.reshape(-1), w.reshape(-1)))
        value = rayleigh if shift is None else shift - rayleigh
        gap = float((w - rayleigh * v).norm())  # = ‖Hv − value·v‖ in both cases
        residual = gap / abs(value) if value != 0 else math.inf
        seconds = time.perf_counter() - began
        yield PowerStep(iteration, value, residual, seconds, v)
        norm = w.norm()
        if not bool(torch.isfinite(norm)) or float(norm) == 0:
            return
        v = w / norm
        if max_seconds is not None and seconds >= max_seconds:
            return


def paper_extremes(fd_op: HessianAtTruth, op: HessianAtTruth, loss: MatchingLoss,
                   config: SolverConfig = DEFAULT_SOLVER,
                   generator: torch.Generator | None = None) -> tuple[EigenResult, EigenResult]:
    """The paper's recipe: finite-difference products on ``fd_op`` (the model's own dtype), power
    iteration for λ_max, then power iteration on (λ_max·I − H) for λ_min; each run stops at a
    relative residual of ``config.tol`` (with the recipe's own operator) or its budget. Residuals
    reported are re-measured on ``op`` with exact autodiff.

    The two start vectors (C, H, W) are drawn from ``generator`` when one is passed, else each from its
    own generator, ``draw_generator(config.seed, "paper", loss name, "max" / "min")``: the values of a
    loss do not depend on which other losses are solved alongside.
    """

    def apply(v: torch.Tensor) -> torch.Tensor:
        hv = fd_op.fd_hvp(loss, v, config.paper_fd_step)
        if not bool(torch.isfinite(hv).all()):
            raise ProxyError(f"a finite-difference Hessian-vector product of {loss.name!r} is not finite")
        return hv

    results: dict[str, EigenResult] = {}
    shift = None
    for which in EXTREMES:
        draw = generator if generator is not None else draw_generator(config.seed, "paper", loss.name, which)
        start_vector = torch.randn(fd_op.dim, generator=draw, dtype=torch.float64)
        start_vector = start_vector.to(fd_op.device, fd_op.dtype).view(fd_op.shape)
        began = time.perf_counter()
        last = None
        for last in power_iteration(apply, start_vector, shift=shift, max_iterations=config.paper_iterations,
                                    max_seconds=config.paper_seconds):
            if last.residual <= config.tol:
                break
        seconds = time.perf_counter() - began
        assert last is not None
        stopped = "reached the tolerance" if last.residual <= config.tol else "spent its budget"
        note = (f"power iteration{' on (λ_max·I − H)' if shift is not None else ''} {stopped} after "
                f"{last.iteration} steps (own residual {last.residual:.1e})")
        scale = abs(results["max"].value) if "max" in results else abs(last.value)
        results[which] = _result(op, loss, which, "paper", last.value, last.vector, last.iteration, seconds,
                                 config, scale, note=note)
        if which == "max":
            shift = last.value
    return results["max"], results["min"]
