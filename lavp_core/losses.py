"""Gradient-matching losses: a registry of functions L(g, g*) on flattened weight gradients.

Each loss takes the candidate's flattened gradient ``g`` (n,), the client's ``g_star`` (n,) and the
:class:`~lavp_core.gradients.ParamLayout` ``layout`` (per-layer slices, used by per-layer losses)
and returns a scalar. Adding a loss is registering one function; proxies, studies and the app pick
it up by name. Conventions, as in the original attacks (DLG's L2, Inverting Gradients' cosine):

* ``l2``: 1/2 * ||g - g*||^2 over all layers concatenated (Hessian at x* is exactly J^T J);
* ``cos``: 1 - <g, g*> / (||g|| ||g*||) over all layers concatenated;
* ``cos-layer``: mean over layers of each layer's cosine distance (Inverting Gradients' "local").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ConfigError

_TINY = 1e-30  # keeps sqrt differentiable at an all-zero layer without changing any other value


@dataclass(frozen=True)
class MatchingLoss:
    """A registered gradient-matching loss.

    ``closed_form`` names the closed-form Hessian at x* the proxy code may use ("l2" or "cos");
    ``None`` means the Hessian is taken by automatic differentiation of ``fn``.
    """

    name: str
    description: str
    fn: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
    closed_form: str | None = None

    def __call__(self, g: torch.Tensor, g_star: torch.Tensor, layout=None) -> torch.Tensor:
        return self.fn(g, g_star, layout)


_LOSSES: dict[str, MatchingLoss] = {}


def register_loss(name: str, description: str, closed_form: str | None = None):
    """Decorator: register ``fn(g, g_star, layout) -> scalar`` as a matching loss."""

    def wrap(fn):
        _LOSSES[name] = MatchingLoss(name, description, fn, closed_form)
        return fn

    return wrap


def list_losses() -> list[MatchingLoss]:
    return list(_LOSSES.values())


def get_loss(name: str) -> MatchingLoss:
    if name not in _LOSSES:
        raise ConfigError(f"unknown matching loss {name!r}: choose one of {', '.join(_LOSSES)}")
    return _LOSSES[name]


def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.sum(v * v) + _TINY)


@register_loss("l2", "1/2 ||g - g*||^2 over all layers (DLG, iDLG)", closed_form="l2")
def l2_distance(g: torch.Tensor, g_star: torch.Tensor, layout=None) -> torch.Tensor:
    diff = g - g_star
    return 0.5 * torch.sum(diff * diff)


@register_loss("cos", "1 - cosine similarity over all layers concatenated (Inverting Gradients)",
               closed_form="cos")
def cosine_distance(g: torch.Tensor, g_star: torch.Tensor, layout=None) -> torch.Tensor:
    return 1.0 - torch.sum(g * g_star) / (_norm(g) * _norm(g_star))


@register_loss("cos-layer", "mean over layers of the per-layer cosine distance")
def layerwise_cosine_distance(g: torch.Tensor, g_star: torch.Tensor, layout) -> torch.Tensor:
    if layout is None:
        raise ConfigError("cos-layer needs the parameter layout of the model")
    terms = [1.0 - torch.sum(g[s] * g_star[s]) / (_norm(g[s]) * _norm(g_star[s])) for s in layout.slices]
    return torch.stack(terms).mean()
