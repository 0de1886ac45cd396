"""Vulnerability proxies of one client image: the gradient norm, LAVP for each matching loss, fusions.

The proxy table (:func:`proxy_table`) is the one place that says which proxies exist, how each is
computed, how it is labelled, what it means and what the paper calls it; :func:`compute_proxies`,
the study's rows and report order, and the app's pages all read it.

* ``grad_norm``: ‖g*‖, the baseline proxy (kind ``gradient``: computed from g* directly);
* ``{loss}_max`` / ``{loss}_min``: λ_max / λ_min of the loss's Hessian at x* (LAVP; kind
  ``eigenvalue``), for every registered matching loss, with ``-`` in a loss name written ``_`` so
  that every proxy name is an identifier: ``l2_max``, ``cos_min``, ``cos_layer_max`` (loss
  ``cos-layer``);
* ``fusion``: sqrt(l2_max · cos_min), the paper's loss-agnostic proxy (its Table 3; kind ``fusion``),
  defined when both ``l2`` and ``cos`` are computed; :func:`geometric_fusion` forms the geometric
  mean of any chosen (loss, extreme) pairs, and ``compute_proxies(..., fusions={...})`` adds such
  named fusions.

The paper's own column names map as: max → ``l2_max``, min → ``l2_min``, ang_max → ``cos_max``,
ang_min → ``cos_min``.

Adding a proxy: a gradient proxy is one :func:`register_gradient_proxy` call, a fusion one
:func:`register_fusion` call; a new matching loss (``losses.register_loss``) brings its two
eigenvalue proxies with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from .errors import ConfigError, ProxyError
from .gradients import GradientOracle
from .hessian import DEFAULT_SOLVER, EXTREMES, METHODS, EigenResult, HessianAtTruth, SolverConfig, solve
from .losses import MatchingLoss, get_loss, list_losses

ProxyKind = Literal["gradient", "eigenvalue", "fusion"]

PAPER_FUSION: tuple[tuple[str, str], ...] = (("l2", "max"), ("cos", "min"))


@dataclass(frozen=True)
class ProxyDefinition:
    """One row of the proxy table.

    Attributes:
        name: the proxy's column name (an identifier): ``grad_norm``, ``l2_max``, ``fusion``.
        kind: how it is computed: ``gradient`` (from g* directly, by ``compute``), ``eigenvalue`` (an
            extreme eigenvalue of one loss's Hessian at x*), ``fusion`` (geometric mean of eigenvalue
            proxies, ``parts``).
        label: a short label for axes and tables, e.g. ``λ_max of H_l2``.
        meaning: one sentence saying what the number is.
        paper_name: the paper's name for it (``max``, ``ang_min``, ...), or ``None``.
        loss, extreme: the loss and extreme of an eigenvalue proxy.
        parts: the (loss, extreme) pairs of a fusion.
        compute: a gradient proxy's value from the flat client gradient g* (n,).
    """

    name: str
    kind: ProxyKind
    label: str
    meaning: str
    paper_name: str | None = None
    loss: str | None = None
    extreme: str | None = None
    parts: tuple[tuple[str, str], ...] = ()
    compute: Callable[[torch.Tensor], float] | None = field(default=None, compare=False, repr=False)

    @property
    def title(self) -> str:
        """The label with the paper's name where it has one: ``λ_max of H_l2 (paper: max)``."""
        return f"{self.label} (paper: {self.paper_name})" if self.paper_name else self.label


_GRADIENT_PROXIES: dict[str, ProxyDefinition] = {}
_FUSIONS: dict[str, ProxyDefinition] = {}
# the paper's names of the eigenvalue proxies: (loss, extreme) -> column name in its tables
_PAPER_EIGEN_NAMES = {("l2", "max"): "max", ("l2", "min"): "min", ("cos", "max"): "ang_max",
                      ("cos", "min"): "ang_min"}


def proxy_key(loss: str, extreme: str) -> str:
    """The proxy name of one extreme of one loss: ``proxy_key("cos-layer", "max") == "cos_layer_max"``."""
    if extreme not in EXTREMES:
        raise ConfigError(f"extreme must be 'max' or 'min', got {extreme!r}")
    return f"{loss.replace('-', '_')}_{extreme}"


