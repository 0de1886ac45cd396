"""What every sub-command shares: the command registry, the scenario options, device and JSON output.

Each module of this package registers its commands with :func:`command`; :mod:`lavp_core.cli`
imports the package and builds the parser from :data:`COMMANDS`. Nothing here imports the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

from ..errors import ConfigError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register ``run(args) -> int`` as a sub-command with its argument setup."""

    def wrap(run):
        COMMANDS[name] = (help_text, configure, run)
        return run

    return wrap


SEED_MAX = 2**63 - 1  # torch seeds must fit in 64 bits; results databases store them as signed 64-bit integers


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="photos", help="dataset name (see 'list'); default photos")
    p.add_argument("--index", type=int, default=None, help="image index in the validation split (default 0)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--arch", default="lenet", help="architecture name (see 'list')")
    p.add_argument("--weights", default="random", help="'random', 'trained' or a checkpoint path")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and of the attack")
    p.add_argument("--image", default=None, help="a PNG/JPEG to use instead of a dataset image")
    p.add_argument("--label", type=int, default=None, help="label of --image (default 0)")
    p.add_argument("--data-root", default=None, help="folder of CIFAR or an image folder")
    p.add_argument("--download", action="store_true", help="CIFAR only: download into --data-root if missing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


THREADS_HELP = ("torch CPU threads of this command (default: $OMP_NUM_THREADS when set, else 1, the fastest "
                "measured on a 2-core machine idle or busy; see README)")


def add_threads_arg(p: argparse.ArgumentParser, help_text: str = THREADS_HELP) -> None:
    """``--threads N``: the CLI applies it with :func:`lavp_core.system.choose_threads` before the command runs."""
    p.add_argument("--threads", type=int, default=None, metavar="N", help=help_text)


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress lines on stderr (see :mod:`lavp_core.commands.progress`)."""
    p.add_argument("--quiet", action="store_true",
                   help="no progress on stderr (progress never goes to stdout, so --json stays one object)")


def default_device(requested: str | None = None):
    """The ``torch.device`` for ``--device`` (``cpu``, ``cuda`` or ``cuda:N``; default: cuda when available).

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where there is none (or not that many GPUs).
    """
    import torch

    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"unknown device {requested!r}: use --device cpu or --device cuda (cuda:0, cuda:1, …)"
                          ) from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {requested!r} is not supported here: use --device cpu or --device cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA GPU is available to this process; use --device cpu "
                          f"(or leave --device out to use a GPU when there is one)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {requested}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}")
    return device


def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` if it is an integer from 0 to :data:`SEED_MAX`; else a :class:`ConfigError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{option} must be an integer from 0 to {SEED_MAX} (seeds are 64-bit), got {seed}")
    return seed


def check_scenario_args(args) -> None:
    """Refuse scenario options that would do nothing in this combination (rather than ignore them)."""
    check_seed(args.seed)
    if args.image is None and args.label is not None:
        raise ConfigError("--label is the label of --image; a dataset image has its own. Give --image too, or "
                          "drop --label")
    if args.image is not None and args.index is not None:
        raise ConfigError("--index picks a dataset image, but --image replaces it; drop one of them")
    if args.download and args.dataset not in ("cifar10", "cifar100"):
        raise ConfigError(f"--download fetches CIFAR only; dataset {args.dataset!r} needs no download")


def scenario_from_args(args):
    """The scenario the options describe (checked with :func:`check_scenario_args` first)."""
    from ..scenario import ScenarioConfig, build_scenario

    check_scenario_args(args)
    device = default_device(args.device)
    config = ScenarioConfig(dataset=args.dataset, index=0 if args.index is None else args.index, arch=args.arch,
                            weights=args.weights, seed=args.seed, split=args.split, image=args.image,
                            label=args.label, data_root=args.data_root, download=args.download)
    return build_scenario(config, device=device)


def json_safe(value):
    """Replace non-finite floats by None (JSON has no inf/NaN) recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def print_json(payload: dict) -> None:
    print(json.dumps(json_safe(payload), indent=None, sort_keys=False))
