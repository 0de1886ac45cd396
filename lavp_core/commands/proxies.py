"""``proxies`` sub-command: the gradient norm, LAVP and fusion of one image, with their evidence."""

from __future__ import annotations

import argparse
import math

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


def _configure(p: argparse.ArgumentParser) -> None:
    add_scenario_args(p)
    p.add_argument("--method", default="auto", choices=("auto", "exact", "lanczos", "paper"),
                   help="eigen-solver: exact (dense float64 Hessian, every eigenvalue), lanczos (ARPACK, "
                        "large inputs), paper (finite differences + power iteration); auto: exact up to "
                        "12,288 input values")
    p.add_argument("--losses", default="l2,cos",
                   help="comma-separated matching losses (see 'list'); default l2,cos")
    p.add_argument("--tol", type=float, default=None, help="relative residual counted as converged (1e-4)")
    p.add_argument("--paper-iterations", type=int, default=None,
                   help="power-iteration budget of the paper recipe, for λ_max and again for λ_min (100)")
    p.add_argument("--spectrum", action="store_true", help="with --json: include every eigenvalue (exact)")
    add_threads_arg(p)
    add_quiet_arg(p)


def _format(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.6g}"


@command("proxies", "gradient norm and loss-aware vulnerability proxies (LAVP) of one image", _configure)
def proxies(args) -> int:
    from dataclasses import replace

    from ..hessian import SolverConfig
    from ..proxies import compute_proxies
    from .progress import Heartbeat, Progress

    losses = tuple(name.strip() for name in args.losses.split(",") if name.strip())
    if not losses:
        raise ConfigError("--losses needs at least one loss name, e.g. --losses l2,cos")
    if args.spectrum and not args.json:  # options that would do nothing are refused, not ignored
        raise ConfigError("--spectrum adds every eigenvalue to the JSON output: give --json too, or drop it")
    if args.paper_iterations is not None and args.method != "paper":
        raise ConfigError(f"--paper-iterations is the budget of --method paper; with --method {args.method} it "
                          f"would do nothing: drop it, or use --method paper")
    config = SolverConfig()
    if args.tol is not None:
        config = replace(config, tol=args.tol)
    if args.paper_iterations is not None:
        config = replace(config, paper_iterations=args.paper_iterations)
    progress = Progress("proxies", quiet=args.quiet)
    scenario = scenario_from_args(args)
    device = default_device(args.device)
    progress.note(f"{scenario.description}; losses {', '.join(losses)}, method {args.method}, on {device}, "
                  f"{args.threads} torch thread(s)")
    progress.restart_clock()
    with Heartbeat(progress, f"solving ({args.method})"):  # the solvers report no steps: time elapsed only
        result = compute_proxies(scenario.model, scenario.image, scenario.label, losses=losses,
                                 method=args.method, config=config, device=device)
    progress.finish(f"done in {result.seconds:.1f} s (method {result.method})")
    if args.json:
        payload = result.to_dict(include_spectra=args.spectrum)
        payload["image"] = scenario.description
        payload["label"] = scenario.label
        payload["threads"] = args.threads
        print_json(payload)
        return 0
    print(f"image    {scenario.description}")
    print(f"model    {args.arch} ({args.weights} weights), n = {result.num_params:,} parameters, "
          f"d = {result.input_dim:,} input values")
    print(f"method   {result.method}   {result.seconds:.1f} s")
    print()
    print(f"{'proxy':<16} {'value':>13}  {'status':<11} {'residual':>9} {'iters':>6} {'seconds':>8}")
    for key, value in result.items():
        status = "certified" if result.converged(key) else "UNCERTAIN"
        diag = result.diagnostics.get(key)
        if diag is None:
            print(f"{key:<16} {_format(value):>13}  {status:<11}")
            continue
        print(f"{key:<16} {_format(value):>13}  {status:<11} {diag.residual:>9.1e} {diag.iterations:>6} "
              f"{diag.seconds:>8.2f}")
    uncertain = result.unconverged
    if uncertain:
        print()
        print(f"UNCERTAIN values are estimates, not certified to tolerance {config.tol:g}:")
        for key in uncertain:
            if key in result.diagnostics:
                print(f"  {key}: {result.diagnostics[key].note}")
            else:
                print(f"  {key}: built from uncertain parts")
    return 0
