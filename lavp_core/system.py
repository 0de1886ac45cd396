"""What this machine offers the process: a foundation module (imports nothing of ``lavp_core`` but
:mod:`lavp_core.errors`)."""

from __future__ import annotations

import os

from .errors import ConfigError

#: Torch intra-op threads of a CLI command when neither ``--threads`` nor ``$OMP_NUM_THREADS`` says.
DEFAULT_THREADS = 1


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask on Linux, the machine's count elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _env_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when it is a positive integer (torch itself ignores other values), else None."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def choose_threads(requested: int | None = None, option: str = "--threads") -> int:
    """Set torch's intra-op thread count for this process once, at a command's start; return it.

    The choice, in order: ``requested`` (the command's ``--threads N``), else ``$OMP_NUM_THREADS`` when
    it is set to a positive integer (someone chose it for this machine: a scheduler, a container, the
    user), else :data:`DEFAULT_THREADS` (1) whatever the core count.

    Why 1 and not torch's default (one thread per core): ``benchmarks/cli_threads.py`` timed one attack
    (``ig`` 10 steps, ``dlg`` 1 step) and one proxy computation (the paper's recipe, l2 and cos) on
    lenet, each in a fresh process, on a 2-core machine shared with other jobs. Medians of 3: 1 thread
    0.23 / 0.42 / 0.45 s, 2 threads 3.39 / 5.65 / 4.77 s; with a busy loop on each core 0.75 / 1.35 /
    1.82 s against 6.73 / 21.28 / 28.33 s (torch's default was 2 threads there, and as slow). Torch's
    OpenMP threads wait on each other at every operation, and these operations (one 32x32 image, small
    networks) are too small for a second thread to pay for the wait, which is long whenever another
    process holds a core. On a quiet machine 2 threads gained 8-16% on lenet and lost on resnet8
    (README, "Attack throughput"). On a large idle machine with a heavier model, ask for more with
    ``--threads``.

    Raises:
        ConfigError: ``requested`` is not an integer of at least 1 (the message names ``option``).
    """
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)
                                  or requested < 1):
        raise ConfigError(f"{option} must be an integer of at least 1, got {requested}")
    threads = requested if requested is not None else (_env_threads() or DEFAULT_THREADS)
    import torch

    torch.set_num_threads(threads)  # also MKL's count
    return threads
