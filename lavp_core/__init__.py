"""LAVP Explorer core: gradient inversion attacks and loss-aware vulnerability proxies.

Never imports streamlit. Public names are loaded lazily so that ``import lavp_core`` stays cheap;
the ``TYPE_CHECKING`` block below names the same objects for type checkers and editors (a test
keeps the two lists equal).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "LavpError": "errors", "ConfigError": "errors", "DatasetError": "errors", "ImageError": "errors",
    "CheckpointError": "errors", "ModelError": "errors", "UnsupportedModelError": "errors",
    "ProxyError": "errors", "StoreError": "errors",
    # data
    "DatasetInfo": "data", "ImageSet": "data", "list_datasets": "data", "load_dataset": "data",
    "load_image": "data",
    # models
    "create_model": "models", "list_models": "models",
    # losses
    "get_loss": "losses", "list_losses": "losses", "register_loss": "losses",
    # gradients
    "GradientOracle": "gradients", "ClientUpdate": "gradients", "client_update": "gradients",
    "infer_label": "gradients",
    # scenario
    "ScenarioConfig": "scenario", "build_scenario": "scenario",
    # attacks: the registry, the front door, the optimisation engine
    "AttackKind": "presets", "AttackPreset": "presets", "AttackRequest": "presets", "AttackOutcome": "presets",
    "get_preset": "presets", "list_presets": "presets", "list_kinds": "presets", "register_kind": "presets",
    "register_preset": "presets",
    "PresetRun": "runner", "run_preset": "runner",
    "AttackConfig": "attacks", "AttackRun": "attacks", "run_attack": "attacks", "preset_config": "attacks",
    # metrics
    "image_metrics": "metrics", "score_reconstruction": "metrics",
    # proxies
    "SolverConfig": "hessian", "EigenResult": "hessian",
    "compute_proxies": "proxies", "ProxyResult": "proxies", "ProxyDefinition": "proxies",
    "proxy_table": "proxies", "proxy_definition": "proxies",
    # studies
    "StudyConfig": "study", "plan_study": "study", "run_study": "study", "load_results": "study",
    "format_report": "study",
}

if TYPE_CHECKING:
    from .attacks import AttackConfig, AttackRun, preset_config, run_attack
    from .data import DatasetInfo, ImageSet, list_datasets, load_dataset, load_image
    from .errors import (
        CheckpointError,
        ConfigError,
        DatasetError,
        ImageError,
        LavpError,
        ModelError,
        ProxyError,
        StoreError,
        UnsupportedModelError,
    )
    from .gradients import ClientUpdate, GradientOracle, client_update, infer_label
    from .hessian import EigenResult, SolverConfig
    from .losses import get_loss, list_losses, register_loss
    from .metrics import image_metrics, score_reconstruction
    from .models import create_model, list_models
    from .presets import (
        AttackKind,
        AttackOutcome,
        AttackPreset,
        AttackRequest,
        get_preset,
        list_kinds,
        list_presets,
        register_kind,
        register_preset,
    )
    from .proxies import ProxyDefinition, ProxyResult, compute_proxies, proxy_definition, proxy_table
    from .runner import PresetRun, run_preset
    from .scenario import ScenarioConfig, build_scenario
    from .study import StudyConfig, format_report, load_results, plan_study, run_study


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lavp_core' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
