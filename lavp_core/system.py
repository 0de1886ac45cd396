"""What this machine offers the process: a foundation module (no imports from the rest of ``lavp_core``)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask on Linux, the machine's count elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
