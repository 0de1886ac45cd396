"""Sub-commands of ``python -m lavp_core``; each module registers its own with ``cli.command``."""

from . import (
    core,  # noqa: F401  list, attack
    generative,  # noqa: F401  train-generator
    proxies,  # noqa: F401  proxies
    study,  # noqa: F401  train, study, report
)
