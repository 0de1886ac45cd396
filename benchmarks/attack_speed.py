"""Attack step speed: the engine against a plain-autograd reference, side by side in one run.

The reference is what the public tools (breaching, inversefed) do: the model's parameters require
gradients, each step calls ``torch.autograd.grad(CE, params, create_graph=True)``, matches the
gradient layer by layer, backpropagates to the candidate, and ``torch.optim.Adam`` moves it; one
candidate at a time, so R restarts are R runs one after another. The engine runs the same
Inverting-Gradients configuration (cosine, signed Adam lr 0.1, boxed, TV 1e-4, step decay) from the
same starting candidates on the same model, with each of its step engines (``eager``: torch.func +
torch.optim, the engine before fused steps; ``traced``: the default for long runs; ``compiled``:
``torch.compile``), R = 1 and R = 3 batched against three sequential reference runs.

For each (architecture, torch threads) it prints candidate-steps per second of every variant (best
of the repeats, variants interleaved within each repeat so that a change of load hits all alike),
the speed ratio to the reference per repeat (min / median / max), the one-off costs (trace; compile
with an empty and with a warm on-disk cache, each in a fresh process) and the break-even in steps:
how many steps a run needs before the one-off cost is repaid against the eager engine.

    python benchmarks/attack_speed.py [--steps 100] [--repeats 5] [--threads 1,2] [--archs lenet,resnet8]
                                      [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lavp_core.attacks import AttackRun, preset_config  # noqa: E402
from lavp_core.fast_steps import clear_programs, total_variation  # noqa: E402
from lavp_core.gradients import GradientOracle, client_update  # noqa: E402
from lavp_core.scenario import ScenarioConfig, build_scenario  # noqa: E402

PRESET = "ig"


class Reference:
    """Plain-autograd Inverting Gradients, one candidate at a time (the peers' way)."""

    def __init__(self, model: torch.nn.Module, update, info, config):
        self.model = copy.deepcopy(model).eval()
        self.params = [p.requires_grad_(True) for p in self.model.parameters()]
        sizes = [p.numel() for p in self.params]
        self.target = [t.view_as(p) for t, p in zip(update.gradient.split(sizes), self.params)]
        self.target_norm = torch.sqrt(sum((t * t).sum() for t in self.target))
        self.label = torch.tensor([update.label])
        self.lo, self.hi = info.bounds("cpu", torch.float32)
        self.config = config

    def run(self, x0: torch.Tensor) -> torch.Tensor:  # x0 (C, H, W)
        c = self.config
        x = x0.detach().clone().unsqueeze(0).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=c.lr)
        milestones = sorted({max(1, int(c.steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        for _ in range(c.steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(self.model(x), self.label)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((g * t).sum() for g, t in zip(grads, self.target))
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            objective = 1 - dot / (norm * self.target_norm) + c.tv_weight * total_variation(x)
            x.grad, = torch.autograd.grad(objective, x)
            x.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, self.hi), self.lo))
        return x.detach()[0]


def _engine(oracle, update, info, config, x0, engine):
    run = AttackRun(oracle, update, config, info, generator=torch.Generator().manual_seed(0),
                    snapshot_every=config.steps, initial=x0, engine=engine)
    for _ in run:
        pass
    return run.result


def _timed(fn):
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def measure(arch: str, steps: int, repeats: int, engines: list[str]) -> dict:
    scenario = build_scenario(ScenarioConfig(dataset="photos", index=3, arch=arch))
    oracle = GradientOracle(scenario.model)
    update = client_update(oracle, scenario.image, scenario.label)
    info = scenario.info
    one = preset_config(PRESET, steps=steps, restarts=1)
    three = preset_config(PRESET, steps=steps, restarts=3)
    reference = Reference(scenario.model, update, info, one)
    starts = torch.randn((3, *update.image_shape), generator=torch.Generator().manual_seed(7))
    # one-off costs, then warm-ups (so the timed runs below reuse each engine's graph)
    one_off = {}
    for engine in engines:
        if engine != "traced":  # the compiled engine's one-off cost is measured in fresh processes
            continue
        clear_programs()
        tic = time.perf_counter()
        _engine(oracle, update, info, preset_config(PRESET, steps=1, restarts=1), starts[:1], engine)
        _engine(oracle, update, info, preset_config(PRESET, steps=1, restarts=3), starts, engine)
        one_off[engine] = time.perf_counter() - tic
    for engine in engines:
        _engine(oracle, update, info, preset_config(PRESET, steps=2, restarts=1), starts[:1], engine)
        _engine(oracle, update, info, preset_config(PRESET, steps=2, restarts=3), starts, engine)
    reference.run(starts[0][:, :, :])
    seconds: dict[str, list[float]] = {"reference R=1": [], "reference R=3 sequential": []}
    for engine in engines:
        seconds[f"{engine} R=1"], seconds[f"{engine} R=3 batched"] = [], []
    same = {}
    for _ in range(repeats):
        t, ref_x = _timed(lambda: reference.run(starts[0]))
        seconds["reference R=1"].append(t)
        t, _ = _timed(lambda: [reference.run(starts[r]) for r in range(3)])
        seconds["reference R=3 sequential"].append(t)
        for engine in engines:
            t, result = _timed(lambda e=engine: _engine(oracle, update, info, one, starts[:1], e))
            seconds[f"{engine} R=1"].append(t)
            same[engine] = float((info.denormalize(result.reconstruction[0]) - info.denormalize(ref_x)).abs().max())
            t, _ = _timed(lambda e=engine: _engine(oracle, update, info, three, starts, e))
            seconds[f"{engine} R=3 batched"].append(t)
    return {"seconds": seconds, "one_off": one_off, "same": same}


def compile_costs(arch: str, threads: int) -> dict:
    """Seconds of 1-step traced and compiled attacks (R = 1 and R = 3) in a fresh process with an
    empty Inductor cache (``cold``), then in another fresh process with the cache the first one left
    (``warm``). The cache is this run's (``TORCHINDUCTOR_CACHE_DIR``), which this process uses too."""
    costs = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for label in ("cold", "warm"):
        out = subprocess.run([sys.executable, __file__, "--one-off", arch, "--threads", str(threads)],
                             env=env, capture_output=True, text=True, check=True)
        costs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    return costs


def _one_off(arch: str) -> None:
    scenario = build_scenario(ScenarioConfig(dataset="photos", index=3, arch=arch))
    oracle = GradientOracle(scenario.model)
    update = client_update(oracle, scenario.image, scenario.label)
    starts = torch.randn((3, *update.image_shape), generator=torch.Generator().manual_seed(7))
    out = {}
    for engine in ("traced", "compiled"):
        clear_programs()
        tic = time.perf_counter()
        for r in (1, 3):
            _engine(oracle, update, scenario.info, preset_config(PRESET, steps=1, restarts=r), starts[:r], engine)
        out[engine] = time.perf_counter() - tic
    print(json.dumps(out))


def _spread(values: list[float]) -> str:
    values = sorted(values)
    return f"{values[0]:.2f} / {statistics.median(values):.2f} / {values[-1]:.2f}"


def report(arch: str, threads: int, steps: int, r: dict, compile_cost: dict | None) -> None:
    s = r["seconds"]
    ref1, ref3 = s["reference R=1"], s["reference R=3 sequential"]
    print(f"\n### {arch}, {threads} torch thread(s), {steps} steps, {len(ref1)} interleaved repeats\n")
    print("| variant | candidate-steps/s (best) | speed / reference, per repeat (min / median / max) "
          "| one-off cost s | break-even vs eager, steps |")
    print("|---|---|---|---|---|")
    print(f"| reference R=1 (plain autograd) | {steps / min(ref1):.1f} | 1 | 0 | |")
    print(f"| reference R=3 (3 sequential runs) | {3 * steps / min(ref3):.1f} | 1 | 0 | |")
    eager1 = min(s.get("eager R=1", ref1)) / steps
    eager3 = min(s.get("eager R=3 batched", ref3)) / steps
    for name, times in s.items():
        if name.startswith("reference"):
            continue
        engine, restarts = name.split(" ")[0], 3 if "R=3" in name else 1
        base = ref3 if restarts == 3 else ref1
        ratios = [b / t for b, t in zip(base, times)]
        cost, even = "0", ""
        if engine != "eager":
            if engine == "compiled" and compile_cost is None:
                cost, even = "see the first thread count", ""
                print(f"| {name} | {restarts * steps / min(times):.1f} | {_spread(ratios)} | {cost} | {even} |")
                continue
            if engine == "compiled":
                cold = compile_cost["cold"]["compiled"] - compile_cost["cold"]["traced"]
                warm = compile_cost["warm"]["compiled"] - compile_cost["warm"]["traced"]
                one_off = {"cold": cold + compile_cost["cold"]["traced"], "warm": warm + compile_cost["warm"]["traced"]}
                cost = f"{one_off['cold']:.1f} cold / {one_off['warm']:.1f} warm cache"
            else:
                one_off = {"": r["one_off"].get(engine, 0.0)}
                cost = f"{one_off['']:.1f}"
            saved = (eager3 if restarts == 3 else eager1) - min(times) / steps
            if saved > 0:
                even = " / ".join(f"{v / saved:.0f}" for v in one_off.values())
            else:
                even = "never"
        print(f"| {name} | {restarts * steps / min(times):.1f} | {_spread(ratios)} | {cost} | {even} |")
    print("\nlargest pixel difference (in [0, 1]) between each engine's R=1 reconstruction and the "
          "reference's: " + ", ".join(f"{k} {v:.1e}" for k, v in r["same"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--archs", default="lenet,resnet8")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled engine (slow first use)")
    parser.add_argument("--one-off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_off:
        torch.set_num_threads(int(args.threads))
        _one_off(args.one_off)
        return
    engines = ["eager", "traced"] + ([] if args.no_compile else ["compiled"])
    cache = tempfile.TemporaryDirectory(prefix="lavp-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # cold for the first subprocess, then warm
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, preset {PRESET} (cosine, signed Adam lr 0.1, "
          f"boxed, TV 1e-4, step decay), photos image 3, random weights")
    thread_counts = [int(t) for t in args.threads.split(",")]
    first = thread_counts[0]  # compile costs hardly depend on threads: measured once, at the first count
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for arch in args.archs.split(","):
            costs = None if args.no_compile or threads != first else compile_costs(arch, threads)
            r = measure(arch, args.steps, args.repeats, engines)
            report(arch, threads, args.steps, r, costs)


if __name__ == "__main__":
    main()
