"""The Hessian operators at the ground truth x*: :class:`HessianAtTruth` and its products.

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
a dense Hessian). Finite differences appear only in :meth:`HessianAtTruth.fd_hvp` (the paper's recipe)
and in :meth:`HessianAtTruth.check_smoothness`.

The dense Hessian (d, d) in float64 is built here a chunk of columns at a time (U = J E by vmapped Jv,
then Jᵀ U), its memory laid out by :mod:`lavp_core.hessian.memory`. Jᵀ U for a chunk comes by forward
mode too: g = ∇_θ ℓ(θ, x) for the cross-entropy ℓ, so by the symmetry of mixed partials Jᵀu =
∂/∂t ∇ₓ ℓ(θ + t·u, x*), a jvp of θ ↦ ∇ₓ ℓ(θ, x*) (a forward and an input-gradient pass, no weight
gradients), about 1.4 times cheaper per column than the vjp through g on lenet and resnet8. Its first
column is checked against the vjp (it must be the same map, to round-off), else the vjp is used.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, linearize, vjp, vmap

from ..errors import ConfigError, ProxyError
from ..gradients import GradientOracle
from ..losses import MatchingLoss
from .config import DEFAULT_SOLVER, ClosedForm, JacobianProducts, SolverConfig, _check_jacobian_products
from .memory import _block_rows, _dense_matrix, _mirror_upper, _store_upper, retained_heap

# PyTorch's forward-mode AD levels (``torch.func.jvp``/``linearize``) are process-global: two threads
# running forward-mode products at once corrupt each other's levels ("Trying to access a forward AD
# level with an invalid index"). Every forward-mode computation in this module holds this re-entrant
# lock (through :func:`forward_mode` where torch may warn), so any multi-threaded caller (the app's
# worker threads) is safe without knowing it.
FORWARD_AD_LOCK = threading.RLock()


@contextmanager
def forward_mode() -> Iterator[None]:
    """Hold :data:`FORWARD_AD_LOCK` around a forward-mode computation, with two notices torch prints
    from inside its own forward-mode code silenced for its duration only: the first
    ``torch.func.jvp`` of a process warns that ``torch.jit.script`` is deprecated, and every
    ``torch.func.linearize`` build warns about an internal detail of its constant folding; nothing a
    user can act on. ``warnings.catch_warnings`` restores the process's filters on exit; it is not
    thread-safe, but it runs under the lock, so this module's threads never interleave their copies.
    """
    with FORWARD_AD_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node", category=UserWarning)
        yield


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
                 jacobian_products: JacobianProducts = "reverse"):
        self.jacobian_products = _check_jacobian_products(jacobian_products)
        self.oracle = oracle
        self.shape = tuple(int(s) for s in image.shape[1:])  # (C, H, W)
        self.dim = math.prod(self.shape)
        self.dtype = oracle.dtype
        self.device = oracle.device
        self.layout = oracle.layout
        self.x_star = image.detach()[0].to(oracle.device, oracle.dtype)  # (C, H, W)
        self.label = int(label)
        self.gradient_fn = oracle.gradient_fn(self.label)
        g_star, self._pullback = vjp(self.gradient_fn, self.x_star)  # the linearisation, built once
        self.g_star = g_star.detach()  # (n,)
        self.num_params = int(self.g_star.numel())
        self.g_norm = float(self.g_star.norm())
        self._loss_gradients: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._activations: int | None = None
        self._linear_jvp: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._transpose: Callable[[torch.Tensor], tuple[torch.Tensor]] | None = None
        self.gram_transpose: str | None = None  # how the last gram() computed Jᵀ U: "forward" or "reverse"

    # ---- building blocks -----------------------------------------------------------------------

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v (n,) for an input direction v (C, H, W), by forward-mode autodiff (vmap-able)."""
        with forward_mode():
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
        with forward_mode():
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

    def closed_form_hvp(self, form: ClosedForm, v: torch.Tensor) -> torch.Tensor:
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
        with forward_mode():
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

    def _input_gradient_jvp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀu (C, H, W) for one u (n,) by forward mode: the derivative along u of θ ↦ ∇ₓ ℓ(θ, x*),
        ℓ the cross-entropy whose weight gradient is g (see :meth:`GradientOracle.gradient_fn`).
        vmap-able; the primal is computed once per batch. Use through :meth:`_transpose_columns`,
        which checks that ℓ is the loss g differentiates."""
        target = torch.as_tensor(self.label, device=self.device).reshape(1).long()
        x_star = self.x_star

        def input_gradient(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return grad(lambda x: F.cross_entropy(self.oracle.logits(x.unsqueeze(0), params), target))(x_star)

        with forward_mode():
            return jvp(input_gradient, (self.oracle.params,), (self.layout.unflatten(u),))[1]

    def _transpose_columns(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """U (c, n) ↦ Jᵀ U as (c, C, H, W) for the chunks of :meth:`gram`: vmapped
        :meth:`_input_gradient_jvp` when its product for a fixed random u (its own generator) agrees
        with the vjp through g (relative gap at most 1e-10 in float64, 1e-3 otherwise), else vmapped
        :meth:`vjp`."""
        probe = torch.randn(self.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = probe.to(self.device, self.dtype)
        reference = self.vjp(probe)
        try:
            got = self._input_gradient_jvp(probe)
        except (RuntimeError, NotImplementedError):  # an op without a forward-mode formula, say
            got = None
        tolerance = 1e-10 if self.dtype == torch.float64 else 1e-3
        if got is not None and got.shape == reference.shape and _relative_gap(got, reference) <= tolerance:
            self.gram_transpose = "forward"
            return vmap(self._input_gradient_jvp)
        self.gram_transpose = "reverse"
        return vmap(self.vjp)

    def gram(self, config: SolverConfig = DEFAULT_SOLVER) -> np.ndarray:
        """JᵀJ (d, d) in float64 (the ``l2`` Hessian), built a chunk of columns at a time.

        While the chunks run only the upper triangle of each computed row is stored (see
        :func:`_store_upper`), so the chunks' working memory and the d × d matrix's lower half
        are never resident together; the heap keeps one chunk's pages for the next
        (:func:`~lavp_core.hessian.memory.retained_heap`).
        """
        h = _dense_matrix(self.dim)
        chunk = self.chunk_size(config)
        jacobian_columns = vmap(self.jvp)  # forward mode: the primal once per chunk
        transpose = self._transpose_columns()
        with retained_heap():
            for start in range(0, self.dim, chunk):
                stop = min(start + chunk, self.dim)
                u = jacobian_columns(self._basis(start, stop))  # (c, n) = (J E)ᵀ
                rows = transpose(u).reshape(stop - start, self.dim)  # (c, d) = (Jᵀ J E)ᵀ
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
        with retained_heap():
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