def register_gradient_proxy(name: str, label: str, meaning: str, compute: Callable[[torch.Tensor], float],
                            paper_name: str | None = None) -> ProxyDefinition:
    """Register a proxy computed from the flat client gradient g* alone."""
    definition = ProxyDefinition(name, "gradient", label, meaning, paper_name, compute=compute)
    _GRADIENT_PROXIES[name] = definition
    return definition


def register_fusion(name: str, parts: Sequence[tuple[str, str]], label: str, meaning: str,
                    paper_name: str | None = None) -> ProxyDefinition:
    """Register a geometric fusion of (loss, extreme) eigenvalue proxies; it is computed whenever
    all its losses are."""
    parts = tuple((str(loss), str(extreme)) for loss, extreme in parts)
    for loss, extreme in parts:
        proxy_key(loss, extreme)
    definition = ProxyDefinition(name, "fusion", label, meaning, paper_name, parts=parts)
    _FUSIONS[name] = definition
    return definition


def _eigenvalue_definition(loss: MatchingLoss, extreme: str) -> ProxyDefinition:
    symbol = "λ_max" if extreme == "max" else "λ_min"
    return ProxyDefinition(proxy_key(loss.name, extreme), "eigenvalue", f"{symbol} of H_{loss.name}",
                           f"the {'largest' if extreme == 'max' else 'smallest'} eigenvalue of the Hessian at "
                           f"the true image of {loss.description}",
                           _PAPER_EIGEN_NAMES.get((loss.name, extreme)), loss=loss.name, extreme=extreme)


def proxy_table(losses: Sequence[str] | None = None) -> list[ProxyDefinition]:
    """The proxies defined when ``losses`` are computed (default: every registered matching loss), in
    display and report order: gradient proxies, each loss's max and min, then the fusions."""
    chosen = [loss.name for loss in list_losses()] if losses is None else list(losses)
    table = list(_GRADIENT_PROXIES.values())
    for name in chosen:
        loss = get_loss(name)
        table.extend(_eigenvalue_definition(loss, extreme) for extreme in EXTREMES)
    table.extend(f for f in _FUSIONS.values() if all(loss in chosen for loss, _ in f.parts))
    return table


def proxy_definition(name: str) -> ProxyDefinition:
    """The table's row called ``name`` (``ConfigError`` if there is none)."""
    for definition in proxy_table():
        if definition.name == name:
            return definition
    raise ConfigError(f"unknown proxy {name!r}: choose one of {', '.join(d.name for d in proxy_table())}")


def proxy_title(name: str) -> str:
    """The table's title of ``name``, or ``name`` itself for a proxy outside the table (a caller's fusion)."""
    try:
        return proxy_definition(name).title
    except ConfigError:
        return name


def proxy_order(names: Sequence[str]) -> list[str]:
    """``names`` in the table's order; names outside the table follow in their given order."""
    order = {d.name: i for i, d in enumerate(proxy_table())}
    return sorted(names, key=lambda n: (order.get(n, len(order)), list(names).index(n)))


register_gradient_proxy("grad_norm", "‖g*‖, the gradient norm",
                        "the norm of the client's weight gradient (the baseline proxy)",
                        lambda g: float(g.norm()), paper_name="grad norm")
register_fusion("fusion", PAPER_FUSION, "√(l2_max · cos_min)",
                "the geometric mean of λ_max of the L2 Hessian and λ_min of the cosine Hessian, the paper's "
                "loss-agnostic LAVP", paper_name="fusion")


def geometric_fusion(values: Mapping[str, float], pairs: Sequence[tuple[str, str]]) -> float:
    """Geometric mean of the proxies named by (loss, extreme) ``pairs``, read from ``values``.

    A negative part has no real geometric mean: the result is then NaN (eigenvalues of the Hessians at
    x* of ``l2`` and ``cos`` are never negative). A missing part is a ``ConfigError``.
    """
    if not pairs:
        raise ConfigError("a fusion needs at least one (loss, extreme) pair")
    parts = []
    for loss, extreme in pairs:
        key = proxy_key(loss, extreme)
        if key not in values:
            raise ConfigError(f"fusion part {key!r} was not computed: add loss {loss!r} to the losses")
        parts.append(float(values[key]))
    if any(p < 0 or math.isnan(p) for p in parts):
        return math.nan
    if any(p == 0 for p in parts):
        return 0.0
    return math.exp(sum(math.log(p) for p in parts) / len(parts))


