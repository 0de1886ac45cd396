"""Study throughput: jobs per minute of the bundled studies' job configuration, today's code path
against the working tree's, in one run.

Default mode (``compare``): each side runs ``python -m lavp_core study`` in its own subprocess (the same
Python, ``sys.executable``) with the bundled studies' settings (``--preset lavp-paper``, random
weights, seed 0, losses l2,cos, flavours exact,paper, restarts 3; ``--steps`` reduced to 300 so that a
run takes minutes), 1 worker with 1 torch thread and single-threaded BLAS, into a fresh temporary
database. "Today's code path" is ``--baseline`` (default bd1b7ea, the state before issue 17's work),
checked out into a temporary ``git worktree`` that is removed at the end; "new" is this working tree.
The runs are interleaved (baseline, new, baseline, new, ...) per architecture, ``--repeats`` times, so
that a change in the machine's load hits both sides alike; the spread over repeats is printed.
Printed: jobs per minute of each side (the study's own count, worker start-up included, as in a real
run) and their ratio; per part, the seconds the databases store for each job (``attack_seconds``) and
for each (image, model)'s proxies (``proxy_exact_seconds``, ``proxy_paper_seconds``, computed once and
shared by the l2 and cos jobs); jobs per minute estimated at the bundled studies' 3000 steps
(``--scale-steps``: each run's attack seconds scaled, the rest as measured); and how far the new side's
proxy values are from the baseline's.

    python benchmarks/study_throughput.py [--images lenet:0,1/resnet8:0] [--steps 300] [--repeats 2]
        [--baseline bd1b7ea] [--study-args="..."] [--new-args=--compile]

``--study-args`` is appended to both sides' study command, ``--new-args`` to the new side's only (for
options today's code does not have, e.g. ``--new-args=--compile``; write them with ``=``, as they begin with
``--``).

Mode ``workers`` (the former benchmark; implied by ``--backend ray``): the working tree's study, in this
process, with 1 worker and with the default worker count (cores // threads), and with ``--backend ray``
also on a local Ray instance started for the run:

    python benchmarks/study_throughput.py --mode workers [--images 4] [--steps 20] [--backend ray]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_BASELINE = "bd1b7ea"
DEFAULT_IMAGES = {"compare": "lenet:0,1/resnet8:0", "workers": "4"}
DEFAULT_STEPS = {"compare": 300, "workers": 20}
DEFAULT_FLAVOURS = {"compare": "exact,paper", "workers": "paper"}
DEFAULT_PAPER_ITERATIONS = {"compare": None, "workers": 20}  # None: the study's own default (100)


# ---- mode "compare": baseline revision against the working tree -------------------------------------

def parse_images(text: str, archs: list[str]) -> dict[str, str]:
    """``0,1`` (every architecture) or ``lenet:0,1/resnet8:0`` (per architecture) -> arch -> indices."""
    if ":" not in text:
        return {arch: text for arch in archs}
    out = {}
    for part in text.replace(";", "/").split("/"):
        if part.strip():
            arch, _, indices = part.partition(":")
            out[arch.strip()] = indices.strip()
    missing = [arch for arch in archs if arch not in out]
    if missing:
        raise SystemExit(f"--images names no images for {', '.join(missing)}")
    return {arch: out[arch] for arch in archs}


def study_command(args, arch: str, images: str, db: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "lavp_core", "study", "--db", str(db), "--name", "bench",
               "--dataset", "photos", "--archs", arch, "--weights", "random", "--seed", "0",
               "--losses", args.losses, "--images", images if "," in images else images + ",",
               "--preset", "lavp-paper", "--steps", str(args.steps), "--restarts", str(args.restarts),
               "--flavours", args.flavours, "--workers", str(args.workers), "--threads", str(args.threads),
               "--no-progress", "--json"]
    if args.paper_iterations is not None:
        command += ["--paper-iterations", str(args.paper_iterations)]
    return command + shlex.split(args.study_args) + extra


def run_side(tree: Path, command: list[str], blas_threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(blas_threads)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"study failed in {tree} (exit {done.returncode}):\n{' '.join(command)}\n"
                         f"{done.stderr[-3000:]}")
    start = done.stdout.find("{")
    summary = json.loads(done.stdout[start:])
    if summary.get("errors"):
        raise SystemExit(f"{summary['errors']} job(s) failed in {tree}; see {command[command.index('--db') + 1]}")
    return {"summary": summary, "wall": wall}


def read_database(db: Path) -> dict:
    """Per-part seconds and proxy values of one study database."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        jobs = conn.execute("SELECT job_key, image_index, loss, attack_seconds, proxy_exact_seconds, "
                            "proxy_paper_seconds, proxies_from FROM jobs WHERE status = 'done'").fetchall()
        proxies = conn.execute("SELECT j.image_index, j.loss, p.proxy, p.flavour, p.value, p.converged "
                               "FROM proxies p JOIN jobs j ON j.job_key = p.job_key").fetchall()
    own = [row for row in jobs if row[6] is None]  # the jobs that computed their (image, model)'s proxies
    return {"jobs": len(jobs),
            "attack": [row[3] for row in jobs if row[3] is not None],
            "exact": [row[4] for row in own if row[4] is not None],
            "paper": [row[5] for row in own if row[5] is not None],
            "values": {(image, loss, proxy, flavour): (value, bool(converged))
                       for image, loss, proxy, flavour, value, converged in proxies}}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def compare_values(base: dict, new: dict) -> tuple[float, float, int, int]:
    """(max relative gap of exact values, of paper values, converged flags that differ, values compared)."""
    gaps = {"exact": 0.0, "paper": 0.0}
    flags = compared = 0
    for key, (value, converged) in base.items():
        if key not in new:
            continue
        other, other_converged = new[key]
        compared += 1
        flags += converged != other_converged
        if value is None or other is None or not (math.isfinite(value) and math.isfinite(other)):
            continue
        gap = abs(other - value) / abs(value) if value != 0 else abs(other)
        gaps[key[3]] = max(gaps[key[3]], gap)
    return gaps["exact"], gaps["paper"], flags, compared


