"""Throughput of the optimisation engine: batched restarts against restarts run one after another.

Prints steps per second of the ``ig`` preset on ``lenet`` and ``resnet8`` (random weights, 32x32
``photos`` image) for R = 1, for R = 3 batched into one vmapped optimisation, and for R = 3 run as
three separate R = 1 attacks, plus the ratio batched / sequential: from the best time of each
variant over the repeats, and per repeat (the batched run and the three sequential runs of one
repeat run back to back, so a change in the machine's load between repeats does not enter it).
"Steps" counts candidate-steps (R candidates advanced by one step = R steps), so the numbers compare
work done per second.

    python benchmarks/attack_speed.py [--steps 60] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lavp_core.attacks import AttackRun, preset_config  # noqa: E402
from lavp_core.gradients import GradientOracle, client_update  # noqa: E402
from lavp_core.scenario import ScenarioConfig, build_scenario  # noqa: E402


def _time_attack(oracle, update, info, steps: int, restarts: int, seed: int) -> float:
    config = preset_config("ig", steps=steps, restarts=restarts)
    run = AttackRun(oracle, update, config, info, generator=torch.Generator().manual_seed(seed),
                    snapshot_every=steps)
    tic = time.perf_counter()
    for _ in run:
        pass
    return time.perf_counter() - tic


def measure(arch: str, steps: int, repeats: int) -> dict:
    scenario = build_scenario(ScenarioConfig(dataset="photos", index=3, arch=arch))
    oracle = GradientOracle(scenario.model)
    update = client_update(oracle, scenario.image, scenario.label)
    _time_attack(oracle, update, scenario.info, 3, 3, 0)  # warm-up (allocations, dispatch caches)
    best = {"R=1": float("inf"), "R=3 batched": float("inf"), "R=3 sequential": float("inf")}
    paired = []  # batched / sequential within one repeat: the two ran back to back, under the same load
    for rep in range(repeats):  # interleaved, best of `repeats`, so drift hits every variant alike
        best["R=1"] = min(best["R=1"], _time_attack(oracle, update, scenario.info, steps, 1, rep))
        batched = _time_attack(oracle, update, scenario.info, steps, 3, rep)
        seq = sum(_time_attack(oracle, update, scenario.info, steps, 1, 10 * rep + r) for r in range(3))
        best["R=3 batched"] = min(best["R=3 batched"], batched)
        best["R=3 sequential"] = min(best["R=3 sequential"], seq)
        paired.append(seq / batched)
    return {
        "R=1": steps / best["R=1"],
        "R=3 batched": 3 * steps / best["R=3 batched"],
        "R=3 sequential": 3 * steps / best["R=3 sequential"],
        "paired": sorted(paired),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", default="lenet,resnet8")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: PyTorch's own choice, one per core)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ig preset, {args.steps} steps, "
          f"best of {args.repeats}")
    print()
    print("| arch | R=1 steps/s | R=3 batched steps/s | R=3 sequential steps/s | batched / sequential "
          "| same, per repeat (min / median / max) |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        r = measure(arch, args.steps, args.repeats)
        paired = r["paired"]
        print(f"| {arch} | {r['R=1']:.1f} | {r['R=3 batched']:.1f} | {r['R=3 sequential']:.1f} | "
              f"{r['R=3 batched'] / r['R=3 sequential']:.2f}x | {paired[0]:.2f} / "
              f"{statistics.median(paired):.2f} / {paired[-1]:.2f} |")


if __name__ == "__main__":
    main()
