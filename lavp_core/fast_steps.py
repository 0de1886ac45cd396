"""Fused attack steps: one traced graph per (architecture, matching loss, restarts, settings).

The eager engine evaluates every step through ``torch.func`` (``grad`` of ``grad``, ``vmap`` over
restarts) and ``torch.optim.Adam``: each of the few hundred small operators of a step pays
``torch.func``'s dispatch and the optimiser's Python. Here the whole step — the candidates' weight
gradients, the matching loss, the TV prior, its gradient with respect to the candidates, the
divergence guard, the sign (Inverting Gradients), Adam's update and the box — is traced once with
``make_fx`` into a flat graph of ATen operators and replayed each step:

* ``traced``: the graph runs operator by operator (no autograd, no ``torch.func`` layers); tracing
  costs about a second, so :func:`choose_engine` picks it for runs long enough to repay that.
* ``compiled``: the same graph compiled by ``torch.compile`` (Inductor, fused C++ loops). Compiling
  costs tens of seconds on a first use; PyTorch keeps the result in its on-disk caches
  (``TORCHINDUCTOR_CACHE_DIR``, by default a folder of this user under the system's temporary
  directory), so later processes load it in seconds. ``benchmarks/attack_speed.py`` prints the
  break-even in steps.

The model's weights, its buffers, the target gradient g*, the label and the box are inputs of the
graph, not constants baked into it: one graph serves every image and every model state of an
architecture, within a process (:data:`_PROGRAMS`) and, compiled, across processes. Numbers are the
eager engine's: the same operators in the same order, Adam's update written as ``torch.optim.Adam``
computes it (tests compare both to 1e-5 after 20 steps).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from .errors import ConfigError
from .gradients import GradientOracle, flatten

ENGINES = ("auto", "eager", "traced", "compiled")
"""How the engine evaluates a step: ``auto`` (traced for long runs, eager otherwise), ``eager``
(``torch.func`` + ``torch.optim``, the reference), ``traced`` or ``compiled`` (see the module)."""

AUTO_TRACE_STEPS = 200
"""``auto`` traces a run of at least this many steps (or any run whose graph is already traced)."""

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the eager engine uses
ADAM_EPS = 1e-8


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of an image (..., C, H, W): mean |dx| + mean |dy| (IG's convention)."""
    dx = (x[..., :, :, 1:] - x[..., :, :, :-1]).abs().mean()
    dy = (x[..., :, 1:, :] - x[..., :, :-1, :]).abs().mean()
    return dx + dy


