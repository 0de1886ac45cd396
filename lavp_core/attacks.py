"""Gradient-matching attacks: one optimisation engine, presets for DLG, iDLG, Inverting Gradients
and the LAVP paper's protocol.

The engine optimises candidate images in the model's *normalised* input space so that their weight
gradient matches the client's, under a registered matching loss plus an optional total-variation
prior. With Adam, the R restarts run as one batched optimisation: all candidates live in one
(R, C, H, W) tensor and their gradients come from ``torch.func.vmap`` (Adam is element-wise, so
this equals R independent runs). With L-BFGS (DLG) the restarts run one after another.

Long work is an iterator: :class:`AttackRun` yields :class:`AttackSnapshot` objects every
``snapshot_every`` steps and can be cancelled between steps from another thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from torch.func import grad_and_value, vmap

from .data import DatasetInfo
from .errors import ConfigError
from .fast_steps import (
    ADAM_BETAS,
    AdamProgram,
    ValueAndGradProgram,
    check_engine,
    choose_engine,
    program_key,
    total_variation,
)
from .gradients import ClientUpdate, GradientOracle, client_update, infer_label
from .losses import get_loss
from .presets import (
    AttackKind,
    AttackPreset,
    AttackRequest,
    StreamedRun,
    get_preset,
    list_presets,
    register_kind,
    register_preset,
)

OPTIMIZERS = ("adam", "lbfgs")
SCHEDULE_GAMMA = 0.1
SCHEDULES = ("none", "step")
INITS = ("randn", "uniform")
LABEL_MODES = ("known", "inferred")


@dataclass(frozen=True)
class AttackConfig:
    """Settings of one gradient-matching attack.

    Args:
        loss: registered matching loss (``l2``, ``cos``, ``cos-layer``).
        optimizer: ``adam`` (restarts batched) or ``lbfgs`` (restarts sequential).
        lr: learning rate.
        steps: optimisation steps per restart (for L-BFGS: outer steps of ``lbfgs_max_iter`` each).
        schedule: ``none`` or ``step`` (lr x0.1 at 3/8, 5/8 and 7/8 of the steps).
        tv_weight: weight of the total-variation prior (0 disables it).
        signed: use the sign of the gradient (Inverting Gradients); Adam only.
        boxed: clamp candidates to the normalised image of [0, 1] after each step.
        init: ``randn`` (standard normal) or ``uniform`` (U(0, 1) images, normalised).
        restarts: number of random starts; the best final matching loss wins.
        label: ``known`` (the paper's assumption) or ``inferred`` (iDLG).
        lbfgs_max_iter: inner iterations per L-BFGS step (PyTorch's default, as DLG used).
    """

    loss: str = "cos"
    optimizer: str = "adam"
    lr: float = 0.1
    steps: int = 300
    schedule: str = "none"
    tv_weight: float = 0.0
    signed: bool = False
    boxed: bool = False
    init: str = "randn"
    restarts: int = 1
    label: str = "known"
    lbfgs_max_iter: int = 20

    def validated(self) -> AttackConfig:
        """Return ``self`` after checking every field; raise :class:`ConfigError` otherwise."""
        get_loss(self.loss)
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES),
                                     ("init", self.init, INITS), ("label", self.label, LABEL_MODES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts <= 0:
            raise ConfigError(f"restarts must be a positive integer, got {self.restarts!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be positive, got {self.lr!r}")
        if not (self.tv_weight >= 0 and math.isfinite(self.tv_weight)):
            raise ConfigError(f"TV weight must be zero or positive, got {self.tv_weight!r}")
        if self.signed and self.optimizer != "adam":
            raise ConfigError("signed gradients only make sense with Adam: set optimizer='adam' or signed=False")
        if self.lbfgs_max_iter <= 0:
            raise ConfigError(f"lbfgs_max_iter must be positive, got {self.lbfgs_max_iter}")
        return self


def preset_config(name: str, **overrides) -> AttackConfig:
    """An optimisation preset's configuration with ``overrides`` (``None`` values are ignored), validated."""
    preset = get_preset(name)
    if not isinstance(preset.config, AttackConfig):
        engine = ", ".join(p.name for p in list_presets() if isinstance(p.config, AttackConfig))
        raise ConfigError(f"preset {name!r} is not one of this engine's ({preset.kind} attack): choose one of "
                          f"{engine}")
    known = {f.name for f in fields(AttackConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown attack settings {sorted(unknown)}: use {sorted(known)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(preset.config, **changes).validated()


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class AttackSnapshot:
    """Progress of a running attack.

    ``image01`` is the current best candidate, de-normalised to [0, 1], (C, H, W) on the CPU.
    ``losses`` holds every candidate's current matching loss (NaN for diverged ones).
    """

    step: int
    total_steps: int
    matching_loss: float
    losses: tuple[float, ...]
    image01: torch.Tensor
    restart: int | None = None  # index of the restart running (sequential L-BFGS), else None


@dataclass(frozen=True)
class AttackResult:
    """Outcome of an attack.

    ``reconstruction`` is the best finite candidate (1, C, H, W) in normalised space, or ``None``
    when every restart diverged (``all_diverged``).
    """

    reconstruction: torch.Tensor | None
    matching_loss: float
    restart_losses: tuple[float, ...]
    diverged: tuple[bool, ...]
    best_restart: int | None
    label_used: int
    label_true: int
    steps: int
    seconds: float
    cancelled: bool
    history: tuple[tuple[int, float], ...] = field(repr=False)

    @property
    def all_diverged(self) -> bool:
        return all(self.diverged)


# --------------------------------------------------------------------------------------------
# The engine


def initial_candidates(shape: tuple[int, ...], init: str, info: DatasetInfo, generator: torch.Generator,
                       device: torch.device) -> torch.Tensor:
    """Draw (R, C, H, W) starting points in normalised space from ``generator`` (on the CPU, then moved)."""
    if init == "randn":
        x = torch.randn(shape, generator=generator, device=generator.device)
    else:
        x = info.normalize(torch.rand(shape, generator=generator, device=generator.device))
    return x.to(device)


class VictimRun:
    """What every live attack on one client gradient shares (this engine's :class:`AttackRun` and the
    generative ``GifdRun``): the model's frozen :class:`GradientOracle`, the target gradient g*, the
    label (known, or inferred iDLG-style), cancellation between steps from another thread, and the
    history of the best matching loss per step."""

    def _bind(self, model: nn.Module | GradientOracle, update: ClientUpdate, label_mode: str, info: DatasetInfo,
              generator: torch.Generator, device: torch.device | str, snapshot_every: int) -> None:
        self.device = torch.device(device)
        self.oracle = model if isinstance(model, GradientOracle) else GradientOracle(model, device=self.device)
        self.update = update
        self.info = info
        self.generator = generator
        self.snapshot_every = max(1, int(snapshot_every))
        self.g_star = update.gradient.to(self.device, self.oracle.dtype)
        if label_mode == "inferred":
            self.label = infer_label(self.oracle, self.g_star, update.image_shape)
        else:
            self.label = int(update.label)
        self._cancel = threading.Event()
        self._history: list[tuple[int, float]] = []

    def cancel(self) -> None:
        """Ask the run to stop after the current step (thread-safe)."""
        self._cancel.set()

    def _record(self, step: int, losses: torch.Tensor) -> None:
        finite = losses[torch.isfinite(losses)]
        if finite.numel():
            self._history.append((step, float(finite.min())))


class AttackRun(VictimRun):
    """One attack, as an iterator of snapshots; the outcome lands in ``.result`` when it ends.

    Args:
        model: the global model (never modified; a private eval-mode copy is used).
        update: the client's shared gradient and label.
        config: the attack settings.
        info: the dataset (normalisation and box bounds).
        generator: source of all randomness (initial candidates).
        device: where to run (defaults to CPU).
        snapshot_every: yield a snapshot every this many steps (and at the first and last step).
        initial: optional starting candidates (R, C, H, W) in normalised space, replacing the random
            draw (e.g. points near the ground truth for a local, worst-case attack).
        engine: how a step is evaluated (:data:`~lavp_core.fast_steps.ENGINES`): ``auto`` (default:
            a traced graph for runs long enough to repay the trace, see
            :func:`~lavp_core.fast_steps.choose_engine`), ``eager`` (``torch.func`` and
            ``torch.optim``: the reference), ``traced`` or ``compiled`` (``torch.compile``; pays on
            long runs and studies). Every engine gives the same candidates to float round-off.
    """

    def __init__(self, model: nn.Module | GradientOracle, update: ClientUpdate, config: AttackConfig,
                 info: DatasetInfo, *, generator: torch.Generator, device: torch.device | str = "cpu",
                 snapshot_every: int = 10, initial: torch.Tensor | None = None, engine: str = "auto"):
        self.config = config.validated()
        self.engine = check_engine(engine)
        self.engine_used: str | None = None  # what ``auto`` resolved to, once the run has started
        self._bind(model, update, self.config.label, info, generator, device, snapshot_every)
        self.loss = get_loss(self.config.loss)
        expected = (self.config.restarts, *update.image_shape)
        if initial is not None and tuple(initial.shape) != expected:
            raise ConfigError(f"initial candidates must have shape {expected}, got {tuple(initial.shape)}")
        self.initial = initial
        self.result: AttackResult | None = None

    @property
    def total_steps(self) -> int:
        c = self.config
        return c.steps * (c.restarts if c.optimizer == "lbfgs" else 1)

    def _objective(self):
        g_fn = self.oracle.gradient_fn(self.label)
        loss, g_star, layout, tv = self.loss, self.g_star, self.oracle.layout, self.config.tv_weight

        def objective(x: torch.Tensor):  # x: (C, H, W) -> (total, matching)
            matching = loss(g_fn(x), g_star, layout)
            total = matching + tv * total_variation(x) if tv > 0 else matching
            return total, matching

        return objective

    def _milestones(self) -> list[int]:
        """Steps after which the ``step`` schedule multiplies the learning rate by 0.1."""
        if self.config.schedule == "none":
            return []
        s = self.config.steps
        return sorted({max(1, int(s * f)) for f in (3 / 8, 5 / 8, 7 / 8)})

    def _scheduler(self, optimizer):
        milestones = self._milestones()
        if not milestones:
            return None
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=SCHEDULE_GAMMA)

    def _resolve_engine(self, kind: str) -> str:
        c = self.config
        restarts = c.restarts if kind == "adam" else 1
        key = program_key(kind, self.oracle, c.loss, c.tv_weight, self.update.image_shape, restarts, c.signed,
                          c.boxed, False)
        steps = c.steps if kind == "adam" else c.steps * c.lbfgs_max_iter
        self.engine_used = choose_engine(self.engine, steps, key)
        return self.engine_used

    def _snapshot(self, step: int, x: torch.Tensor, losses: torch.Tensor, restart: int | None) -> AttackSnapshot:
        finite = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf))
        best = int(torch.argmin(finite))
        image01 = self.info.denormalize(x[best].detach().float()).cpu()
        value = float(finite[best])
        return AttackSnapshot(step, self.total_steps, value, tuple(float(v) for v in losses), image01, restart)

    def __iter__(self) -> Iterator[AttackSnapshot]:
        start = time.perf_counter()
        shape = (self.config.restarts, *self.update.image_shape)
        if self.initial is not None:
            x0 = self.initial.detach().to(self.device, self.oracle.dtype)
        else:
            x0 = initial_candidates(shape, self.config.init, self.info, self.generator, self.device)
            x0 = x0.to(self.oracle.dtype)
        lo, hi = self.info.bounds(self.device, self.oracle.dtype)
        if self.config.optimizer == "adam":
            final, steps_done = yield from self._run_adam(x0, lo, hi)
        else:
            final, steps_done = yield from self._run_lbfgs(x0, lo, hi)
        self.result = self._finish(final, steps_done, time.perf_counter() - start)

    def _run_adam(self, x0, lo, hi):
        engine = self._resolve_engine("adam")
        if engine != "eager":
            return (yield from self._run_adam_fused(x0, lo, hi, compiled=engine == "compiled"))
        c = self.config
        single = grad_and_value(self._objective(), has_aux=True)
        if c.restarts == 1:  # no batching needed: skip vmap's overhead
            def objective(xs):
                g, (total, matching) = single(xs[0])
                return g.unsqueeze(0), (total.unsqueeze(0), matching.unsqueeze(0))
        else:
            objective = vmap(single)
        x = x0.clone().requires_grad_(True)  # (R, C, H, W): all restarts in one tensor
        optimizer = torch.optim.Adam([x], lr=c.lr)
        scheduler = self._scheduler(optimizer)
        diverged = torch.zeros(c.restarts, dtype=torch.bool, device=self.device)
        steps_done = 0
        for step in range(c.steps):
            if self._cancel.is_set():
                break
            grads, (_, matching) = objective(x.detach())
            bad = ~torch.isfinite(matching) | ~torch.isfinite(grads).flatten(1).all(dim=1)
            diverged |= bad
            grads = torch.where(diverged.view(-1, 1, 1, 1), torch.zeros_like(grads), grads)
            x.grad = grads.sign() if c.signed else grads
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                if c.boxed:
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            losses = torch.where(diverged, torch.full_like(matching, math.nan), matching.detach())
            steps_done = step + 1
            self._record(step, losses)
            if step == 0 or steps_done % self.snapshot_every == 0 or steps_done == c.steps:
                yield self._snapshot(steps_done, x, losses, None)
        return (x.detach(), diverged), steps_done

    def _run_adam_fused(self, x0, lo, hi, compiled: bool):
        """The Adam loop of :meth:`_run_adam` with each step one traced graph (same arithmetic)."""
        c = self.config
        program = AdamProgram(self.oracle, self.loss, c.loss, c.tv_weight, self.g_star, self.label,
                              self.update.image_shape, c.restarts, c.signed, c.boxed, lo, hi, compiled).prepare()
        x = x0.detach().clone()
        m, v = torch.zeros_like(x), torch.zeros_like(x)
        diverged = torch.zeros(c.restarts, dtype=torch.bool, device=self.device)
        beta1, beta2 = ADAM_BETAS
        milestones, lr, steps_done = set(self._milestones()), c.lr, 0
        scalar = {"device": self.device, "dtype": x.dtype}
        for step in range(c.steps):
            if self._cancel.is_set():
                break
            t = step + 1
            # torch.optim.Adam's bias corrections, computed in Python floats as it does
            step_size = torch.tensor(lr / (1 - beta1 ** t), **scalar)
            bias2_sqrt = torch.tensor(math.sqrt(1 - beta2 ** t), **scalar)
            x, m, v, diverged, losses = program(x, m, v, diverged, step_size, bias2_sqrt)
            if t in milestones:  # MultiStepLR after this step
                lr = lr * SCHEDULE_GAMMA
            steps_done = t
            self._record(step, losses)
            if step == 0 or steps_done % self.snapshot_every == 0 or steps_done == c.steps:
                yield self._snapshot(steps_done, x, losses, None)
        return (x, diverged), steps_done

    def _run_lbfgs(self, x0, lo, hi):
        c = self.config
        if self._resolve_engine("value_and_grad") == "eager":
            single = grad_and_value(self._objective(), has_aux=True)

            def value_and_grad(x):
                g, (total, matching) = single(x)
                return g, total, matching
        else:
            value_and_grad = ValueAndGradProgram(self.oracle, self.loss, c.loss, c.tv_weight, self.g_star, self.label,
                                                 self.update.image_shape, self.engine_used == "compiled").prepare()
        finals, diverged, steps_done = [], [], 0
        for r in range(c.restarts):
            x = x0[r].clone().requires_grad_(True)  # (C, H, W)
            optimizer = torch.optim.LBFGS([x], lr=c.lr, max_iter=c.lbfgs_max_iter, history_size=100)
            scheduler = self._scheduler(optimizer)
            last = {"matching": math.nan}

            def closure(x=x, last=last):
                g, total, matching = value_and_grad(x.detach())
                x.grad = g
                last["matching"] = float(matching)
                return total.detach()

            failed = False
            for step in range(c.steps):
                if self._cancel.is_set():
                    break
                optimizer.step(closure)
                if scheduler is not None:
                    scheduler.step()
                if c.boxed:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                value = last["matching"]
                failed = not (math.isfinite(value) and torch.isfinite(x).all())
                steps_done += 1
                self._record(steps_done - 1, torch.tensor([value]))
                if step == 0 or (step + 1) % self.snapshot_every == 0 or step + 1 == c.steps or failed:
                    yield self._snapshot(steps_done, x.detach().unsqueeze(0),
                                         torch.tensor([math.nan if failed else value]), r)
                if failed:
                    break
            finals.append(x.detach())
            diverged.append(failed)
            if self._cancel.is_set():
                # restarts never started count as diverged so they are not chosen
                finals.extend(x0[k] for k in range(r + 1, c.restarts))
                diverged.extend([True] * (c.restarts - r - 1))
                break
        x = torch.stack(finals)
        return (x, torch.tensor(diverged, device=self.device)), steps_done

    def _finish(self, final, steps_done: int, seconds: float) -> AttackResult:
        x, diverged = final  # (R, C, H, W), (R,)
        with torch.no_grad():
            _, matching = vmap(self._objective())(x)
        diverged = diverged | ~torch.isfinite(matching) | ~torch.isfinite(x).flatten(1).all(dim=1)
        losses = torch.where(diverged, torch.full_like(matching, math.nan), matching)
        if bool(diverged.all()):
            best, recon, value = None, None, math.nan
        else:
            best = int(torch.argmin(torch.where(diverged, torch.full_like(matching, math.inf), matching)))
            recon, value = x[best:best + 1].detach(), float(matching[best])
        return AttackResult(recon, value, tuple(float(v) for v in losses), tuple(bool(d) for d in diverged),
                            best, self.label, int(self.update.label), steps_done, seconds,
                            self._cancel.is_set(), tuple(self._history))


def run_attack(model: nn.Module | GradientOracle, update: ClientUpdate, config: AttackConfig,
               info: DatasetInfo, *, generator: torch.Generator, device: torch.device | str = "cpu",
               engine: str = "auto") -> AttackResult:
    """Run an attack to the end and return its :class:`AttackResult` (``engine``: see :class:`AttackRun`)."""
    run = AttackRun(model, update, config, info, generator=generator, device=device,
                    snapshot_every=max(1, config.steps), engine=engine)
    for _ in run:
        pass
    return run.result


# --------------------------------------------------------------------------------------------
# The optimisation kind and its presets


class OptimisationAttack(AttackKind):
    """This module's engine: gradient matching by Adam or L-BFGS from random starts."""

    name = "optimisation"
    summary = "gradient matching by optimisation from random starts (this module's engine)"
    studied = True
    settings = ("loss", "steps", "restarts", "lr", "tv_weight", "label", "schedule", "engine")

    def defaults(self, preset: AttackPreset) -> AttackRequest:
        c = preset.config
        return AttackRequest(preset.name, loss=c.loss, steps=c.steps, restarts=c.restarts, lr=c.lr,
                             tv_weight=c.tv_weight, label=c.label, schedule=c.schedule, engine="auto")

    def start(self, preset, model, image, label, info, request, *, generator, device, snapshot_every):
        oracle = GradientOracle(model, device=device)
        update = client_update(oracle, image, label)
        config = preset_config(preset.name, loss=request.loss, steps=request.steps, restarts=request.restarts,
                               lr=request.lr, tv_weight=request.tv_weight, label=request.label,
                               schedule=request.schedule)
        return StreamedRun(preset, AttackRun(oracle, update, config, info, generator=generator, device=device,
                                             snapshot_every=snapshot_every, engine=request.engine or "auto"))


register_kind(OptimisationAttack())
register_preset(AttackPreset(
    "dlg", "Deep Leakage from Gradients: L2 matching, L-BFGS (lr 1), 300 steps, no prior", "optimisation",
    AttackConfig(loss="l2", optimizer="lbfgs", lr=1.0, steps=300, init="randn")))
register_preset(AttackPreset(
    "idlg", "iDLG: DLG with the label inferred from the last layer's gradient", "optimisation",
    AttackConfig(loss="l2", optimizer="lbfgs", lr=1.0, steps=300, init="randn", label="inferred")))
register_preset(AttackPreset(
    "ig", "Inverting Gradients: cosine matching, signed Adam (lr 0.1), boxed, TV 1e-4, step decay, 4800 steps",
    "optimisation",
    AttackConfig(loss="cos", optimizer="adam", lr=0.1, steps=4800, schedule="step", tv_weight=1e-4,
                 signed=True, boxed=True, init="randn")))
register_preset(AttackPreset(
    "lavp-paper", "The LAVP paper's protocol as its text states it: the chosen matching loss + TV 1e-4, Adam "
    "(lr 0.1, constant), boxed, best of 3 seeds; 1000 steps (the paper does not state its budget)",
    "optimisation",
    AttackConfig(loss="cos", optimizer="adam", lr=0.1, steps=1000, schedule="none", tv_weight=1e-4,
                 boxed=True, init="randn", restarts=3)))
