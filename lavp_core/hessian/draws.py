"""One generator per random draw.

Every random vector of the eigen-solvers (start vectors, the smoothness check's direction) comes from
its own ``torch.Generator``, seeded from ``SolverConfig.seed`` and what the draw is for, e.g.
``("paper", "cos", "min")``. A draw therefore does not depend on which other draws were made before
it (which other losses were requested, in which order), and nothing touches torch's global generator.
"""

from __future__ import annotations

import hashlib
import json

import torch


def draw_generator(seed: int, *purpose: str) -> torch.Generator:
    """A fresh CPU generator for one random draw.

    Args:
        seed: the run's seed (``SolverConfig.seed``).
        purpose: what the draw is for, e.g. ``("lanczos-min", loss name)``; different purposes give
            independent streams, the same (seed, purpose) always the same stream.

    Returns:
        a ``torch.Generator`` on the CPU seeded by the first 63 bits of sha256 of the JSON list
        ``[seed, *purpose]`` (unambiguous, unlike joining the strings).
    """
    key = json.dumps([int(seed), *(str(part) for part in purpose)]).encode()
    digest = hashlib.sha256(key).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
