"""Hessians of gradient-matching losses with respect to the input at the ground truth x*, and their
extreme eigenvalues (the paper's LAVP).

Notation: x* is the client's normalised image flattened to d values, g(x) the flattened weight
gradient (n,), g* = g(x*), ĝ = g*/‖g*‖ and J = ∂g/∂x at x* (n × d). At x* the matching losses have

* ``l2`` (½‖g − g*‖²):          H = JᵀJ
* ``cos`` (1 − cos(g, g*)):      H = Jᵀ(I − ĝĝᵀ)J / ‖g*‖²  =  (JᵀJ − wwᵀ) / ‖g*‖²,  w = Jᵀĝ
* any other registered loss:     H = ∇²ₓ loss(g(x), g*) at x*, by forward-over-reverse autodiff.

:class:`HessianAtTruth` holds the linearisation at x*: g* and the reverse-mode map u ↦ Jᵀu, built once
by ``torch.func.vjp`` and reused by every product. Jv for a batch of directions (the dense path's
chunks of columns) is vmapped forward mode, ``torch.func.jvp``: the primal is computed once per batch
and only the tangents are batched. Jv for one direction at a time (Lanczos, ARPACK, residuals) comes
one of two exact ways (``SolverConfig.jacobian_products``):

* ``"reverse"`` (default): u ↦ Jᵀu is linear, so its own vjp is v ↦ Jv. That transpose is built once
  from the stored map (``torch.func.vjp`` of it, 10–50 ms) and every Jv replays it without
  recomputing the model: about three times cheaper than a ``torch.func.jvp`` on lenet and resnet8.
* ``"forward"``: ``torch.func.jvp`` (recomputes the primal each call), or for long runs of single
  products a map built once by ``torch.func.linearize`` (about 0.3 s to build).

The two agree to round-off (tested against each other on every registered architecture, and against
a dense Hessian). No finite differences are used except by the ``paper`` recipe, which reproduces
the paper's method.

Three eigen-solvers, each returning :class:`EigenResult` values that carry their residual:

* ``exact``: the dense d × d Hessian in float64, built a chunk of columns at a time (U = J E by vmapped
  Jv, then Jᵀ U by vmapped vjp), then every eigenvalue (the spectrum) and the two extreme eigenvectors
  from one in-place tridiagonal reduction. Peak memory is the larger of the d × d matrix's upper
  half plus ``memory_mb`` (while the chunks run) and the whole matrix (while it is decomposed).
* ``lanczos``: matrix-free, for large inputs: λ_max of the closed forms by one subspace iteration
  over products of JᵀJ started from Jᵀĝ (:func:`closed_form_tops`: Rayleigh–Ritz for ``l2`` and
  ``cos`` at once, the cosine's rank-one term exact because Jᵀĝ stays in the basis; the top of these
  Hessians is well separated and Jᵀĝ leans towards it, so a handful of products certify both), of
  other losses by Lanczos with full reorthogonalisation (:func:`lanczos_top`); λ_min by ARPACK's
  implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``) within a product budget.
* ``paper``: the paper's recipe: finite-difference Jacobian-vector products, power iteration for
  λ_max, then power iteration on (λ_max·I − H) for λ_min, each within an iteration budget.

Every residual is ‖Hv − λv‖ / |λ| with H applied by exact autodiff, whatever produced λ and v; a value
counts as converged only when that residual is at most ``SolverConfig.tol``.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.linalg
import scipy.linalg.lapack as lapack
import scipy.sparse.linalg as sparse_linalg
import torch
from torch.func import grad, jvp, linearize, vjp, vmap

from ..errors import ConfigError, ProxyError
from ..gradients import GradientOracle
from ..losses import MatchingLoss

# Two notices torch prints from inside its own forward-mode code, nothing a user can act on:
# torch.func.jvp's first call warns that torch.jit.script is deprecated, and torch.func.linearize's
# constant folding warns about an internal detail of its trace on every build. Filtered here (not in
# the CLI) so that the study's worker processes and the app are quiet too.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)

METHODS = ("exact", "lanczos", "paper")
JACOBIAN_PRODUCTS = ("reverse", "forward")
EXTREMES = ("max", "min")


def _check_jacobian_products(value: str) -> str:
    if value not in JACOBIAN_PRODUCTS:
        raise ConfigError(f"jacobian_products must be 'reverse' or 'forward', got {value!r}")
    return value


# PyTorch's forward-mode AD levels (``torch.func.jvp``/``linearize``) are process-global: two threads
# running forward-mode products at once corrupt each other's levels ("Trying to access a forward AD
# level with an invalid index"). Every forward-mode computation in this module holds this re-entrant
# lock, so any multi-threaded caller (the app's worker threads) is safe without knowing it.
FORWARD_AD_LOCK = threading.RLock()


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
            linearisation) or ``"forward"`` (``torch.func.jvp``/``linearize``); see the module notes.
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
        seed: seed of the start vectors (``lanczos``, ``paper``).
        check_smoothness: for losses without a closed form, compare one autodiff Hessian-vector
            product with a finite difference first, to refuse losses that are not twice
            differentiable at x*.
    """

    tol: float = 1e-4
    exact_max_dim: int = 12_288
    precision: str = "float64"
    jacobian_products: str = "reverse"
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
        if self.precision not in ("float64", "model"):
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
    which: str  # "max" | "min"
    method: str  # "exact" | "lanczos" | "paper"
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


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(a.norm()), float(b.norm()))
    return float((a - b).norm()) / scale if scale > 0 else 0.0