def objective_function(oracle: GradientOracle, loss, tv_weight: float) -> Callable:
    """``(x (C,H,W), g_star, label, params, buffers) -> (total, matching)``: the attack's objective
    with every model- and image-dependent tensor an argument (so one trace serves them all)."""
    module, layout = oracle.module, oracle.layout

    def cross_entropy(params, buffers, x, label):
        logits = functional_call(module, (params, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, label)

    param_grad = grad(cross_entropy)

    def objective(x, g_star, label, params, buffers):
        g = flatten(param_grad(params, buffers, x, label))
        matching = loss(g, g_star, layout)
        total = matching + tv_weight * total_variation(x) if tv_weight > 0 else matching
        return total, matching

    return objective


def _batched_value_and_grad(objective: Callable, restarts: int) -> Callable:
    """``(xs (R,C,H,W), ...) -> (grads (R,C,H,W), matching (R,))``; no ``vmap`` when R = 1."""
    single = grad_and_value(objective, has_aux=True)
    if restarts == 1:
        def batched(xs, g_star, label, params, buffers):
            g, (_, matching) = single(xs[0], g_star, label, params, buffers)
            return g.unsqueeze(0), matching.unsqueeze(0)
        return batched
    vmapped = vmap(single, in_dims=(0, None, None, None, None))

    def batched(xs, g_star, label, params, buffers):
        g, (_, matching) = vmapped(xs, g_star, label, params, buffers)
        return g, matching
    return batched


def adam_step_function(objective: Callable, restarts: int, signed: bool, boxed: bool) -> Callable:
    """One step of the Adam engine as a pure function of its state (see :class:`AdamProgram`)."""
    batched = _batched_value_and_grad(objective, restarts)
    beta1, beta2 = ADAM_BETAS

    def step(x, m, v, diverged, step_size, bias2_sqrt, g_star, label, params, buffers, lo, hi):
        grads, matching = batched(x, g_star, label, params, buffers)
        bad = ~torch.isfinite(matching) | ~torch.isfinite(grads).flatten(1).all(dim=1)
        diverged = diverged | bad
        grads = torch.where(diverged.view(-1, 1, 1, 1), torch.zeros_like(grads), grads)
        if signed:
            grads = grads.sign()
        # torch.optim.Adam (single-tensor path), operator for operator
        m = m.lerp(grads, 1 - beta1)
        v = v.mul(beta2).addcmul(grads, grads, value=1 - beta2)
        denom = (v.sqrt() / bias2_sqrt).add(ADAM_EPS)
        x = x - step_size * (m / denom)
        if boxed:
            x = torch.maximum(torch.minimum(x, hi), lo)
        losses = torch.where(diverged, torch.full_like(matching, math.nan), matching)
        return x, m, v, diverged, losses

    return step


def value_and_grad_function(objective: Callable) -> Callable:
    """``(x (C,H,W), g_star, label, params, buffers) -> (grad, total, matching)`` (the L-BFGS closure's)."""
    single = grad_and_value(objective, has_aux=True)

    def evaluate(x, g_star, label, params, buffers):
        g, (total, matching) = single(x, g_star, label, params, buffers)
        return g, total, matching

    return evaluate


@dataclass(frozen=True)
class ProgramKey:
    """What a traced graph depends on: the module's structure and tensors' shapes, never their values."""

    kind: str  # "adam" | "value_and_grad"
    module: str  # repr of the module: its layers and their settings
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # parameters and buffers: name, shape, dtype
    loss: str
    tv_weight: float
    image_shape: tuple[int, ...]
    restarts: int
    signed: bool
    boxed: bool
    compiled: bool
    device: str


_PROGRAMS: OrderedDict[ProgramKey, Callable] = OrderedDict()
_PROGRAMS_LOCK = threading.Lock()
_MAX_PROGRAMS = 32


def program_key(kind: str, oracle: GradientOracle, loss_name: str, tv_weight: float, image_shape, restarts: int,
                signed: bool, boxed: bool, compiled: bool) -> ProgramKey:
    tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in (*oracle.params.items(), *oracle.buffers.items()))
    return ProgramKey(kind, repr(oracle.module), tensors, loss_name, float(tv_weight), tuple(image_shape),
                      int(restarts), bool(signed), bool(boxed), bool(compiled), str(oracle.device))


def is_cached(key: ProgramKey) -> bool:
    with _PROGRAMS_LOCK:
        return key in _PROGRAMS


def _trace(function: Callable, example: tuple) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    # "fake" tracing runs no real arithmetic and refuses data-dependent Python control flow, which a
    # trace would otherwise freeze silently.
    graph = make_fx(function, tracing_mode="fake")(*example)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def get_program(key: ProgramKey, function: Callable, example: tuple) -> Callable:
    """The traced (or compiled) graph for ``key``, tracing ``function`` on ``example`` the first time.

    A compiled graph is compiled here, by one call on ``example``; where compiling fails (no C++
    compiler, an operator Inductor cannot lower) the traced graph is used instead, with a warning.
    """
    with _PROGRAMS_LOCK:
        program = _PROGRAMS.get(key)
        if program is not None:
            _PROGRAMS.move_to_end(key)
            return program
    program = _trace(function, example)
    if key.compiled:
        compiled = torch.compile(program, dynamic=False, fullgraph=True)
        try:
            compiled(*example)
            program = compiled
        except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the traced graph, which is exact
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {first}); the attack runs its traced "
                          f"steps instead (the same numbers, slower)", RuntimeWarning, stacklevel=3)
    with _PROGRAMS_LOCK:
        _PROGRAMS[key] = program
        while len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    return program


