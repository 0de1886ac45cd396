"""One front door for every attack preset: optimisation (DLG, iDLG, IG, the paper's protocol),
analytical (R-CONV) and generative (GIFD).

The CLI, the study runner and the app start any preset the same way and get the same
:class:`AttackOutcome`; long ones stream :class:`~lavp_core.attacks.AttackSnapshot` objects and can
be cancelled between steps.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .attacks import AttackRun, AttackSnapshot, get_preset, list_presets, preset_config
from .data import DatasetInfo
from .errors import ConfigError
from .gradients import GradientOracle, client_update

DIVERGED_WARNING = "every restart diverged: try more restarts, a lower learning rate or another seed"


def load_all_presets() -> list:
    """Import the modules that register non-optimisation presets; return every preset."""
    for module in ("analytic", "generative"):
        importlib.import_module(f"lavp_core.{module}")
    return list_presets()


@dataclass(frozen=True)
class AttackRequest:
    """A preset and the settings that override its defaults (``None`` keeps the preset's value).

    ``steps`` for GIFD is the total over all its stages; R-CONV ignores every override.
    """

    preset: str = "dlg"
    loss: str | None = None
    steps: int | None = None
    restarts: int | None = None
    lr: float | None = None
    tv_weight: float | None = None
    label: str | None = None

    def validated(self) -> AttackRequest:
        load_all_presets()
        get_preset(self.preset)
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        return self


@dataclass(frozen=True)
class AttackOutcome:
    """What any preset returns.

    ``reconstruction`` is (1, C, H, W) in normalised space (``None`` when every restart diverged);
    ``details`` holds preset-specific extras: ``layers`` (R-CONV's per-layer constraint reports),
    ``stages`` (GIFD's per-stage results), ``diverged`` flags, ``warning``.
    """

    preset: str
    kind: str
    reconstruction: torch.Tensor | None
    matching_loss: float
    label_used: int
    label_true: int
    steps: int
    seconds: float
    cancelled: bool
    history: tuple[tuple[int, float], ...] = ()
    details: dict = field(default_factory=dict)


class PresetRun:
    """Run any preset as an iterator of snapshots; ``.outcome`` is set when it ends.

    Args:
        model: the shared classifier (never modified).
        image: the client's normalised image (1, C, H, W); only its gradient is given to the attack.
        label: the client's label.
        info: the dataset (normalisation, bounds).
        request: the preset and its overrides.
        generator: source of all randomness.
        device: where to compute.
        snapshot_every: snapshot period in steps.
    """

    def __init__(self, model: nn.Module, image: torch.Tensor, label: int, info: DatasetInfo,
                 request: AttackRequest, *, generator: torch.Generator, device: torch.device | str = "cpu",
                 snapshot_every: int = 10):
        self.request = request.validated()
        self.preset = get_preset(request.preset)
        self.kind = self.preset.kind
        self.info, self.label, self.device = info, int(label), torch.device(device)
        self.outcome: AttackOutcome | None = None
        self._inner = None
        if self.kind == "analytic":
            self._model = model
            oracle = GradientOracle(model, device=self.device, dtype=torch.float64)
            self._update = client_update(oracle, image.double(), label)
            self.total_steps = 1
            return
        oracle = GradientOracle(model, device=self.device)
        update = client_update(oracle, image, label)
        r = self.request
        if self.kind == "generative":
            from .generative import GifdRun, gifd_config_from

            config = gifd_config_from(steps=r.steps, restarts=r.restarts, lr=r.lr, loss=r.loss, label=r.label,
                                      tv_weight=r.tv_weight)
            self._inner = GifdRun(oracle, update, config, info, generator=generator, device=self.device,
                                  snapshot_every=snapshot_every)
        else:
            config = preset_config(r.preset, loss=r.loss, steps=r.steps, restarts=r.restarts, lr=r.lr,
                                   tv_weight=r.tv_weight, label=r.label)
            self._inner = AttackRun(oracle, update, config, info, generator=generator, device=self.device,
                                    snapshot_every=snapshot_every)
        self.total_steps = self._inner.total_steps

    def cancel(self) -> None:
        """Stop after the current step (thread-safe); R-CONV is one step and cannot be cut short."""
        if self._inner is not None:
            self._inner.cancel()

    def __iter__(self) -> Iterator[AttackSnapshot]:
        if self.kind == "analytic":
            yield from self._run_analytic()
            return
        yield from self._inner
        result = self._inner.result
        details = {"diverged": result.diverged, "restart_losses": result.restart_losses}
        if self.kind == "generative":
            details["stages"] = self._inner.result.stages
            details["best_stage"] = self._inner.result.best_stage
        if result.reconstruction is None:
            details["warning"] = DIVERGED_WARNING
        self.outcome = AttackOutcome(self.preset.name, self.kind, result.reconstruction, result.matching_loss,
                                     result.label_used, result.label_true, result.steps, result.seconds,
                                     result.cancelled, tuple(result.history), details)

    def _run_analytic(self) -> Iterator[AttackSnapshot]:
        from .analytic import reconstruct_rconv

        tic = time.perf_counter()
        result = reconstruct_rconv(self._model, self._update, device=self.device)
        seconds = time.perf_counter() - tic
        image01 = self.info.denormalize(result.reconstruction[0].float()).cpu()
        yield AttackSnapshot(1, 1, math.nan, (math.nan,), image01, None)
        details = {"layers": result.layers, "gradient_residual": result.gradient_residual}
        self.outcome = AttackOutcome(self.preset.name, self.kind, result.reconstruction, math.nan,
                                     result.label, self.label, 1, seconds, False, (), details)


def run_preset(model: nn.Module, image: torch.Tensor, label: int, info: DatasetInfo,
               request: AttackRequest, *, generator: torch.Generator,
               device: torch.device | str = "cpu") -> AttackOutcome:
    """Run a preset to the end (no intermediate snapshots) and return its outcome."""
    run = PresetRun(model, image, label, info, request, generator=generator, device=device,
                    snapshot_every=1_000_000)
    for _ in run:
        pass
    return run.outcome