def compare_mode(args) -> None:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    images = parse_images(args.images, archs)
    extra_new = shlex.split(args.new_args)
    with tempfile.TemporaryDirectory(prefix="lavp-throughput-") as folder:
        base_tree = Path(folder) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.baseline],
                       check=True, capture_output=True)
        try:
            sides = {"baseline": base_tree, "new": ROOT}
            print(f"bundled-study jobs (preset lavp-paper, random weights, losses {args.losses}, {args.steps} steps "
                  f"x {args.restarts} restarts, proxies {args.flavours}), {args.workers} worker x {args.threads} "
                  f"thread, BLAS threads {args.blas_threads}; baseline = {args.baseline}, new = working tree"
                  + (f" + {args.new_args}" if args.new_args else ""))
            print("images: " + "; ".join(f"{arch} {images[arch]}" for arch in archs) + f"; {args.repeats} repeat(s), "
                  "interleaved baseline/new\n", flush=True)
            runs: dict[tuple[str, str], list[dict]] = {(arch, side): [] for arch in archs for side in sides}
            for repeat in range(args.repeats):
                for arch in archs:
                    for side, tree in sides.items():
                        db = Path(folder) / f"{side}-{arch}-{repeat}.sqlite"
                        command = study_command(args, arch, images[arch], db, extra_new if side == "new" else [])
                        result = run_side(tree, command, args.blas_threads)
                        result.update(read_database(db))
                        runs[arch, side].append(result)
                        print(f"  repeat {repeat + 1} {arch:8s} {side:8s} {result['summary']['run']} jobs in "
                              f"{result['summary']['seconds']:.1f} s = {result['summary']['jobs_per_minute']:.2f} "
                              f"jobs/min", flush=True)
            report(archs, runs, args.steps, args.scale_steps)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)


