"""One front door for every attack preset: optimisation (DLG, iDLG, IG, the paper's protocol),
analytical (R-CONV) and generative (GIFD).

The CLI and the app start any preset the same way and get the same :class:`AttackOutcome`; long
ones stream :class:`~lavp_core.attacks.AttackSnapshot` objects and can be cancelled between steps.
(A study runs optimisation presets through :mod:`lavp_core.attacks` directly.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .data import DatasetInfo
from .presets import (
    DIVERGED_WARNING,
    AttackOutcome,
    AttackRequest,
    get_preset,
)

__all__ = ["DIVERGED_WARNING", "AttackOutcome", "AttackRequest", "PresetRun", "run_preset"]


class PresetRun:
    """Run any preset as an iterator of snapshots; ``.outcome`` is set when it ends.

    The preset's kind (see :mod:`lavp_core.presets`) builds the run; this class only streams it.

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
        self._run = self.preset.attack_kind.start(self.preset, model, image, self.label, info, self.request,
                                                  generator=generator, device=self.device,
                                                  snapshot_every=snapshot_every)
        self.total_steps = self._run.total_steps

    def cancel(self) -> None:
        """Stop after the current step (thread-safe); a one-step attack (R-CONV) cannot be cut short."""
        self._run.cancel()

    def __iter__(self) -> Iterator:
        yield from self._run
        self.outcome = self._run.outcome


def run_preset(model: nn.Module, image: torch.Tensor, label: int, info: DatasetInfo,
               request: AttackRequest, *, generator: torch.Generator,
               device: torch.device | str = "cpu") -> AttackOutcome:
    """Run a preset to the end (no intermediate snapshots) and return its outcome."""
    run = PresetRun(model, image, label, info, request, generator=generator, device=device,
                    snapshot_every=1_000_000)
    for _ in run:
        pass
    return run.outcome
