"""``list``, ``attack`` and ``fetch-lpips`` sub-commands."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .base import (
    add_quiet_arg,
    add_scenario_args,
    add_threads_arg,
    command,
    default_device,
    print_json,
    scenario_from_args,
)


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("list", "list datasets, architectures, matching losses and attack presets", _configure_list)
def list_registries(args) -> int:
    from ..data import list_datasets
    from ..losses import list_losses
    from ..models import list_models
    from ..presets import list_presets

    tables = {
        "datasets": [(d.name, d.description) for d in list_datasets()],
        "architectures": [(m.name, f"{m.description} [{m.input_size}x{m.input_size}]")
                          for m in list_models()],
        "losses": [(loss.name, loss.description) for loss in list_losses()],
        "presets": [(p.name, f"{p.description} [{p.kind}]") for p in list_presets()],
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


def _configure_attack(p: argparse.ArgumentParser) -> None:
    add_scenario_args(p)
    p.add_argument("--preset", default="dlg", help="attack preset (see 'list'); default dlg")
    p.add_argument("--loss", default=None, help="matching loss, overriding the preset's")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps, overriding the preset's")
    p.add_argument("--restarts", type=int, default=None, help="random restarts, overriding the preset's")
    p.add_argument("--lr", type=float, default=None, help="learning rate, overriding the preset's")
    p.add_argument("--tv", type=float, default=None, help="TV prior weight, overriding the preset's")
    p.add_argument("--schedule", choices=("none", "step"), default=None,
                   help="learning-rate schedule: none (constant) or step (x0.1 at 3/8, 5/8, 7/8 of the steps); "
                        "default: the preset's")
    p.add_argument("--label-mode", choices=("known", "inferred"), default=None,
                   help="whether the attacker knows the label (default: the preset's)")
    p.add_argument("--engine", default=None,
                   help="how the optimisation engine evaluates steps: auto (default: traced for runs of 200 "
                        "steps or more), eager, traced, compiled (torch.compile: pays on long runs; the first "
                        "compile of a model takes tens of seconds)")
    p.add_argument("--compile", action="store_const", const="compiled", dest="engine",
                   help="the same as --engine compiled")
    p.add_argument("--out", default=None, help="save the reconstruction here (.png, .jpg or .jpeg)")
    add_threads_arg(p)
    add_quiet_arg(p)


# Attack options and the AttackRequest field each overrides: an option the preset's kind does not honour is
# refused (it would do nothing).
OVERRIDES = {"--loss": "loss", "--steps": "steps", "--restarts": "restarts", "--lr": "lr", "--tv": "tv_weight",
             "--schedule": "schedule", "--label-mode": "label", "--engine": "engine"}
OUT_SUFFIXES = (".png", ".jpg", ".jpeg")
PROGRESS_SNAPSHOTS = 100  # snapshots per restart that the attack yields for the progress line (at most ~this many)


def check_output_path(out: str | None) -> Path | None:
    """Check where ``--out`` will be written before anything runs: a .png/.jpg/.jpeg file name, not a
    folder, in a folder that exists and may be written. Returns the path (``None`` without ``--out``)."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        raise ConfigError(f"--out {out} is a folder; give a file name in it, e.g. {path / 'reconstruction.png'}")
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out {out}: give the file a .png or .jpg extension (it names the image format)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"--out {out}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--out {out}: cannot write there (no permission); choose another place")
    return path


def check_overrides(args) -> None:
    """Refuse attack options that the preset's kind does not have (R-CONV has none)."""
    from ..presets import get_preset

    preset = get_preset(args.preset)
    honoured = preset.attack_kind.settings
    given = [option for option, field in OVERRIDES.items()
             if getattr(args, option[2:].replace("-", "_")) is not None and field not in honoured]
    if given:
        kept = ", ".join(o for o, f in OVERRIDES.items() if f in honoured) or "none"
        raise ConfigError(f"{', '.join(given)} would do nothing with preset {preset.name} (an attack of kind "
                          f"{preset.kind}; the options it takes: {kept}); drop {'it' if len(given) == 1 else 'them'}")


