"""``train``, ``study`` and ``report`` sub-commands."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import ConfigError
from .base import add_quiet_arg, add_threads_arg, check_seed, command, default_device


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet8", help="architecture name (see 'list')")
    p.add_argument("--dataset", default="photos", help="dataset name (see 'list')")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05, help="initial SGD learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="folder of CIFAR or an image folder")
    p.add_argument("--out", default=None, help="checkpoint path (default assets/checkpoints/<arch>-<dataset>.pt)")
    p.add_argument("--resume", action="store_true", help="continue from <out>.partial if present")
    p.add_argument("--snapshots", default="", help="also keep the model after these epochs, e.g. 0,1,5,40 "
                   "(0 = the initialisation), as <out stem>-epoch<E>.pt; study with --weights trained@E")
    p.add_argument("--device", default=None)
    add_threads_arg(p)
    add_quiet_arg(p)


@command("train", "train an architecture on a dataset and save a checkpoint with a JSON record", _configure_train)
def train_command(args) -> int:
    from tqdm import tqdm

    from ..models import trained_checkpoint_path
    from ..train import TrainConfig, train

    out = args.out or str(trained_checkpoint_path(args.arch, args.dataset))
    config = TrainConfig(arch=args.arch, dataset=args.dataset, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=check_seed(args.seed), data_root=args.data_root)
    cmd = "python -m lavp_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    bar = tqdm(total=None, unit="step", desc=f"train {args.arch}", dynamic_ncols=True, disable=args.quiet)

    def on_batch(step, steps, loss, acc):
        bar.total = steps
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", refresh=False)
        bar.refresh()

    def on_epoch(report):
        bar.write(f"epoch {report.epoch}/{report.epochs}  loss {report.train_loss:.4f}  "
                  f"train acc {report.train_accuracy:.3f}  val acc {report.val_accuracy:.3f}  "
                  f"{report.seconds:.0f} s")

    try:
        snapshots = tuple(int(e) for e in args.snapshots.split(",") if e.strip())
    except ValueError as exc:
        raise ConfigError(f"--snapshots takes epoch numbers separated by commas, e.g. 0,1,5,40; got "
                          f"{args.snapshots!r}") from exc
    record = train(config, out, device=default_device(args.device), resume=args.resume, command=cmd,
                   snapshots=snapshots, progress=on_epoch, batch_progress=on_batch)
    bar.close()
    print(f"saved {out}  val accuracy {record['val_accuracy']:.3f}  sha256 {record['sha256'][:12]}")
    return 0


def _configure_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="results.sqlite", help="results database (created when missing); "
                   "default results.sqlite")
    p.add_argument("--name", default="study", help="label stored with the study (report --study NAME)")
    p.add_argument("--dataset", default="photos", help="dataset name (see 'list'); default photos")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--archs", default="lenet,resnet8", help="comma-separated architectures; default lenet,resnet8")
    p.add_argument("--weights", default="trained",
                   help="'trained' (default), 'trained@E' (the training run's snapshot after epoch E), 'random' or a "
                        "checkpoint path; several, comma-separated, make the grid span those model states")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights, the image draw and attack starts")
    p.add_argument("--losses", default="l2,cos", help="comma-separated attack losses; default l2,cos")
    p.add_argument("--images", default="100", help="a count N (N images drawn with --seed) or indices 0,5,9")
    p.add_argument("--preset", default="lavp-paper", help="optimisation attack preset; default lavp-paper")
    p.add_argument("--steps", type=int, default=None, help="attack steps, overriding the preset's")
    p.add_argument("--restarts", type=int, default=None, help="attack restarts, overriding the preset's")
    p.add_argument("--lr", type=float, default=None, help="attack learning rate, overriding the preset's")
    p.add_argument("--tv", type=float, default=None, help="TV prior weight, overriding the preset's")
    p.add_argument("--schedule", choices=("none", "step"), default=None,
                   help="attack learning-rate schedule, overriding the preset's: none (constant) or step "
                        "(x0.1 at 3/8, 5/8, 7/8 of the steps)")
    p.add_argument("--proxy-losses", default=None, help="losses whose LAVP is computed (default: --losses)")
    p.add_argument("--flavours", default="exact,paper",
                   help="proxy flavours: exact (certified solver) and/or paper (the paper's recipe)")
    p.add_argument("--exact-method", default="exact", choices=("exact", "lanczos", "auto"),
                   help="solver of the exact flavour: exact (dense Hessian, default), lanczos, auto")
    p.add_argument("--paper-iterations", type=int, default=None,
                   help="power-iteration budget of the paper recipe for each extreme (default 100)")
    p.add_argument("--tol", type=float, default=None, help="relative residual counted as converged (1e-4)")
    p.add_argument("--workers", type=int, default=None,
                   help="jobs at once: worker processes (default: cores // threads; 0 runs the jobs in this "
                   "process); with --backend ray, Ray tasks in flight (default 0: as many as the cluster fits)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker, and of this process (default 1: see README, Command line)")
    p.add_argument("--engine", default="auto",
                   help="how attacks evaluate their steps: auto (default: compiled for Adam attacks of 1,000 "
                        "steps or more, compiled once per worker and kept in PyTorch's on-disk cache; traced "
                        "or eager otherwise), eager, traced, compiled. Results agree to round-off, so a study "
                        "may be resumed with another engine")
    p.add_argument("--compile", action="store_const", const="compiled", dest="engine",
                   help="the same as --engine compiled")
    p.add_argument("--backend", default="local",
                   help="where jobs run: local (this machine's cores, default) or ray (a Ray cluster)")
    p.add_argument("--address", default=None,
                   help="with --backend ray: the cluster, 'auto' (the one 'ray start' began here, or "
                   "$RAY_ADDRESS) or HOST:PORT of its head; default: a local Ray instance for this run")
    p.add_argument("--no-images", action="store_true", help="do not store reconstruction PNGs")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bar on stderr")
    p.add_argument("--data-root", default=None, help="folder of CIFAR or an image folder")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _split_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _weights(text: str) -> str | tuple[str, ...]:
    """One model state stays a string (so older studies keep their keys); several become a tuple."""
    names = _split_names(text) or (text,)
    return names[0] if len(names) == 1 else names


@command("study", "run a grid of attacks and proxies (image x architecture x loss) into a SQLite database",
         _configure_study)
def study_command(args) -> int:
    from dataclasses import replace

    from ..hessian import SolverConfig
    from ..study import StudyConfig, parse_images, plan_study, run_study, summarise

    solver = SolverConfig()
    if args.paper_iterations is not None:
        solver = replace(solver, paper_iterations=args.paper_iterations)
    if args.tol is not None:
        solver = replace(solver, tol=args.tol)
    config = StudyConfig(name=args.name, dataset=args.dataset, split=args.split, images=parse_images(args.images),
                         archs=_split_names(args.archs), weights=_weights(args.weights), seed=check_seed(args.seed),
                         losses=_split_names(args.losses), preset=args.preset, steps=args.steps,
                         restarts=args.restarts, lr=args.lr, tv_weight=args.tv, schedule=args.schedule,
                         proxy_losses=_split_names(args.proxy_losses), flavours=_split_names(args.flavours),
                         exact_method=args.exact_method, solver=solver, data_root=args.data_root,
                         store_images=not args.no_images)
    plan = plan_study(config)  # every name is checked before any job runs or anything is written
    # With --workers 0 the jobs run in this process, which the CLI has given --threads torch threads already
    # (lavp_core.system.choose_threads), the count a worker would have.
    options = {} if args.address is None else {"address": args.address}
    summary = run_study(plan, args.db, workers=args.workers, threads=args.threads, device=args.device,
                        engine=args.engine, progress=not args.no_progress, executor=args.backend,
                        executor_options=options)
    if args.json:
        from .base import print_json

        print_json(summary.to_dict())
    else:
        print(summarise(summary))
        if summary.skipped:
            print(f"{summary.skipped} job(s) left to another runner on {summary.db} (claimed or stored by it)")
    return 0


def _configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="results.sqlite", help="results database (opened read-only)")
    p.add_argument("--format", default="md", choices=("md", "csv", "json"))
    p.add_argument("--study", default=None, help="only the jobs of this study name")
    p.add_argument("--flavour", default="both", choices=("exact", "paper", "both"),
                   help="which proxy values: exact, the paper's recipe, or both side by side (default)")
    p.add_argument("--per-arch", action="store_true",
                   help="md: add σ_S per architecture with p-values and bootstrap intervals")
    p.add_argument("--include-uncertified", action="store_true",
                   help="keep exact values that are not certified (λ_min below float64's resolution) in σ_S")
    p.add_argument("--rankings", action="store_true",
                   help="print the MSE rankings under each loss and each proxy's predicted ranking (Figure 1b/1c)")
    p.add_argument("--images", default=None, help="with --rankings: comma-separated image indices, e.g. 0,5,9,12")
    p.add_argument("--arch", default=None, help="with --rankings: only this architecture")


@command("report", "Spearman tables (paper's Tables 1 and 3) and rankings from a study database", _configure_report)
def report_command(args) -> int:
    from ..errors import ConfigError
    from ..study import format_rankings, format_report, load_results, parse_images, rankings

    df = load_results(args.db, study=args.study)
    flavours = ("exact", "paper") if args.flavour == "both" else (args.flavour,)
    if args.rankings:
        if not args.images:
            raise ConfigError("--rankings needs --images with at least two indices, e.g. --images 0,5,9,12")
        images = parse_images(args.images if "," in args.images else args.images + ",")
        tables = [rankings(df, images, proxy_flavour=f, arch=args.arch).assign(flavour=f) for f in flavours]
        import pandas as pd

        table = pd.concat(tables, ignore_index=True)
        if args.format == "md":
            for flavour, part in zip(flavours, tables, strict=True):
                print(f"# Rankings, {flavour} proxy values\n")
                print(format_rankings(part.drop(columns=["flavour"]), "md"))
        else:
            print(format_rankings(table, args.format), end="" if args.format == "csv" else "\n")
        return 0
    text = format_report(df, args.format, flavours=flavours, per_arch=args.per_arch,
                         include_uncertified=args.include_uncertified)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0