@dataclass(frozen=True, eq=False)
class ProxyResult(Mapping):
    """Proxy values of one image, as a read-only mapping ``name -> float``, with their evidence.

    Attributes:
        proxy_values: proxy name -> value (plain floats); also what the mapping interface reads.
        diagnostics: eigenvalue proxy name -> :class:`~lavp_core.hessian.EigenResult` (method,
            residual, converged flag, iterations, seconds).
        spectra: loss name -> all eigenvalues of its Hessian at x* (ascending), ``exact`` only.
        fusions: fusion name -> its (loss, extreme) parts.
        method: the eigen-solver used (``auto`` resolved).
        input_dim: d, the number of input values; num_params: n, the length of g*.
        seconds: wall time of the whole computation.
    """

    proxy_values: dict[str, float]
    diagnostics: dict[str, EigenResult]
    spectra: dict[str, np.ndarray] = field(repr=False)
    fusions: dict[str, tuple[tuple[str, str], ...]]
    method: str
    losses: tuple[str, ...]
    input_dim: int
    num_params: int
    seconds: float

    def __getitem__(self, key: str) -> float:
        return self.proxy_values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.proxy_values)

    def __len__(self) -> int:
        return len(self.proxy_values)

    def converged(self, key: str) -> bool:
        """Whether ``key``'s value is certified: its residual (or every fused part's) is within tolerance."""
        if key in self.diagnostics:
            return self.diagnostics[key].converged
        if key in self.fusions:
            return all(self.converged(proxy_key(loss, extreme)) for loss, extreme in self.fusions[key])
        if key in self.proxy_values:
            return True  # grad_norm is computed directly
        raise KeyError(key)

    @property
    def unconverged(self) -> list[str]:
        """Names of the values that are estimates rather than certified numbers."""
        return [key for key in self.proxy_values if not self.converged(key)]

    def to_dict(self, include_spectra: bool = False) -> dict:
        """A JSON-serialisable dict (non-finite floats stay floats; ``commands.base.print_json`` nulls them)."""
        out = {
            "values": dict(self.proxy_values),
            "converged": {key: self.converged(key) for key in self.proxy_values},
            "method": self.method,
            "losses": list(self.losses),
            "input_dim": self.input_dim,
            "num_params": self.num_params,
            "seconds": self.seconds,
            "diagnostics": {key: result.to_dict() for key, result in self.diagnostics.items()},
            "fusions": {key: [list(p) for p in parts] for key, parts in self.fusions.items()},
        }
        if include_spectra:
            out["spectra"] = {key: [float(v) for v in values] for key, values in self.spectra.items()}
        return out


def resolve_method(method: str, input_dim: int, config: SolverConfig = DEFAULT_SOLVER) -> str:
    """``auto`` -> ``exact`` when the input has at most ``config.exact_max_dim`` values, else ``lanczos``."""
    if method == "auto":
        return "exact" if input_dim <= config.exact_max_dim else "lanczos"
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of auto, {', '.join(METHODS)}")
    return method


def _resolve_losses(losses: Sequence[str | MatchingLoss]) -> list[MatchingLoss]:
    if isinstance(losses, (str, MatchingLoss)):
        losses = (losses,)
    resolved = [loss if isinstance(loss, MatchingLoss) else get_loss(loss) for loss in losses]
    if not resolved:
        raise ConfigError("choose at least one matching loss, e.g. losses=('l2', 'cos')")
    names = [loss.name for loss in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"each matching loss may appear once, got {names}")
    keys = [proxy_key(name, "max") for name in names]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"losses {names} give clashing proxy names {keys}")
    return resolved


def _resolve_fusions(names: tuple[str, ...], extra: Mapping[str, Sequence[tuple[str, str]]]
                     ) -> dict[str, tuple[tuple[str, str], ...]]:
    """The table's fusions whose losses are all computed, plus the caller's named fusions."""
    table = proxy_table(names)
    parts = {d.name: d.parts for d in table if d.kind == "fusion"}
    taken = {d.name for d in table}
    for name, pairs in extra.items():
        if name in taken:
            raise ConfigError(f"fusion name {name!r} is already a proxy name; choose another")
        pairs = tuple((str(loss), str(extreme)) for loss, extreme in pairs)
        for loss, extreme in pairs:
            if loss not in names:
                raise ConfigError(f"fusion {name!r} uses loss {loss!r}, which is not among the losses "
                                  f"{names}")
            proxy_key(loss, extreme)
        parts[name] = pairs
        taken.add(name)
    return parts


