"""Which torch thread count the command line should use: one attack and one proxy computation, timed
at 1 and 2 intra-op threads and at torch's default, on this machine idle and loaded.

Each measurement runs in a fresh Python process that applies its setting first (``torch.set_num_threads(N)``,
what ``lavp_core.system.choose_threads`` does for the CLI; "default" calls nothing and has
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` removed from its environment), builds the scenario (``photos``
index 0, ``lenet``, random weights, seed 0), warms up (a 2-step ``ig`` attack and a 2-iteration proxy
computation, untimed: imports and one-time set-up are not what the thread count changes), then times

* ``ig``: the ``ig`` preset (signed Adam, cosine matching, TV) for ``--ig-steps`` steps,
* ``dlg``: the ``dlg`` preset (L-BFGS, L2 matching) for ``--dlg-steps`` steps,
* ``proxies``: ``compute_proxies`` with the paper's recipe (``--method paper``) for l2 and cos with
  ``--paper-iterations`` power iterations per extreme,

and prints the seconds of each. "Loaded" rows run while this script keeps one busy-loop process
(``while True: pass``, nice 0) per available core; "idle" rows run without them, which is idle only as
far as the rest of the machine is (a background study or another user's work also counts: the load
average is printed). Repeats are interleaved: each repeat runs every setting, idle then loaded (or
loaded then idle, alternating), in an order rotated from one repeat to the next, so a change in the
machine's load spreads over all rows. The table gives min / median / max over the repeats and marks
the setting with the lowest median in each condition.

    python benchmarks/cli_threads.py [--repeats 3] [--settings 1,2,default] [--ig-steps 10] [--dlg-steps 1]
                                     [--paper-iterations 5]

The workloads are small on purpose: a longer attack only multiplies every row's seconds per step, and
most of a run's time is process start-up and the 2-thread rows under load. The default run is meant to
take a few minutes on a 2-core machine with nothing else running; on one shared with other users' jobs
(load average 5 to 9) it took 18.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKLOADS = ("ig", "dlg", "proxies")


def child(setting: str, ig_steps: int, dlg_steps: int, paper_iterations: int) -> None:
    """One measurement process: apply ``setting``, warm up, time every workload, print one JSON line."""
    import torch

    if setting != "default":
        torch.set_num_threads(int(setting))
    from lavp_core.hessian import SolverConfig
    from lavp_core.proxies import compute_proxies
    from lavp_core.runner import AttackRequest, run_preset
    from lavp_core.scenario import ScenarioConfig, build_scenario

    s = build_scenario(ScenarioConfig(dataset="photos", index=0, arch="lenet", weights="random", seed=0),
                       device=torch.device("cpu"))

    def attack(preset: str, steps: int) -> float:
        outcome = run_preset(s.model, s.image, s.label, s.info, AttackRequest(preset=preset, steps=steps),
                             generator=torch.Generator().manual_seed(0))
        return outcome.matching_loss

    def proxies(iterations: int) -> float:
        result = compute_proxies(s.model, s.image, s.label, losses=("l2", "cos"), method="paper",
                                 config=SolverConfig(paper_iterations=iterations))
        return result["l2_max"]

    attack("ig", 2)  # warm-up: lazy imports, dispatch caches, allocator
    proxies(2)
    seconds, values = {}, {}
    for name, work in (("ig", lambda: attack("ig", ig_steps)), ("dlg", lambda: attack("dlg", dlg_steps)),
                       ("proxies", lambda: proxies(paper_iterations))):
        tic = time.perf_counter()
        values[name] = work()
        seconds[name] = time.perf_counter() - tic
    print(json.dumps({"setting": setting, "threads": torch.get_num_threads(), "seconds": seconds,
                      "values": values}))


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def measure_once(setting: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", setting, "--ig-steps", str(args.ig_steps),
           "--dlg-steps", str(args.dlg_steps), "--paper-iterations", str(args.paper_iterations)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"measurement with setting {setting} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class BusyLoops:
    """One ``while True: pass`` process per core while the ``with`` block runs."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(0.5)  # let them reach the scheduler's steady state
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []


