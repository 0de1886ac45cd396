"""Sub-commands of ``python -m lavp_core``; each module registers its own with ``base.command``."""

from . import (
    core,  # noqa: F401  list, attack, fetch-lpips
    generative,  # noqa: F401  train-generator
    proxies,  # noqa: F401  proxies
    study,  # noqa: F401  train, study, report
)
from .base import COMMANDS

__all__ = ["COMMANDS"]
