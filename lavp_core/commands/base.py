"""What every sub-command shares: the command registry, the scenario options, device and JSON output.

Each module of this package registers its commands with :func:`command`; :mod:`lavp_core.cli`
imports the package and builds the parser from :data:`COMMANDS`. Nothing here imports the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register ``run(args) -> int`` as a sub-command with its argument setup."""

    def wrap(run):
        COMMANDS[name] = (help_text, configure, run)
        return run

    return wrap


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="photos", help="dataset name (see 'list'); default photos")
    p.add_argument("--index", type=int, default=0, help="image index in the validation split")
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


def default_device(requested: str | None = None):
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scenario_from_args(args):
    from ..scenario import ScenarioConfig, build_scenario

    config = ScenarioConfig(dataset=args.dataset, index=args.index, arch=args.arch, weights=args.weights,
                            seed=args.seed, split=args.split, image=args.image, label=args.label,
                            data_root=args.data_root, download=args.download)
    return build_scenario(config, device=default_device(args.device))


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