@command("attack", "run a gradient inversion attack on one image and print its scores", _configure_attack)
def attack(args) -> int:
    import torch

    from ..metrics import score_reconstruction
    from ..presets import get_preset
    from ..runner import AttackRequest, PresetRun
    from .progress import Progress

    out = check_output_path(args.out)  # before the attack, which may take minutes
    request = AttackRequest(preset=args.preset, loss=args.loss, steps=args.steps, restarts=args.restarts,
                            lr=args.lr, tv_weight=args.tv, label=args.label_mode,
                            schedule=args.schedule, engine=args.engine).validated()
    check_overrides(args)
    progress = Progress(f"attack {args.preset}", quiet=args.quiet)
    scenario = scenario_from_args(args)
    device = default_device(args.device)
    defaults = get_preset(args.preset).defaults()
    steps = request.steps or defaults.steps or 1  # per restart when they run one after another (L-BFGS)
    restarts = request.restarts or defaults.restarts or 1
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    run = PresetRun(scenario.model, scenario.image, scenario.label, scenario.info, request,
                    generator=generator, device=device, snapshot_every=max(1, steps // PROGRESS_SNAPSHOTS))
    progress.note(f"{scenario.description}; {run.total_steps} steps on {device}, {args.threads} torch "
                  f"thread(s)")
    progress.restart_clock()
    for snapshot in run:
        restart = getattr(snapshot, "restart", None)
        extra = f"restart {restart + 1}/{restarts}" if restart is not None and restarts > 1 else ""
        progress.step(snapshot.step, snapshot.total_steps, snapshot.matching_loss, extra)
    outcome = run.outcome
    seconds = time.perf_counter() - start
    progress.finish(f"{outcome.steps} steps in {seconds:.1f} s, matching loss {outcome.matching_loss:.6g}")
    scores = score_reconstruction(outcome.reconstruction, scenario.image, scenario.info)
    payload = {"mse": scores["mse"], "psnr": scores["psnr"], "ssim": scores["ssim"], "lpips": scores["lpips"],
               "lpips_reason": scores["lpips_reason"], "matching_loss": outcome.matching_loss,
               "label": outcome.label_used, "true_label": scenario.label, "steps": outcome.steps,
               "seconds": seconds, "preset": outcome.preset, "image": scenario.description, "threads": args.threads}
    if "layers" in outcome.details:
        payload["layers"] = [dict(vars(layer)) for layer in outcome.details["layers"]]
    if "stages" in outcome.details:
        payload["stages"] = [{"stage": s.index, "name": s.name, "matching_loss": s.matching_loss}
                             for s in outcome.details["stages"]]
    if "warning" in outcome.details:
        payload["warning"] = outcome.details["warning"]
    if args.json:
        print_json(payload)
    else:
        _print_attack(payload)
    if out is not None:  # the scores are out first: a failing write loses nothing computed
        if outcome.reconstruction is None:
            print("saved        nothing: no reconstruction (every restart diverged)", file=sys.stderr)
            return 0
        _save_png(scenario.info.denormalize(outcome.reconstruction.float().cpu())[0], out)
        if not args.json:
            print(f"saved        {out}")
    return 0


def _print_attack(payload: dict) -> None:
    print(f"image        {payload['image']}")
    print(f"preset       {payload['preset']}   steps {payload['steps']}   {payload['seconds']:.1f} s")
    print(f"label        true {payload['true_label']}, used {payload['label']}")
    print(f"matching     {payload['matching_loss']:.6g}")
    print(f"MSE {payload['mse']:.6g}   PSNR {payload['psnr']:.2f} dB   SSIM {payload['ssim']:.4f}")
    if payload["lpips"] is not None:
        print(f"LPIPS        {payload['lpips']:.4f}")
    else:
        print(f"LPIPS        unavailable ({payload['lpips_reason']})")
    for layer in payload.get("layers", []):
        print(f"layer        {layer['name']}: {layer['method']}, {layer['constraints_used']}/"
              f"{layer['constraints_available']} constraints used, rank {layer['rank']}/{layer['unknowns']}")
    for stage in payload.get("stages", []):
        print(f"stage        {stage['name']}: matching {stage['matching_loss']:.6g}")
    if "warning" in payload:
        print(f"warning      {payload['warning']}")


def _save_png(image01, path: Path) -> None:
    """Write the image (PNG or JPEG, from the suffix); a failure is a :class:`ConfigError` naming the path."""
    from ..metrics import image_file_bytes

    try:
        data = image_file_bytes(image01, "PNG" if path.suffix.lower() == ".png" else "JPEG")
        path.write_bytes(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not save the reconstruction to {path} ({exc.__class__.__name__}: {exc}); the "
                          f"scores above are complete. Rerun with another --out") from exc


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
