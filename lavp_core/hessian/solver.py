"""The entry point: :func:`solve`, λ_max and λ_min of each loss's Hessian by the chosen method."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError
from ..losses import MatchingLoss
from .config import DEFAULT_SOLVER, METHODS, LossSpectrum, SolverConfig, SolverMethod
from .draws import draw_generator
from .exact import exact_spectra
from .krylov import lanczos_extreme, lanczos_tops
from .operators import HessianAtTruth
from .paper import paper_extremes


def solve(op: HessianAtTruth, losses: Sequence[MatchingLoss], method: SolverMethod,
          config: SolverConfig = DEFAULT_SOLVER,
          fd_op: HessianAtTruth | None = None) -> dict[str, LossSpectrum]:
    """λ_max and λ_min (and for ``exact`` the spectrum) of each loss's Hessian at x*.

    Args:
        op: the Hessian operator in ``config.precision`` (products and residuals).
        losses: the matching losses.
        method: ``"exact"``, ``"lanczos"`` or ``"paper"``.
        fd_op: the operator in the model's own dtype for the ``paper`` recipe (default: ``op``).

    Returns:
        loss name -> :class:`LossSpectrum`, in the order of ``losses``.

    Every random draw has its own generator from ``config.seed`` and its purpose
    (:func:`~lavp_core.hessian.draws.draw_generator`): the smoothness check's direction
    ``("smoothness", loss name)``, the start vectors ``("paper", loss name, "max"/"min")``,
    ``("lanczos-top", loss name)``, ``("lanczos-min", loss name)``, and the closed forms' shared
    subspace ``("closed-form-tops", *forms)``. So a loss's values do not depend on which other losses
    are requested, except λ_max of ``l2``/``cos`` by ``lanczos``, whose shared subspace depends on which
    closed forms are requested (the values agree to ``config.tol``; see
    :func:`~lavp_core.hessian.krylov.closed_form_tops`), and with it the ``residual_vs_norm`` of their
    λ_min (divided by that λ_max). ``exact`` draws nothing but the smoothness check's direction.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown eigen-solver {method!r}: choose one of {', '.join(METHODS)} (or 'auto')")
    if config.check_smoothness:
        for loss in losses:
            if loss.closed_form is None:
                op.check_smoothness(loss, draw_generator(config.seed, "smoothness", loss.name))
    if method == "exact":
        return exact_spectra(op, losses, config)
    out: dict[str, LossSpectrum] = {}
    closed = [loss for loss in losses if loss.closed_form is not None]
    # The closed forms' maxima share one subspace of products (both for the cost of about one).
    tops = lanczos_tops(op, closed, config) if method == "lanczos" and closed and op.dim > 2 else {}
    for loss in losses:
        if method == "lanczos":
            top = tops.get(loss.name) or lanczos_extreme(op, loss, "max", config)
            bottom = lanczos_extreme(op, loss, "min", config, scale=abs(top.value))
        else:
            top, bottom = paper_extremes(fd_op or op, op, loss, config)
        out[loss.name] = LossSpectrum(loss.name, top, bottom)
    return out