def report(archs: list[str], runs: dict, steps: int, scale_steps: int) -> None:
    print("\n| arch | side | jobs/run | jobs/min, median [min–max] | new / baseline | attack s/job | "
          "exact proxies s/image | recipe proxies s/image |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"baseline": [0, 0.0], "new": [0, 0.0]}
    for arch in archs:
        rates = {}
        for side in ("baseline", "new"):
            results = runs[arch, side]
            rates[side] = [r["summary"]["jobs_per_minute"] for r in results]
            for r in results:
                totals[side][0] += r["summary"]["run"]
                totals[side][1] += r["summary"]["seconds"]
            ratio = ""
            if side == "new":
                pairs = [n / b for n, b in zip(rates["new"], rates["baseline"], strict=True) if b > 0]
                ratio = f"{statistics.median(pairs):.2f}x" + (f" [{min(pairs):.2f}–{max(pairs):.2f}]"
                                                              if len(pairs) > 1 else "")
            attack = [statistics.mean(r["attack"]) for r in results if r["attack"]]
            exact = [statistics.mean(r["exact"]) for r in results if r["exact"]]
            paper = [statistics.mean(r["paper"]) for r in results if r["paper"]]
            print(f"| {arch} | {side} | {results[0]['summary']['run']} | {spread(rates[side])} | {ratio} | "
                  f"{spread(attack)} | {spread(exact)} | {spread(paper)} |")
    base_rate = 60 * totals["baseline"][0] / totals["baseline"][1]
    new_rate = 60 * totals["new"][0] / totals["new"][1]
    print(f"\nall runs together: baseline {base_rate:.2f} jobs/min, new {new_rate:.2f} jobs/min: "
          f"{new_rate / base_rate:.2f}x")
    if scale_steps and scale_steps != steps:
        print(f"\nestimated at --steps {scale_steps} (each run's attack seconds x {scale_steps}/{steps}, everything "
              f"else as measured; a fixed per-attack cost such as compiling is scaled too, so this understates a "
              f"side that has one):")
        for arch in archs:
            rates = {}
            for side in ("baseline", "new"):
                rates[side] = []
                for r in runs[arch, side]:
                    attack = sum(r["attack"])
                    seconds = r["summary"]["seconds"] + attack * (scale_steps / steps - 1)
                    rates[side].append(60 * r["summary"]["run"] / seconds)
            ratio = statistics.median([n / b for n, b in zip(rates["new"], rates["baseline"], strict=True)])
            print(f"  {arch}: baseline {spread(rates['baseline'])} jobs/min, new {spread(rates['new'])} jobs/min: "
                  f"{ratio:.2f}x")
    print("\nproxy values, new against baseline (same image, model, loss, proxy and flavour):")
    for arch in archs:
        exact_gap, paper_gap, flags, compared = compare_values(runs[arch, "baseline"][0]["values"],
                                                               runs[arch, "new"][0]["values"])
        print(f"  {arch}: {compared} values; largest relative gap exact {exact_gap:.1e}, recipe {paper_gap:.1e}; "
              f"converged flags that differ: {flags}")


# ---- mode "workers": the working tree's study with 1 worker, the default count, and Ray -------------

def measure(config, workers: int | None, threads: int, backend: str = "local") -> dict:
    from lavp_core.study import plan_study, run_study

    plan = plan_study(config)
    with tempfile.TemporaryDirectory() as folder:
        summary = run_study(plan, Path(folder) / "bench.sqlite", workers=workers, threads=threads, progress=False,
                            executor=backend)
    if summary.errors:
        raise SystemExit(f"{summary.errors} jobs failed on {backend} with {workers} worker(s)")
    return {"backend": backend, "workers": summary.workers, "jobs": summary.run, "seconds": summary.seconds,
            "jobs_per_minute": summary.jobs_per_minute}


def workers_mode(args) -> None:
    from lavp_core.hessian import SolverConfig
    from lavp_core.study import StudyConfig, default_workers
    from lavp_core.study import parse_images as study_images
    from lavp_core.system import available_cores

    solver = SolverConfig() if args.paper_iterations is None else SolverConfig(paper_iterations=args.paper_iterations)
    config = StudyConfig(name="bench", images=study_images(args.images), archs=tuple(args.archs.split(",")),
                         weights="random", losses=tuple(args.losses.split(",")), steps=args.steps,
                         restarts=args.restarts, flavours=tuple(args.flavours.split(",")), solver=solver)
    workers = default_workers(args.threads)
    print(f"tiny study: images {args.images} x {args.archs} x {args.losses}, {args.steps} steps x "
          f"{args.restarts} restarts, proxies {args.flavours} (recipe budget {solver.paper_iterations}); "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("compare", "workers"), default=None,
                        help="compare (default): baseline revision against the working tree; workers: the working "
                             "tree with 1 worker, the default worker count and (--backend ray) Ray")
    parser.add_argument("--images", default=None,
                        help="compare: indices for every arch (0,1) or per arch (default lenet:0,1/resnet8:0); "
                             "workers: a count or indices (default 4)")
    parser.add_argument("--archs", default="lenet,resnet8")
    parser.add_argument("--losses", default="l2,cos")
    parser.add_argument("--steps", type=int, default=None, help="attack steps (compare 300, workers 20)")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--flavours", default=None, help="proxy flavours (compare exact,paper; workers paper)")
    parser.add_argument("--paper-iterations", type=int, default=None,
                        help="recipe budget (compare: the study's default 100; workers: 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="compare: the study's --workers (default 1)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="compare: OMP/OpenBLAS/MKL threads of each side (default 1: single-threaded)")
    parser.add_argument("--repeats", type=int, default=2, help="compare: interleaved runs of each side")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="compare: git revision of today's code path")
    parser.add_argument("--study-args", default="", help="compare: extra study options for both sides")
    parser.add_argument("--new-args", default="", help="compare: extra study options for the new side only")
    parser.add_argument("--scale-steps", type=int, default=3000,
                        help="compare: also estimate jobs/min at this many attack steps (the bundled studies' "
                             "3000; 0: no estimate)")
    parser.add_argument("--backend", default="local", choices=("local", "ray"),
                        help="workers mode: ray also runs the grid on a local Ray instance (implies --mode workers)")
    args = parser.parse_args()
    mode = args.mode or ("workers" if args.backend == "ray" else "compare")
    if mode == "compare" and args.backend != "local":
        raise SystemExit("--backend ray belongs to --mode workers")
    args.images = args.images or DEFAULT_IMAGES[mode]
    args.steps = args.steps if args.steps is not None else DEFAULT_STEPS[mode]
    args.flavours = args.flavours or DEFAULT_FLAVOURS[mode]
    if args.paper_iterations is None:
        args.paper_iterations = DEFAULT_PAPER_ITERATIONS[mode]
    if mode == "compare":
        compare_mode(args)
    else:
        workers_mode(args)


if __name__ == "__main__":
    main()