def compute_proxies(model: nn.Module, image: torch.Tensor, label: int, *,
                    losses: Sequence[str | MatchingLoss] = ("l2", "cos"), method: str = "auto",
                    config: SolverConfig | None = None,
                    fusions: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                    device: torch.device | str | None = None) -> ProxyResult:
    """The gradient norm, λ_max and λ_min of each loss's Hessian at x* (LAVP), and fusions.

    Args:
        model: any ``torch.nn.Module`` classifier mapping (1, C, H, W) to (1, classes) logits; it is
            not modified (a private eval-mode copy is used; no ``.grad`` is written).
        image: the normalised image x* (1, C, H, W) the model consumes.
        label: the client's label, an int in [0, classes).
        losses: matching-loss names (or :class:`~lavp_core.losses.MatchingLoss` objects).
        method: ``"auto"`` (``exact`` up to ``config.exact_max_dim`` input values, else ``lanczos``),
            ``"exact"``, ``"lanczos"`` or ``"paper"``.
        config: solver settings (:class:`~lavp_core.hessian.SolverConfig`).
        fusions: extra named geometric fusions, ``{"name": [(loss, extreme), ...]}``.
        device: where to compute (default: the model's device).

    Returns:
        A :class:`ProxyResult`: ``result["l2_max"]`` etc. are floats; ``result.diagnostics`` and
        ``result.spectra`` hold the evidence. Keys: ``grad_norm``, ``{loss}_max``, ``{loss}_min`` for
        every loss (see :func:`proxy_key`), ``fusion`` when ``l2`` and ``cos`` are both computed, and
        the names in ``fusions``.

    Raises:
        ModelError: the model's output is not (1, classes), or the image is not (1, C, H, W) or does
            not fit the model.
        ConfigError: the label is out of range, or a loss, method or fusion is unknown.
        ProxyError: a Hessian cannot be formed (zero gradient for the cosine losses, a loss that is not
            twice differentiable at x*, non-finite values).
    """
    began = time.perf_counter()
    config = config or SolverConfig()
    if method != "auto" and method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose one of auto, {', '.join(METHODS)}")
    if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
        raise ConfigError(f"label must be an int, got {type(label).__name__}")
    label = int(label)
    chosen = _resolve_losses(losses)
    fusion_parts = _resolve_fusions(tuple(loss.name for loss in chosen), fusions or {})

    model_oracle = GradientOracle(model, device=device)
    model_oracle.check(image, label)
    if config.precision == "float64" and model_oracle.dtype != torch.float64:
        oracle = GradientOracle(model_oracle.module, device=model_oracle.device, dtype=torch.float64)
    else:
        oracle = model_oracle
    input_dim = int(image[0].numel())
    resolved = resolve_method(method, input_dim, config)
    op = HessianAtTruth(oracle, image, label, config.jacobian_products)
    if not math.isfinite(op.g_norm):
        raise ProxyError(f"the model's weight gradient at this image is not finite (norm {op.g_norm}); "
                         f"check the model's weights and the image normalisation")
    fd_op = None
    if resolved == "paper":
        fd_op = op if oracle is model_oracle else HessianAtTruth(model_oracle, image, label,
                                                                 config.jacobian_products)
    spectra = solve(op, chosen, resolved, config, fd_op=fd_op)

    values: dict[str, float] = {}
    diagnostics: dict[str, EigenResult] = {}
    gradient = model_oracle.gradient(image, label)
    for definition in proxy_table([loss.name for loss in chosen]):
        if definition.kind == "gradient":
            values[definition.name] = float(definition.compute(gradient))
        elif definition.kind == "eigenvalue":
            result = getattr(spectra[definition.loss], definition.extreme)
            values[definition.name] = float(result.value)
            diagnostics[definition.name] = result
    for name, pairs in fusion_parts.items():
        values[name] = geometric_fusion(values, pairs)
    eigenvalues = {name: s.eigenvalues for name, s in spectra.items() if s.eigenvalues is not None}
    return ProxyResult(values, diagnostics, eigenvalues, fusion_parts, resolved,
                       tuple(loss.name for loss in chosen), input_dim, op.num_params,
                       time.perf_counter() - began)