def clear_programs() -> None:
    """Forget every traced graph of this process (tests; memory)."""
    with _PROGRAMS_LOCK:
        _PROGRAMS.clear()


class AdamProgram:
    """The fused Adam step of one attack: ``step(x, m, v, diverged, step_size, bias2_sqrt)`` returns the
    next ``(x, m, v, diverged, losses)``; everything else the graph needs is bound here."""

    def __init__(self, oracle: GradientOracle, loss, loss_name: str, tv_weight: float, g_star: torch.Tensor,
                 label: int, image_shape, restarts: int, signed: bool, boxed: bool, lo: torch.Tensor,
                 hi: torch.Tensor, compiled: bool):
        self.key = program_key("adam", oracle, loss_name, tv_weight, image_shape, restarts, signed, boxed, compiled)
        dtype, device = oracle.dtype, oracle.device
        self.bound = (g_star, torch.tensor([int(label)], device=device), oracle.params, oracle.buffers,
                      lo.to(device, dtype), hi.to(device, dtype))
        self._function = adam_step_function(objective_function(oracle, loss, tv_weight), restarts, signed, boxed)
        def state():  # distinct tensors: a trace takes arguments that are one tensor for aliases
            return torch.zeros((restarts, *image_shape), device=device, dtype=dtype)

        self._example = (state(), state(), state(), torch.zeros(restarts, dtype=torch.bool, device=device),
                         torch.ones((), device=device, dtype=dtype), torch.ones((), device=device, dtype=dtype),
                         *self.bound)
        self._program: Callable | None = None

    def prepare(self) -> AdamProgram:
        """Trace (or compile) now rather than on the first step."""
        if self._program is None:
            self._program = get_program(self.key, self._function, self._example)
        return self

    def __call__(self, x, m, v, diverged, step_size, bias2_sqrt):
        return self.prepare()._program(x, m, v, diverged, step_size, bias2_sqrt, *self.bound)


class ValueAndGradProgram:
    """The traced objective and its gradient for one candidate (C, H, W): ``f(x) -> (grad, total, matching)``."""

    def __init__(self, oracle: GradientOracle, loss, loss_name: str, tv_weight: float, g_star: torch.Tensor,
                 label: int, image_shape, compiled: bool):
        self.key = program_key("value_and_grad", oracle, loss_name, tv_weight, image_shape, 1, False, False,
                               compiled)
        self.bound = (g_star, torch.tensor([int(label)], device=oracle.device), oracle.params, oracle.buffers)
        self._function = value_and_grad_function(objective_function(oracle, loss, tv_weight))
        self._example = (torch.zeros(tuple(image_shape), device=oracle.device, dtype=oracle.dtype), *self.bound)
        self._program: Callable | None = None

    def prepare(self) -> ValueAndGradProgram:
        if self._program is None:
            self._program = get_program(self.key, self._function, self._example)
        return self

    def __call__(self, x):
        return self.prepare()._program(x, *self.bound)


def choose_engine(engine: str, steps: int, key: ProgramKey | None = None) -> str:
    """Resolve ``auto``: ``traced`` for runs of :data:`AUTO_TRACE_STEPS` steps or more, or whose graph
    this process already traced; ``eager`` otherwise (a trace would cost more than it saves)."""
    check_engine(engine)
    if engine != "auto":
        return engine
    if steps >= AUTO_TRACE_STEPS or (key is not None and is_cached(key)):
        return "traced"
    return "eager"


STUDY_COMPILE_STEPS = 1000
"""A study's ``auto`` compiles Adam attacks of at least this many steps (see :func:`study_engine`)."""


def study_engine(engine: str, steps: int, optimizer: str) -> str:
    """The engine of one study job: ``auto`` compiles Adam attacks of :data:`STUDY_COMPILE_STEPS` steps
    or more — a worker process compiles each (architecture, matching loss, restarts) once and reuses
    it for all its jobs, and later processes load it from PyTorch's on-disk cache — and leaves the
    rest to :func:`choose_engine`. Any other choice is kept."""
    check_engine(engine)
    if engine == "auto" and optimizer == "adam" and steps >= STUDY_COMPILE_STEPS:
        return "compiled"
    return engine