class HessianAtTruth:
    """Matrix-free Hessians of matching losses w.r.t. the input at the ground truth x*.

    Args:
        oracle: the model's :class:`~lavp_core.gradients.GradientOracle`; its dtype is the dtype of
            every product.
        image: the client's normalised image x* (1, C, H, W).
        label: the client's label.
        jacobian_products: ``"reverse"`` or ``"forward"``, how :meth:`jv` computes Jv (see the
            module notes).
    """

    def __init__(self, oracle: GradientOracle, image: torch.Tensor, label: int,
                 jacobian_products: str = "reverse"):
        self.jacobian_products = _check_jacobian_products(jacobian_products)
        self.oracle = oracle
        self.shape = tuple(int(s) for s in image.shape[1:])  # (C, H, W)
        self.dim = math.prod(self.shape)
        self.dtype = oracle.dtype
        self.device = oracle.device
        self.layout = oracle.layout
        self.x_star = image.detach()[0].to(oracle.device, oracle.dtype)  # (C, H, W)
        self.gradient_fn = oracle.gradient_fn(int(label))
        g_star, self._pullback = vjp(self.gradient_fn, self.x_star)  # the linearisation, built once
        self.g_star = g_star.detach()  # (n,)
        self.num_params = int(self.g_star.numel())
        self.g_norm = float(self.g_star.norm())
        self._loss_gradients: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._activations: int | None = None
        self._linear_jvp: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._transpose: Callable[[torch.Tensor], tuple[torch.Tensor]] | None = None

    # ---- building blocks -----------------------------------------------------------------------

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v (n,) for an input direction v (C, H, W), by forward-mode autodiff (vmap-able)."""
        with FORWARD_AD_LOCK:
            return jvp(self.gradient_fn, (self.x_star,), (v,))[1]

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        """J v (n,) for one input direction v (C, H, W) by the configured path (vmap-able, but for
        many directions at once ``vmap(self.jvp)`` is cheaper: it computes the primal once)."""
        if self.jacobian_products == "forward":
            return self.jvp(v)
        return self._reverse_jv()(v)[0]

    def _reverse_jv(self) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
        """Build (once) and return v ↦ (Jv,): the vjp of the linear map u ↦ Jᵀu, taken at u = 0
        (10–50 ms; on resnet8 at 64×64 a product through it takes no more memory than a forward-mode
        one)."""
        if self._transpose is None:
            self._transpose = vjp(self.vjp, torch.zeros_like(self.g_star))[1]
        return self._transpose

    def linearise(self) -> None:
        """For ``"forward"`` products, build the forward-mode linearisation v ↦ Jv at x*
        (``torch.func.linearize``) for long runs of single products: it costs about 0.3 s (longer on
        deep models) once, after which each Jv is 3–7 times cheaper than :meth:`jvp`, which
        recomputes the primal every time. ``"reverse"`` products need nothing more: a no-op."""
        if self.jacobian_products == "reverse":
            return
        with FORWARD_AD_LOCK:
            if self._linear_jvp is None:
                _, self._linear_jvp = linearize(self.gradient_fn, self.x_star)

    def single_jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v (n,) for one direction v (C, H, W): :meth:`jv`, or the forward-mode linearisation
        once :meth:`linearise` has built it."""
        if self._linear_jvp is None:
            return self.jv(v)
        with FORWARD_AD_LOCK:
            return self._linear_jvp(v)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ u (C, H, W) for a gradient-space vector u (n,), through the stored linearisation."""
        return self._pullback(u)[0]

    @property
    def unit_gradient(self) -> torch.Tensor:
        """ĝ = g*/‖g*‖ (n,); refuses a zero gradient, for which the cosine loss is undefined."""
        if not self.g_norm > 0 or not math.isfinite(self.g_norm):
            raise ProxyError(f"the weight gradient at x* has norm {self.g_norm:g}, so the cosine matching "
                             f"loss and its Hessian are undefined there (the model is saturated on this "
                             f"image); use the 'l2' loss or another image or model")
        return self.g_star / self.g_norm

    def loss_gradient(self, loss: MatchingLoss) -> Callable[[torch.Tensor], torch.Tensor]:
        """x (C, H, W) -> ∇ₓ loss(g(x), g*) (C, H, W), composable with jvp and vmap."""
        if loss.name not in self._loss_gradients:
            def matching_loss(x: torch.Tensor) -> torch.Tensor:
                return loss(self.gradient_fn(x), self.g_star, self.layout)

            self._loss_gradients[loss.name] = grad(matching_loss)
        return self._loss_gradients[loss.name]

    # ---- Hessian-vector products ---------------------------------------------------------------

    def closed_form_hvp(self, form: str, v: torch.Tensor) -> torch.Tensor:
        """H v (C, H, W) by the closed form at x*: ``"l2"`` JᵀJv, ``"cos"`` Jᵀ(I − ĝĝᵀ)Jv/‖g*‖²."""
        u = self.single_jvp(v)  # (n,)
        if form == "cos":
            unit = self.unit_gradient
            u = (u - unit * torch.dot(unit, u)) / self.g_norm ** 2
        elif form != "l2":
            raise ConfigError(f"unknown closed form {form!r}: expected 'l2' or 'cos'")
        return self.vjp(u)

    def autodiff_hvp(self, loss: MatchingLoss, v: torch.Tensor) -> torch.Tensor:
        """H v (C, H, W) of the actual loss at x*, by forward-over-reverse autodiff."""
        with FORWARD_AD_LOCK:
            return jvp(self.loss_gradient(loss), (self.x_star,), (v,))[1]

    def hvp(self, loss: MatchingLoss, v: torch.Tensor, closed_form: bool = True) -> torch.Tensor:
        """H v (C, H, W): the loss's closed form when it has one and ``closed_form``, else autodiff."""
        if closed_form and loss.closed_form is not None:
            return self.closed_form_hvp(loss.closed_form, v)
        return self.autodiff_hvp(loss, v)

    def fd_hvp(self, loss: MatchingLoss, v: torch.Tensor, step: float) -> torch.Tensor:
        """H v (C, H, W) as the paper computes it: J v by a central finite difference of g (then the
        closed form and Jᵀ by autodiff), or, for losses without a closed form, a central difference
        of the loss gradient. ``v`` is scaled to unit norm for the difference and back after."""
        scale = float(v.norm())
        if scale == 0:
            return torch.zeros_like(v)
        direction = v / scale
        plus, minus = self.x_star + step * direction, self.x_star - step * direction
        if loss.closed_form is None:
            fn = self.loss_gradient(loss)
            return (fn(plus) - fn(minus)) * (scale / (2 * step))
        u = (self.gradient_fn(plus) - self.gradient_fn(minus)) * (scale / (2 * step))  # ≈ J v (n,)
        if loss.closed_form == "cos":
            unit = self.unit_gradient
            u = (u - unit * torch.dot(unit, u)) / self.g_norm ** 2
        return self.vjp(u)

    # ---- dense Hessians ------------------------------------------------------------------------

    def chunk_size(self, config: SolverConfig, third_order: bool = False) -> int:
        """Columns per chunk so that one chunk's tensors fit in ``config.memory_mb``."""
        # Measured (growth of the peak RSS per extra column) on lenet and resnet8 at 32² and 64²:
        # 2–3 values per parameter and input value plus about 3.3 per activation; these factors keep
        # a margin above that. Third-order columns (autodiff of a loss gradient) hold twice as much.
        bytes_per_value = torch.finfo(self.dtype).bits // 8
        per_column = bytes_per_value * (3 * (self.num_params + self.dim)
                                        + (8 if third_order else 4) * self._activation_count())
        return int(max(1, min(config.max_chunk, self.dim, config.memory_mb * 2 ** 20 // per_column)))

    def _activation_count(self) -> int:
        if self._activations is None:
            counts: list[int] = []
            hooks = [m.register_forward_hook(lambda _m, _i, out: counts.append(
                out.numel() if isinstance(out, torch.Tensor) else 0))
                for m in self.oracle.module.modules() if not list(m.children())]
            try:
                with torch.no_grad():
                    self.oracle.logits(self.x_star.unsqueeze(0))
            finally:
                for h in hooks:
                    h.remove()
            self._activations = max(sum(counts), self.dim)
        return self._activations

    def _basis(self, start: int, stop: int) -> torch.Tensor:
        """Unit input directions e_start..e_{stop-1} as (stop − start, C, H, W)."""
        e = torch.zeros(stop - start, self.dim, dtype=self.dtype, device=self.device)
        e[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        return e.view(stop - start, *self.shape)

    def gram(self, config: SolverConfig = DEFAULT_SOLVER) -> np.ndarray:
        """JᵀJ (d, d) in float64 (the ``l2`` Hessian), built a chunk of columns at a time.

        While the chunks run only the upper triangle of each computed row is stored (see
        :func:`_store_upper`), so the chunks' working memory and the d × d matrix's lower half
        are never resident together.
        """
        h = _dense_matrix(self.dim)
        chunk = self.chunk_size(config)
        jacobian_columns = vmap(self.jvp)  # forward mode: the primal once per chunk
        pullback = vmap(self.vjp)
        for start in range(0, self.dim, chunk):
            stop = min(start + chunk, self.dim)
            u = jacobian_columns(self._basis(start, stop))  # (c, n) = (J E)ᵀ
            rows = pullback(u).reshape(stop - start, self.dim)  # (c, d) = (Jᵀ J E)ᵀ
            _store_upper(h, start, rows.detach().to("cpu", torch.float64).numpy(), "l2")
            del u, rows
        _mirror_upper(h)
        return h

    def cosine_from_gram(self, h: np.ndarray) -> None:
        """Turn JᵀJ (d, d) into the ``cos`` Hessian (JᵀJ − wwᵀ)/‖g*‖² in place, w = Jᵀĝ."""
        w = self.vjp(self.unit_gradient).reshape(-1).detach().to("cpu", torch.float64).numpy()  # (d,)
        scale = 1.0 / self.g_norm ** 2
        rows = _block_rows(self.dim)
        for start in range(0, self.dim, rows):
            stop = min(start + rows, self.dim)
            block = h[start:stop]
            block -= np.outer(w[start:stop], w)
            block *= scale

    def dense(self, loss: MatchingLoss, closed_form: bool = True,
              config: SolverConfig = DEFAULT_SOLVER) -> np.ndarray:
        """The Hessian (d, d) in float64 of one loss at x*: closed form or autodiff (see :meth:`hvp`)."""
        if closed_form and loss.closed_form is not None:
            h = self.gram(config)
            if loss.closed_form == "cos":
                self.cosine_from_gram(h)
            return h
        h = _dense_matrix(self.dim)
        chunk = self.chunk_size(config, third_order=True)
        columns = vmap(lambda e: self.autodiff_hvp(loss, e))
        for start in range(0, self.dim, chunk):
            stop = min(start + chunk, self.dim)
            try:
                rows = columns(self._basis(start, stop))
            except RuntimeError as exc:
                raise _not_differentiable(loss, exc) from exc
            _store_upper(h, start, rows.reshape(stop - start, self.dim).detach().to("cpu", torch.float64)
                         .numpy(), loss.name)
            del rows
        _mirror_upper(h)
        return h

    # ---- checks ----------------------------------------------------------------------------------

    def check_smoothness(self, loss: MatchingLoss, generator: torch.Generator,
                         tolerance: float = 0.05) -> None:
        """Refuse a loss that is not twice differentiable at x*: its autodiff Hessian-vector
        product along a random unit direction must be finite and agree with a central difference
        of the loss gradient (``ProxyError`` otherwise). The step suits the dtype's round-off."""
        step = 1e-4 if self.dtype == torch.float64 else 3e-2
        v = torch.randn(self.dim, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
        v = (v / v.norm()).view(self.shape)
        try:
            exact = self.autodiff_hvp(loss, v)
            fn = self.loss_gradient(loss)
            plus, minus = fn(self.x_star + step * v), fn(self.x_star - step * v)
        except RuntimeError as exc:
            raise _not_differentiable(loss, exc) from exc
        if not bool(torch.isfinite(exact).all()):
            raise ProxyError(f"the Hessian of matching loss {loss.name!r} at x* is not finite: the loss is "
                             f"not twice differentiable where g = g* (e.g. a norm without a square); use "
                             f"a smooth loss such as 'l2' or 'cos'")
        finite_difference = (plus - minus) / (2 * step)
        gap = _relative_gap(exact, finite_difference)
        if gap > tolerance:
            raise ProxyError(f"matching loss {loss.name!r} is not twice differentiable at x*: its autodiff "
                             f"Hessian-vector product differs from a finite difference of its gradient by "
                             f"{gap:.0%} (a kink such as an absolute value at g = g*); LAVP needs a smooth "
                             f"loss, e.g. 'l2' or 'cos'")


def _not_differentiable(loss: MatchingLoss, exc: Exception) -> ProxyError:
    first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return ProxyError(f"cannot form the Hessian of matching loss {loss.name!r} at x* by autodiff ({first}); "
                      f"the loss must be a twice-differentiable torch function of (g, g_star, layout)")


def _check_finite(h: np.ndarray, loss_name: str) -> None:
    if not np.isfinite(h).all():
        raise ProxyError(f"the Hessian of matching loss {loss_name!r} at x* has non-finite entries: the loss "
                         f"or the model's gradient is not twice differentiable (or overflows) at this "
                         f"image; try another loss, image or model")


def _block_rows(d: int, budget_bytes: int = 16 * 2 ** 20) -> int:
    """Rows of a (rows, d) float64 temporary that fit in ``budget_bytes``."""
    return int(max(16, min(d, budget_bytes // (8 * d))))


def _dense_matrix(d: int) -> np.ndarray:
    """An uninitialised (d, d) float64 matrix whose memory becomes resident only where it is written.

    numpy asks the kernel for transparent huge pages on large arrays (2 MiB each, ~21 rows of a
    d = 12,288 matrix), so writing only the upper triangle would still make the whole matrix resident.
    Large matrices are therefore mapped here with huge pages declined (4 KiB pages), Linux only.
    """
    size = 8 * d * d
    if size < 2 ** 24 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty((d, d), dtype=np.float64)
    buffer = mmap.mmap(-1, size)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=np.float64).reshape(d, d)


def _store_upper(h: np.ndarray, start: int, rows: np.ndarray, loss_name: str) -> None:
    """Store the upper-triangle part of Hessian rows start … start + c − 1 (c, d) into h (d, d).

    The two triangles of a computed Hessian agree to round-off; keeping one of them (which
    LAPACK's tridiagonal reduction reads anyway) leaves the pages of h's lower triangle untouched
    until :func:`_mirror_upper`, i.e. until the chunks' tensors are gone. For a 64×64×3 input
    (d = 12,288, h = 1.1 GiB) that keeps the peak at one matrix instead of one plus the chunks'.
    """
    _check_finite(rows, loss_name)
    for k in range(rows.shape[0]):
        i = start + k
        h[i, i:] = rows[k, i:]


def _mirror_upper(h: np.ndarray) -> None:
    """Copy h's upper triangle onto its lower triangle, a block at a time (no d × d temporary),
    after giving the memory freed by the chunks back to the operating system."""
    release_freed_memory()
    d = h.shape[0]
    block = _block_rows(d)
    for i in range(0, d, block):
        i1 = min(i + block, d)
        square = h[i:i1, i:i1]
        upper = np.triu(square)
        square[...] = upper + np.triu(upper, 1).T
        h[i1:, i:i1] = h[i:i1, i1:].T


_LIBC: ctypes.CDLL | None | bool = False


def release_freed_memory() -> None:
    """Ask glibc to hand heap pages freed by torch back to the operating system (``malloc_trim``),
    so that a large allocation that follows does not stack on top of them; a no-op elsewhere."""
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = None
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


# ---- dense symmetric eigen-decomposition -----------------------------------------------------------


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


# ---- solvers ---------------------------------------------------------------------------------------


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


def _result(op: HessianAtTruth, loss: MatchingLoss, which: str, method: str, value: float,
            vector, iterations: int, seconds: float, config: SolverConfig, scale: float | None,
            solver_ok: bool = True, note: str = "") -> EigenResult:
    absolute = residual_of(op, loss, value, vector) if vector is not None else math.inf
    relative = absolute / abs(value) if value != 0 and math.isfinite(value) else math.inf
    vs_norm = absolute / abs(scale) if scale else math.nan
    converged = bool(solver_ok and relative <= config.tol)
    if relative > config.tol:
        above = f"relative residual {relative:.1e} is above the tolerance {config.tol:g}"
        note = f"{note}; {above}" if note else above
    return EigenResult(float(value), which, method, float(relative), converged, int(iterations),
                       float(seconds), float(config.tol), float(vs_norm), note)


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


def _certified(op: HessianAtTruth, loss: MatchingLoss, eigenvalues: np.ndarray, v_min: np.ndarray,
               v_max: np.ndarray, seconds: float, config: SolverConfig) -> LossSpectrum:
    top, bottom = float(eigenvalues[-1]), float(eigenvalues[0])
    scale = max(abs(top), abs(bottom))
    results = {which: _result(op, loss, which, "exact", value, vector, op.dim, seconds, config, scale)
               for which, value, vector in (("max", top, v_max), ("min", bottom, v_min))}
    return LossSpectrum(loss.name, results["max"], results["min"], eigenvalues)


class _BudgetSpent(Exception):
    pass


class _RecordingOperator(sparse_linalg.LinearOperator):
    """H as a float64 LinearOperator; remembers the last ``keep`` (v, Hv) pairs and stops at a budget."""

    def __init__(self, op: HessianAtTruth, loss: MatchingLoss, budget: int, keep: int):
        super().__init__(dtype=np.float64, shape=(op.dim, op.dim))
        self.op, self.loss, self.budget, self.keep = op, loss, budget, keep
        self.products = 0
        self.history: list[tuple[np.ndarray, np.ndarray]] = []

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        if self.products >= self.budget:
            raise _BudgetSpent
        self.products += 1
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        hv = self.op.hvp(self.loss, _to_input(self.op, v)).reshape(-1).detach()
        hv = hv.to("cpu", torch.float64).numpy()
        if not np.isfinite(hv).all():
            raise ProxyError(f"a Hessian-vector product of matching loss {self.loss.name!r} at x* is not "
                             f"finite; the loss or the model is not twice differentiable at this image")
        self.history = (self.history + [(v.copy(), hv)])[-self.keep:]
        return hv

    def ritz(self, which: str) -> tuple[float, np.ndarray] | None:
        """The extreme Ritz pair of H on the span of the remembered vectors (Rayleigh–Ritz)."""
        if not self.history:
            return None
        v = np.stack([p[0] for p in self.history], axis=1)  # (d, m)
        hv = np.stack([p[1] for p in self.history], axis=1)  # (d, m)
        u, s, wt = np.linalg.svd(v, full_matrices=False)
        rank = int(np.sum(s > s[0] * 1e-10))
        basis = u[:, :rank]  # orthonormal (d, r)
        h_basis = hv @ (wt[:rank].T / s[:rank])  # H basis (d, r), since basis = v wtᵀ diag(1/s)
        small = basis.T @ h_basis
        values, vectors = np.linalg.eigh(0.5 * (small + small.T))
        i = -1 if which == "max" else 0
        return float(values[i]), basis @ vectors[:, i]


def top_start_vector(op: HessianAtTruth, generator: torch.Generator) -> torch.Tensor:
    """A unit start vector (C, H, W) for λ_max: Jᵀĝ, the input direction that moves the weight
    gradient most along itself, which leans strongly towards the top eigenvector of JᵀJ (and of the
    cosine Hessian), plus a small random part so that no eigen-direction is missed entirely."""
    noise = torch.randn(op.dim, generator=generator, dtype=torch.float64).to(op.device, op.dtype).view(op.shape)
    noise = noise / noise.norm()
    lean = op.vjp(op.g_star / op.g_norm) if op.g_norm > 0 and math.isfinite(op.g_norm) else torch.zeros_like(noise)
    norm = float(lean.norm())
    v = lean / norm + 1e-2 * noise if norm > 0 and math.isfinite(norm) else noise
    return v / v.norm()


def lanczos_top(op: HessianAtTruth, loss: MatchingLoss, start: torch.Tensor, *, tol: float, budget: int,
                basis_size: int, on_step: Callable[[int, float], None] | None = None
                ) -> tuple[float, torch.Tensor | None, int, bool]:
    """λ_max of one loss's Hessian at x* by a Lanczos iteration with full reorthogonalisation.

    After each Hessian-vector product the largest Ritz value θ of the tridiagonal matrix and its
    residual estimate β·|s_last| (equal to ‖Hy − θy‖ for the Ritz vector y in exact arithmetic) are
    updated; the iteration stops when that estimate is at most ``tol``·|θ|, when the Krylov space is
    invariant, or after ``budget`` products. Every ``basis_size`` products it restarts from the
    current Ritz vector. ``on_step(products, θ)`` sees each estimate (for benchmarks).

    Returns ``(θ, Ritz vector (C, H, W) or None, products, converged)``.
    """
    q = start / start.norm()
    products, theta, ritz, converged = 0, math.nan, None, False
    while products < budget and not converged:
        basis: list[torch.Tensor] = []  # orthonormal Lanczos vectors, flattened (d,)
        alphas: list[float] = []
        betas: list[float] = []
        q = q.reshape(-1)
        while len(basis) < basis_size and products < budget:
            basis.append(q)
            w = op.hvp(loss, q.view(op.shape)).reshape(-1).detach()
            products += 1
            if not bool(torch.isfinite(w).all()):
                raise ProxyError(f"a Hessian-vector product of matching loss {loss.name!r} at x* is not "
                                 f"finite; the loss or the model is not twice differentiable at this image")
            alphas.append(float(torch.dot(q, w)))
            stacked = torch.stack(basis, dim=1)  # (d, k)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - stacked @ (stacked.T @ w)
            beta = float(w.norm())
            values, vectors = scipy.linalg.eigh_tridiagonal(np.asarray(alphas), np.asarray(betas))
            theta, s = float(values[-1]), vectors[:, -1]
            estimate = beta * abs(float(s[-1]))
            if on_step is not None:
                on_step(products, theta)
            coefficients = torch.as_tensor(s, dtype=stacked.dtype, device=stacked.device)
            ritz = stacked @ coefficients
            if estimate <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-300):
                converged = True
                break
            betas.append(beta)
            q = w / beta
        q = ritz  # explicit restart from the Ritz vector
    return theta, (ritz.view(op.shape) if ritz is not None else None), products, converged


@dataclass
class TopRitz:
    """The current top Ritz pair of one closed-form Hessian in :func:`closed_form_tops`."""

    value: float = math.nan
    vector: torch.Tensor | None = None  # (C, H, W)
    residual: float = math.inf  # ‖Hy − θy‖ / |θ|, computed explicitly from the stored products
    products: int = 0  # products of JᵀJ spent when it converged (or so far)
    seconds: float = 0.0
    converged: bool = False


def closed_form_tops(op: HessianAtTruth, forms: Sequence[str], generator: torch.Generator, *, tol: float,
                     budget: int, basis_size: int,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, TopRitz]:
    """λ_max of the closed-form Hessians (``"l2"``: A = JᵀJ; ``"cos"``: (A − wwᵀ)/‖g*‖², w = Jᵀĝ)
    from one subspace of products of A, so that asking for both costs little more than one.

    The basis V (orthonormal, d × k) starts with ŵ = w/‖w‖, and the products AV are kept. Because w
    lies in span(V), each Hessian's Rayleigh–Ritz matrix is exact without further products:
    VᵀAV for ``l2``, (VᵀAV − zzᵀ)/‖g*‖² with z = Vᵀw for ``cos``; and so is each Ritz vector's residual,
    Hy − θy, assembled from AV. After each product the forms whose relative residual is at most
    ``tol`` are done; V grows by the residual of the worst remaining one (a random direction of norm
    1e-2 is added to the first such step, so that no eigen-direction is missed entirely). For one form
    this spans the same Krylov space as Lanczos from ŵ. At ``basis_size`` vectors V restarts thick,
    from ŵ and the current Ritz vectors, whose products are combinations of AV (no product spent).
    Stops when every form is done, when V cannot grow (the subspace is invariant, so the Ritz pairs
    are exact), or after ``budget`` products. ``on_step(products, {form: θ})`` sees each estimate.
    """
    unknown = [form for form in forms if form not in ("l2", "cos")]
    if unknown or not forms:
        raise ConfigError(f"closed_form_tops takes the closed forms 'l2' and 'cos', got {list(forms)!r}")
    began = time.perf_counter()
    d = op.dim
    has_gradient = op.g_norm > 0 and math.isfinite(op.g_norm)
    w = (op.vjp(op.unit_gradient).reshape(-1).detach() if has_gradient or "cos" in forms
         else torch.zeros(d, dtype=op.dtype, device=op.device))
    scale = op.g_norm ** 2 if has_gradient else 1.0
    noise = torch.randn(d, generator=generator, dtype=torch.float64).to(op.device, op.dtype)
    basis: list[torch.Tensor] = []  # orthonormal (d,)
    images: list[torch.Tensor] = []  # A v for each v in basis
    found = {form: TopRitz() for form in forms}
    products = 0

    def grow(v: torch.Tensor) -> bool:
        nonlocal products
        before = float(v.norm())
        if basis:
            stacked = torch.stack(basis, dim=1)
            for _ in range(2):  # orthogonalise twice
                v = v - stacked @ (stacked.T @ v)
        norm = float(v.norm())
        if not norm > 1e-10 * before or not math.isfinite(norm):
            return False
        v = v / norm
        av = op.vjp(op.single_jvp(v.view(op.shape))).reshape(-1).detach()
        products += 1
        if not bool(torch.isfinite(av).all()):
            raise ProxyError("a Hessian-vector product at x* is not finite; the model is not twice "
                             "differentiable at this image")
        basis.append(v)
        images.append(av)
        return True

    w_norm = float(w.norm())
    first = w / w_norm if w_norm > 0 and math.isfinite(w_norm) else noise
    grow(first)
    noise_added = first is noise
    while True:
        v_mat, av_mat = torch.stack(basis, dim=1), torch.stack(images, dim=1)  # (d, k)
        projected = (v_mat.T @ av_mat).detach().to("cpu", torch.float64).numpy()
        projected = 0.5 * (projected + projected.T)
        z = (v_mat.T @ w).detach().to("cpu", torch.float64).numpy()
        worst, worst_residual = None, -1.0
        for form, state in found.items():
            if state.converged:
                continue
            matrix = projected if form == "l2" else (projected - np.outer(z, z)) / scale
            values, vectors = np.linalg.eigh(matrix)
            theta, coefficients = float(values[-1]), vectors[:, -1]
            c = torch.as_tensor(coefficients, dtype=op.dtype, device=op.device)
            y, ay = v_mat @ c, av_mat @ c
            hy = ay if form == "l2" else (ay - w * torch.dot(w, y)) / scale
            r = hy - theta * y
            relative = float(r.norm()) / abs(theta) if theta != 0 else math.inf
            state.value, state.vector, state.residual = theta, y.view(op.shape), relative
            state.products, state.seconds = products, time.perf_counter() - began
            if relative <= tol:
                state.converged = True
            elif relative > worst_residual:
                worst, worst_residual = r, relative
        if on_step is not None:
            on_step(products, {form: state.value for form, state in found.items()})
        if worst is None or products >= budget:
            break
        if len(basis) >= basis_size:  # thick restart from ŵ and the Ritz vectors: no products spent
            keep = [v_mat.T @ state.vector.reshape(-1) for state in found.values()]  # V orthonormal
            coefficients = torch.stack([torch.eye(len(basis), dtype=op.dtype, device=op.device)[0], *keep], 1)
            q, _ = torch.linalg.qr(coefficients)
            basis, images = list((v_mat @ q).T), list((av_mat @ q).T)
        if not noise_added:
            worst = worst + 1e-2 * float(worst.norm()) * noise / float(noise.norm())
            noise_added = True
        if not grow(worst):  # the subspace is invariant: its Ritz pairs are exact
            for state in found.values():
                state.converged = state.converged or state.residual <= tol
            break
    return found


def lanczos_tops(op: HessianAtTruth, losses: Sequence[MatchingLoss], config: SolverConfig = DEFAULT_SOLVER,
                 generator: torch.Generator | None = None) -> dict[str, EigenResult]:
    """λ_max of closed-form losses by :func:`closed_form_tops` (one shared subspace), each certified
    by an exact residual. Losses without a closed form are refused (use :func:`lanczos_extreme`)."""
    if any(loss.closed_form is None for loss in losses):
        raise ConfigError("lanczos_tops takes closed-form losses only ('l2', 'cos')")
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    forms = sorted({loss.closed_form for loss in losses}, key=lambda form: form != "l2")
    tops = closed_form_tops(op, forms, generator, tol=config.tol, budget=config.lanczos_max_products,
                            basis_size=max(3, min(config.lanczos_ncv_max, op.dim)))
    out = {}
    for loss in losses:
        top = tops[loss.closed_form]
        note = "" if top.converged else (f"Lanczos did not converge within {config.lanczos_max_products} "
                                         f"Hessian-vector products; the value is the best Ritz estimate so far")
        out[loss.name] = _result(op, loss, "max", "lanczos", top.value, top.vector, top.products, top.seconds,
                                 config, abs(top.value), top.converged, note)
    return out


def lanczos_extreme(op: HessianAtTruth, loss: MatchingLoss, which: str,
                    config: SolverConfig = DEFAULT_SOLVER, generator: torch.Generator | None = None,
                    scale: float | None = None) -> EigenResult:
    """λ_max or λ_min of one loss's Hessian at x* by Lanczos on Hessian-vector products.

    λ_max: :func:`lanczos_top` from :func:`top_start_vector`. λ_min: ARPACK's implicitly restarted
    Lanczos (the bottom of these spectra is clustered). Each stops at ``config.tol`` or at its product
    budget; an unconverged value is the best Rayleigh–Ritz estimate so far, marked unconverged.
    ``scale`` (|λ_max| when known) gives ``residual_vs_norm``.
    """
    if which not in EXTREMES:
        raise ConfigError(f"which must be 'max' or 'min', got {which!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    if which == "max" and op.dim > 2 and loss.closed_form is not None:
        return lanczos_tops(op, [loss], config, generator)[loss.name]
    if which == "max" and op.dim > 2:
        # Never a linearize trace for λ_max (forward products): ten products cost less than building one.
        start = time.perf_counter()
        value, vector, products, solver_ok = lanczos_top(
            op, loss, top_start_vector(op, generator), tol=config.tol, budget=config.lanczos_max_products,
            basis_size=min(config.lanczos_ncv_max, op.dim))
        seconds = time.perf_counter() - start
        note = "" if solver_ok else (f"Lanczos did not converge within {config.lanczos_max_products} "
                                     f"Hessian-vector products; the value is the best Ritz estimate so far")
        return _result(op, loss, which, "lanczos", value, vector, products, seconds, config,
                       scale if scale is not None else abs(value), solver_ok, note)
    budget = config.lanczos_max_products if which == "max" else config.lanczos_min_products
    ncv = config.lanczos_ncv_max if which == "max" else config.lanczos_ncv_min
    ncv = min(ncv, op.dim - 1) if op.dim > 2 else op.dim
    operator = _RecordingOperator(op, loss, budget, keep=max(ncv, 2))
    start_vector = torch.randn(op.dim, generator=generator, dtype=torch.float64).numpy()
    start = time.perf_counter()
    if op.dim > 2:
        op.linearise()  # forward products: λ_min takes hundreds, so trace once (no-op for reverse)
    solver_ok, note = True, ""
    if op.dim <= 2:  # ARPACK needs k < d − 1; two products give the whole matrix
        for e in np.eye(op.dim):
            operator.matvec(e)
        found = operator.ritz(which)
    else:
        try:
            values, vectors = sparse_linalg.eigsh(operator, k=1, which="LA" if which == "max" else "SA",
                                                  tol=config.tol, ncv=ncv, v0=start_vector,
                                                  maxiter=max(1, budget))
            found = (float(values[0]), vectors[:, 0])
        except (_BudgetSpent, sparse_linalg.ArpackNoConvergence):
            solver_ok = False
            found = operator.ritz(which)
            note = (f"Lanczos did not converge within {budget} Hessian-vector products; the value is the "
                    f"best Rayleigh–Ritz estimate so far")
    seconds = time.perf_counter() - start
    if found is None:
        return EigenResult(math.nan, which, "lanczos", math.inf, False, operator.products, seconds,
                           config.tol, math.nan, "no Hessian-vector product was computed")
    value, vector = found
    if scale is None and which == "max":
        scale = abs(value)
    return _result(op, loss, which, "lanczos", value, vector, operator.products, seconds, config, scale,
                   solver_ok, note)


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
    reported are re-measured on ``op`` with exact autodiff."""
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)

    def apply(v: torch.Tensor) -> torch.Tensor:
        hv = fd_op.fd_hvp(loss, v, config.paper_fd_step)
        if not bool(torch.isfinite(hv).all()):
            raise ProxyError(f"a finite-difference Hessian-vector product of {loss.name!r} is not finite")
        return hv

    results: dict[str, EigenResult] = {}
    shift = None
    for which in EXTREMES:
        start_vector = torch.randn(fd_op.dim, generator=generator, dtype=torch.float64)
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


def solve(op: HessianAtTruth, losses: Sequence[MatchingLoss], method: str,
          config: SolverConfig = DEFAULT_SOLVER,
          fd_op: HessianAtTruth | None = None) -> dict[str, LossSpectrum]:
    """λ_max and λ_min (and for ``exact`` the spectrum) of each loss's Hessian at x*.

    Args:
        op: the Hessian operator in ``config.precision`` (products and residuals).
        losses: the matching losses.
        method: ``"exact"``, ``"lanczos"`` or ``"paper"``.
        fd_op: the operator in the model's own dtype for the ``paper`` recipe (default: ``op``).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown eigen-solver {method!r}: choose one of {', '.join(METHODS)} (or 'auto')")
    generator = torch.Generator().manual_seed(config.seed)
    if config.check_smoothness:
        for loss in losses:
            if loss.closed_form is None:
                op.check_smoothness(loss, generator)
    if method == "exact":
        return exact_spectra(op, losses, config)
    out: dict[str, LossSpectrum] = {}
    closed = [loss for loss in losses if loss.closed_form is not None]
    # The closed forms' maxima share one subspace of products (both for the cost of about one).
    tops = lanczos_tops(op, closed, config, generator) if method == "lanczos" and closed and op.dim > 2 else {}
    for loss in losses:
        if method == "lanczos":
            top = tops.get(loss.name) or lanczos_extreme(op, loss, "max", config, generator)
            bottom = lanczos_extreme(op, loss, "min", config, generator, scale=abs(top.value))
        else:
            top, bottom = paper_extremes(fd_op or op, op, loss, config, generator)
        out[loss.name] = LossSpectrum(loss.name, top, bottom)
    return out
