"""Study throughput: jobs per minute of a tiny study with 1 worker and with the default worker count.

Runs the same tiny grid (random weights, a few images, two losses, few attack steps, the paper-recipe
proxies with a small budget unless ``--flavours exact,paper``) twice, each into a fresh temporary
database, and prints jobs per minute (worker start-up included: it is part of a real run) and the
ratio default / 1 worker. The default worker count is cores // threads (see ``study.default_workers``).
With ``--backend ray`` it also runs the grid on a local Ray instance started for the run (its start-up
included, as the worker start-up is), one task per ``threads`` cores, beside the local pool.

    python benchmarks/study_throughput.py [--images 4] [--archs lenet,resnet8] [--steps 20] [--backend ray]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lavp_core.hessian import SolverConfig  # noqa: E402
from lavp_core.study import StudyConfig, default_workers, plan_study, run_study  # noqa: E402
from lavp_core.system import available_cores  # noqa: E402


def measure(config: StudyConfig, workers: int | None, threads: int, backend: str = "local") -> dict:
    plan = plan_study(config)
    with tempfile.TemporaryDirectory() as folder:
        summary = run_study(plan, Path(folder) / "bench.sqlite", workers=workers, threads=threads, progress=False,
                            executor=backend)
    if summary.errors:
        raise SystemExit(f"{summary.errors} jobs failed on {backend} with {workers} worker(s)")
    return {"backend": backend, "workers": summary.workers, "jobs": summary.run, "seconds": summary.seconds,
            "jobs_per_minute": summary.jobs_per_minute}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--archs", default="lenet,resnet8")
    parser.add_argument("--losses", default="l2,cos")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--flavours", default="paper", help="exact,paper for the full proxies (much slower)")
    parser.add_argument("--paper-iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--backend", default="local", choices=("local", "ray"),
                        help="ray: also run the grid on a local Ray instance, beside the local pool")
    args = parser.parse_args()
    config = StudyConfig(name="bench", images=args.images, archs=tuple(args.archs.split(",")), weights="random",
                         losses=tuple(args.losses.split(",")), steps=args.steps, restarts=args.restarts,
                         flavours=tuple(args.flavours.split(",")),
                         solver=SolverConfig(paper_iterations=args.paper_iterations))
    workers = default_workers(args.threads)
    print(f"tiny study: {args.images} images x {args.archs} x {args.losses}, {args.steps} steps x "
          f"{args.restarts} restarts, proxies {args.flavours} (recipe budget {args.paper_iterations}); "
          f"{available_cores()} cores, {args.threads} thread(s) per worker")
    print()
    one = measure(config, 1, args.threads)
    rows = [one] if workers == 1 else [one, measure(config, workers, args.threads)]
    if args.backend == "ray":
        rows.append(measure(config, None, args.threads, "ray"))
    print("| backend | workers | jobs | seconds | jobs/min | vs 1 local worker |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['workers']} | {row['jobs']} | {row['seconds']:.1f} | "
              f"{row['jobs_per_minute']:.1f} | {row['jobs_per_minute'] / one['jobs_per_minute']:.2f}x |")
    if workers == 1:
        print("\n(the default is 1 local worker on this machine, so the pool has nothing to compare)")
    if args.backend == "ray":
        print("\n(ray: a local Ray instance started for the run, its start-up included; workers = tasks at once)")


if __name__ == "__main__":
    main()