def _stats(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="1,2,default",
                        help="comma-separated thread counts and/or 'default' (torch's own choice)")
    parser.add_argument("--ig-steps", type=int, default=10)
    parser.add_argument("--dlg-steps", type=int, default=1)
    parser.add_argument("--paper-iterations", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.ig_steps, args.dlg_steps, args.paper_iterations)
        return

    from lavp_core.system import available_cores

    cores = available_cores()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    conditions = ("idle", "loaded")
    times = {(w, s, c): [] for w in WORKLOADS for s in settings for c in conditions}
    values: dict[tuple[str, str], set] = {}
    used: dict[str, int] = {}
    load_before = os.getloadavg()
    began = time.perf_counter()
    for rep in range(args.repeats):
        order = settings[rep % len(settings):] + settings[:rep % len(settings)]
        for condition in (conditions if rep % 2 == 0 else conditions[::-1]):
            if condition == "loaded":
                with BusyLoops(cores):
                    results = [measure_once(s, args) for s in order]
            else:
                results = [measure_once(s, args) for s in order]
            for r in results:
                print(f"  {condition:6} {r['setting']:>7} ({r['threads']} threads): "
                      + "  ".join(f"{w} {r['seconds'][w]:.2f} s" for w in WORKLOADS), file=sys.stderr, flush=True)
                used[r["setting"]] = r["threads"]
                for w in WORKLOADS:
                    times[(w, r["setting"], condition)].append(r["seconds"][w])
                    values.setdefault((w, r["setting"]), set()).add(round(r["values"][w], 5))
            print(f"repeat {rep + 1}/{args.repeats} {condition} done ({time.perf_counter() - began:.0f} s)",
                  file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    def label(setting: str) -> str:
        return f"default (= {used[setting]})" if setting == "default" else f"torch.set_num_threads({setting})"

    work = {"ig": f"ig, {args.ig_steps} steps", "dlg": f"dlg, {args.dlg_steps} step(s)",
            "proxies": f"proxies, paper recipe, l2+cos, {args.paper_iterations} iterations"}
    print(f"\nlenet, random weights, photos #0; {cores} available cores; {args.repeats} interleaved repeats; "
          f"seconds of the computation (min / median / max), each in a fresh process\n")
    print("| workload | setting | idle s | loaded s | fastest |")
    print("|---|---|---|---|---|")
    for w in WORKLOADS:
        best = {c: min(settings, key=lambda s, c=c: statistics.median(times[(w, s, c)])) for c in conditions}
        for s in settings:
            fastest = ", ".join(c for c in conditions if best[c] == s) or ""
            print(f"| {work[w]} | {label(s)} | {_stats(times[(w, s, 'idle')])} | "
                  f"{_stats(times[(w, s, 'loaded')])} | {fastest} |")
    print()
    for w in WORKLOADS:
        for c in conditions:
            ranked = sorted(settings, key=lambda s, c=c: statistics.median(times[(w, s, c)]))
            if len(ranked) > 1:
                a, b = (statistics.median(times[(w, s, c)]) for s in ranked[:2])
                print(f"{w:8} {c:6}: fastest {label(ranked[0])}, {b / a:.2f}x faster than the next "
                      f"({label(ranked[1])})")
    same = all(len({v for s in settings for v in values[(w, s)]}) == 1 for w in WORKLOADS)
    print(f"\nresults (matching loss, l2 λ_max) identical to 5 decimals across settings: {same}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; 'idle' is this "
          f"script's own busy loops off, not a quiet machine when the load average is above 0 (another "
          f"process, e.g. a background study at nice 19, may hold a core). Total {time.perf_counter() - began:.0f} s.")


if __name__ == "__main__":
    main()
