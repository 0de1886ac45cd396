"""LAVP Explorer core: gradient inversion attacks and loss-aware vulnerability proxies.

Never imports streamlit. Public names are loaded lazily so that ``import lavp_core`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "DatasetInfo": "data", "ImageSet": "data", "list_datasets": "data", "load_dataset": "data",
    "load_image": "data",
    # models
    "create_model": "models", "list_models": "models",
    # losses
    "get_loss": "losses", "list_losses": "losses",
    # gradients
    "GradientOracle": "gradients", "ClientUpdate": "gradients", "client_update": "gradients",
    "infer_label": "gradients",
    # attacks
    "AttackConfig": "attacks", "AttackRun": "attacks", "run_attack": "attacks", "get_preset": "attacks",
    "list_presets": "attacks",
    # metrics
    "image_metrics": "metrics",
    # proxies
    "compute_proxies": "proxies",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lavp_core' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
