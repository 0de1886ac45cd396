"""``list``, ``attack`` and ``fetch-lpips`` sub-commands."""

from __future__ import annotations

import argparse
import math
import time

from ..cli import add_scenario_args, command, default_device, print_json, scenario_from_args
from ..errors import ConfigError


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("list", "list datasets, architectures, matching losses and attack presets", _configure_list)
def list_registries(args) -> int:
    from ..attacks import list_presets
    from ..data import list_datasets
    from ..losses import list_losses
    from ..models import list_models

    _register_extra_presets()
    tables = {
        "datasets": [(d.name, d.description) for d in list_datasets()],
        "architectures": [(m.name, f"{m.description} [{m.input_size}x{m.input_size}]") for m in list_models()],
        "losses": [(loss.name, loss.description) for loss in list_losses()],
        "presets": [(p.name, p.description) for p in list_presets()],
    }
    if args.json:
        print_json({k: [{"name": n, "description": d} for n, d in rows] for k, rows in tables.items()})
        return 0
    for title, rows in tables.items():
        print(f"{title}:")
        width = max(len(n) for n, _ in rows)
        for name, description in rows:
            print(f"  {name:<{width}}  {description}")
    return 0


def _register_extra_presets() -> None:
    """Import the modules whose presets are not optimisation attacks, so they are listed too."""
    import importlib

    for module in ("analytic", "generative"):
        try:
            importlib.import_module(f"lavp_core.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lavp_core.{module}":
                raise


def _configure_attack(p: argparse.ArgumentParser) -> None:
    add_scenario_args(p)
    p.add_argument("--preset", default="dlg", help="attack preset (see 'list'); default dlg")
    p.add_argument("--loss", default=None, help="matching loss, overriding the preset's")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps, overriding the preset's")
    p.add_argument("--restarts", type=int, default=None, help="random restarts, overriding the preset's")
    p.add_argument("--lr", type=float, default=None, help="learning rate, overriding the preset's")
    p.add_argument("--tv", type=float, default=None, help="TV prior weight, overriding the preset's")
    p.add_argument("--label-mode", choices=("known", "inferred"), default=None,
                   help="whether the attacker knows the label (default: the preset's)")
    p.add_argument("--out", default=None, help="save the reconstruction as a PNG here")


@command("attack", "run a gradient inversion attack on one image and print its scores", _configure_attack)
def attack(args) -> int:
    import torch

    from ..attacks import get_preset, preset_config, run_attack
    from ..gradients import client_update
    from ..metrics import score_reconstruction

    _register_extra_presets()
    preset = get_preset(args.preset)
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    if args.restarts is not None and args.restarts <= 0:
        raise ConfigError(f"--restarts must be a positive integer, got {args.restarts}")
    scenario = scenario_from_args(args)
    device = default_device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    extra = {}
    if preset.kind == "analytic":
        outcome = _run_analytic(scenario)
        reconstruction, matching, label_used, steps = outcome["reconstruction"], math.nan, scenario.label, 0
        extra["layers"] = outcome["layers"]
    elif preset.kind == "generative":
        from ..generative import gifd_config_from, run_gifd

        config = gifd_config_from(steps=args.steps, restarts=args.restarts)
        update = client_update(scenario.model, scenario.image, scenario.label)
        result = run_gifd(scenario.model, update, scenario.info, config, generator=generator, device=device).attack
        reconstruction, matching, label_used, steps = (result.reconstruction, result.matching_loss,
                                                       result.label_used, result.steps)
    else:
        config = preset_config(args.preset, loss=args.loss, steps=args.steps, restarts=args.restarts,
                               lr=args.lr, tv_weight=args.tv, label=args.label_mode)
        update = client_update(scenario.model, scenario.image, scenario.label)
        result = run_attack(scenario.model, update, config, scenario.info, generator=generator, device=device)
        if result.all_diverged:
            extra["warning"] = "every restart diverged: try more restarts, a lower learning rate or another seed"
        reconstruction, matching, label_used, steps = (result.reconstruction, result.matching_loss,
                                                       result.label_used, result.steps)
    seconds = time.perf_counter() - start
    scores = score_reconstruction(reconstruction, scenario.image, scenario.info)
    if args.out and reconstruction is not None:
        _save_png(scenario.info.denormalize(reconstruction.float().cpu())[0], args.out)
    payload = {"mse": scores["mse"], "psnr": scores["psnr"], "ssim": scores["ssim"], "lpips": scores["lpips"],
               "lpips_reason": scores["lpips_reason"], "matching_loss": matching, "label": label_used,
               "true_label": scenario.label, "steps": steps, "seconds": seconds, "preset": preset.name,
               "image": scenario.description, **extra}
    if args.json:
        print_json(payload)
        return 0
    print(f"image        {scenario.description}")
    print(f"preset       {preset.name}   steps {steps}   {seconds:.1f} s")
    print(f"label        true {scenario.label}, used {label_used}")
    print(f"matching     {matching:.6g}")
    print(f"MSE {scores['mse']:.6g}   PSNR {scores['psnr']:.2f} dB   SSIM {scores['ssim']:.4f}")
    lpips = f"{scores['lpips']:.4f}" if scores["lpips"] is not None else f"unavailable ({scores['lpips_reason']})"
    print(f"LPIPS        {lpips}")
    if "warning" in extra:
        print(f"warning      {extra['warning']}")
    if args.out:
        print(f"saved        {args.out}")
    return 0


def _run_analytic(scenario) -> dict:
    """R-CONV needs an exact float64 client gradient; compute it and invert it."""
    import torch

    from ..analytic import reconstruct_rconv
    from ..gradients import GradientOracle, client_update

    oracle = GradientOracle(scenario.model, dtype=torch.float64)
    update = client_update(oracle, scenario.image.double(), scenario.label)
    result = reconstruct_rconv(scenario.model, update)
    layers = [dict(vars(layer)) if hasattr(layer, "__dict__") else layer for layer in result.layers]
    return {"reconstruction": result.reconstruction, "layers": layers}


def _save_png(image01, path: str) -> None:
    from PIL import Image

    from ..metrics import to_uint8_image

    Image.fromarray(to_uint8_image(image01)).save(path)


def _configure_fetch(p: argparse.ArgumentParser) -> None:
    pass


@command("fetch-lpips", "download LPIPS's AlexNet backbone into the torch hub cache (needs internet)",
         _configure_fetch)
def fetch_lpips(args) -> int:
    from ..metrics import alexnet_weights_path

    path = alexnet_weights_path()
    if path.is_file():
        print(f"already present: {path}")
        return 0
    import torchvision

    try:
        torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
    except Exception as exc:  # network errors come in many types
        raise ConfigError(f"could not download AlexNet weights to {path} ({exc.__class__.__name__}); "
                          f"this needs internet access") from exc
    print(f"saved {path}")
    return 0
