"""The attack registry: every preset a user can name, and the kind of attack that runs it.

A *kind* is a way of attacking (the optimisation engine, the analytic R-CONV, the generative GIFD):
an :class:`AttackKind` knows its default settings and how to start a run. A *preset* is a name, a
description, a kind and that kind's own configuration (an ``AttackConfig``, a ``GifdConfig``, or
``None``). The CLI, the study planner, the runner and the app ask this registry; none of them
compares kind names.

The registry is complete on first use, whatever was imported before: :func:`list_presets` and
:func:`get_preset` import every module of :data:`PRESET_MODULES`, each of which registers its kind
and its presets. Adding a kind of attack is one new module (an :class:`AttackKind` subclass,
``register_kind``, ``register_preset``) plus its name in :data:`PRESET_MODULES`.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from .attacks import AttackResult, AttackSnapshot
    from .data import DatasetInfo

AttackKindName = Literal["optimisation", "analytic", "generative"]

#: Modules that register kinds and presets, imported on the registry's first use.
PRESET_MODULES: tuple[str, ...] = ("lavp_core.attacks", "lavp_core.analytic", "lavp_core.generative")

DIVERGED_WARNING = "every restart diverged: try more restarts, a lower learning rate or another seed"


@dataclass(frozen=True)
class AttackRequest:
    """A preset and the settings that override its defaults (``None`` keeps the preset's value).

    Which settings a preset honours is its kind's :attr:`AttackKind.settings`; ``steps`` for GIFD is the
    total over all its stages; R-CONV has no settings.
    """

    preset: str = "dlg"
    loss: str | None = None
    steps: int | None = None
    restarts: int | None = None
    lr: float | None = None
    tv_weight: float | None = None
    label: str | None = None
    schedule: str | None = None
    engine: str | None = None  # how the optimisation engine evaluates steps (fast_steps.ENGINES); None: auto

    def validated(self) -> AttackRequest:
        get_preset(self.preset)
        if self.engine is not None:
            from .fast_steps import check_engine

            check_engine(self.engine)
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        return self


#: The fields of :class:`AttackRequest` a kind may honour.
REQUEST_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(AttackRequest) if f.name != "preset")


@dataclass(frozen=True)
class AttackOutcome:
    """What any preset returns.

    ``reconstruction`` is (1, C, H, W) in normalised space (``None`` when every restart diverged);
    ``details`` holds kind-specific extras: ``layers`` (R-CONV's per-layer constraint reports),
    ``stages`` (GIFD's per-stage results), ``diverged`` flags, ``warning``.
    """

    preset: str
    kind: AttackKindName
    reconstruction: torch.Tensor | None
    matching_loss: float
    label_used: int
    label_true: int
    steps: int
    seconds: float
    cancelled: bool
    history: tuple[tuple[int, float], ...] = ()
    details: dict = field(default_factory=dict)


class KindRun(Protocol):
    """A started attack: iterate for snapshots; ``outcome`` is set once iteration ends."""

    total_steps: int
    outcome: AttackOutcome | None

    def cancel(self) -> None: ...

    def __iter__(self) -> Iterator[AttackSnapshot]: ...


class AttackKind(ABC):
    """One way of attacking. Subclasses set the class attributes and implement :meth:`defaults` and
    :meth:`start`; one instance of each is registered with :func:`register_kind`."""

    name: ClassVar[AttackKindName]
    summary: ClassVar[str]
    studied: ClassVar[bool] = False  # a study (an attack per image, loss and model) can run it
    settings: ClassVar[tuple[str, ...]] = ()  # the AttackRequest fields it honours
    has_loss_curve: ClassVar[bool] = True  # its snapshots carry a matching loss worth plotting
    note: ClassVar[str] = ""  # what a user should know before running it (shown beside its settings)

    def check_model(self, model: nn.Module, image_shape: tuple[int, int, int]) -> None:
        """Raise a :class:`~lavp_core.errors.LavpError` saying what to choose instead when this kind
        cannot attack ``model`` on (C, H, W) inputs; the default accepts every classifier."""
        return None

    @abstractmethod
    def defaults(self, preset: AttackPreset) -> AttackRequest:
        """The preset's settings as a request (``None`` for settings this kind does not have)."""

    @abstractmethod
    def start(self, preset: AttackPreset, model: nn.Module, image: torch.Tensor, label: int,
              info: DatasetInfo, request: AttackRequest, *, generator: torch.Generator,
              device: torch.device, snapshot_every: int) -> KindRun:
        """Prepare a run of ``preset`` with ``request``'s overrides on the client image ``image``
        (normalised, (1, C, H, W)); only its gradient reaches the attack, and ``model`` is never modified."""


@dataclass(frozen=True)
class AttackPreset:
    """A named attack: its kind's name and the kind's own configuration (``None`` if it has none)."""

    name: str
    description: str
    kind: AttackKindName
    config: Any = None

    @property
    def attack_kind(self) -> AttackKind:
        return get_kind(self.kind)

    def defaults(self) -> AttackRequest:
        """The settings this preset runs with when nothing is overridden."""
        return self.attack_kind.defaults(self)


_KINDS: dict[str, AttackKind] = {}
_PRESETS: dict[str, AttackPreset] = {}
_loaded = False
_load_lock = threading.Lock()


def register_kind(kind: AttackKind) -> AttackKind:
    """Register ``kind`` under ``kind.name`` (its settings must be :class:`AttackRequest` fields)."""
    unknown = set(kind.settings) - set(REQUEST_SETTINGS)
    if unknown:
        raise ConfigError(f"kind {kind.name!r} names settings {sorted(unknown)} that AttackRequest lacks")
    _KINDS[kind.name] = kind
    return kind


def register_preset(preset: AttackPreset) -> AttackPreset:
    """Register ``preset``; its kind must be registered first."""
    if preset.kind not in _KINDS:
        raise ConfigError(f"preset {preset.name!r} has kind {preset.kind!r}, which is not registered")
    _PRESETS[preset.name] = preset
    return preset


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if not _loaded:
            for module in PRESET_MODULES:
                importlib.import_module(module)
            _loaded = True


def list_kinds() -> list[AttackKind]:
    _load_all()
    return list(_KINDS.values())


def get_kind(name: str) -> AttackKind:
    _load_all()
    if name not in _KINDS:
        raise ConfigError(f"unknown attack kind {name!r}: choose one of {', '.join(_KINDS)}")
    return _KINDS[name]


def list_presets() -> list[AttackPreset]:
    """Every registered preset, in registration order."""
    _load_all()
    return list(_PRESETS.values())


def get_preset(name: str) -> AttackPreset:
    """The preset called ``name`` (``ConfigError`` naming every preset if there is none)."""
    _load_all()
    if name not in _PRESETS:
        raise ConfigError(f"unknown attack preset {name!r}: choose one of {', '.join(_PRESETS)}")
    return _PRESETS[name]


def outcome_from_result(preset: AttackPreset, result: AttackResult, **details) -> AttackOutcome:
    """The :class:`AttackOutcome` of an optimisation-style ``result`` (restarts, divergence, history)."""
    details = {"diverged": result.diverged, "restart_losses": result.restart_losses, **details}
    if result.reconstruction is None:
        details["warning"] = DIVERGED_WARNING
    return AttackOutcome(preset.name, preset.kind, result.reconstruction, result.matching_loss,
                         result.label_used, result.label_true, result.steps, result.seconds,
                         result.cancelled, tuple(result.history), details)


class StreamedRun:
    """A run that streams snapshots and then holds an ``AttackResult``-like ``.result`` (the engine's
    ``AttackRun``, GIFD's ``GifdRun``), seen through the :class:`KindRun` protocol.

    ``details`` maps the finished result to the kind's extra :attr:`AttackOutcome.details`.
    """

    def __init__(self, preset: AttackPreset, run, details: Callable[[Any], dict] | None = None):
        self.preset, self._run, self._details = preset, run, details
        self.total_steps: int = run.total_steps
        self.outcome: AttackOutcome | None = None

    def cancel(self) -> None:
        self._run.cancel()

    def __iter__(self) -> Iterator[AttackSnapshot]:
        yield from self._run
        result = self._run.result
        extra = self._details(result) if self._details is not None else {}
        self.outcome = outcome_from_result(self.preset, result, **extra)
