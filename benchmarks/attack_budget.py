"""How far an attack still moves with more steps: PSNR and SSIM against steps, with and without the
step decay, for a few images.

This is the evidence behind a bundled study's budget (steps, learning rate, schedule): a budget is
long enough when the reconstructions have stopped improving (or the table shows how far they still
move). Each (image, loss, schedule) run is one attack of ``--steps`` steps; the score of its best
candidate (lowest current matching loss) is read at every checkpoint. Results are appended to
``--out`` (JSON lines) as they finish, so an interrupted run resumes where it stopped.

    python benchmarks/attack_budget.py --arch lenet --weights random --images 0-7 --steps 4000 \
        --out benchmarks/results/budget-lenet-random.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lavp_core.attacks import AttackRun, preset_config  # noqa: E402
from lavp_core.fast_steps import ENGINES  # noqa: E402
from lavp_core.gradients import GradientOracle, client_update  # noqa: E402
from lavp_core.metrics import image_metrics  # noqa: E402
from lavp_core.scenario import ScenarioConfig, build_scenario  # noqa: E402


def parse_range(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(v) for v in text.split(",")]


def run_one(scenario, loss: str, schedule: str, args, checkpoints: list[int]) -> dict:
    oracle = GradientOracle(scenario.model)
    update = client_update(oracle, scenario.image, scenario.label)
    config = preset_config(args.preset, loss=loss, steps=args.steps, restarts=args.restarts, lr=args.lr,
                           schedule=schedule)
    every = int(np.gcd.reduce(checkpoints))
    run = AttackRun(oracle, update, config, scenario.info, generator=torch.Generator().manual_seed(args.seed),
                    snapshot_every=every, engine=args.engine)
    curve = []
    tic = time.perf_counter()
    for snapshot in run:
        if snapshot.step in checkpoints:
            scores = image_metrics(snapshot.image01[None], scenario.image01.cpu())
            curve.append({"step": snapshot.step, "psnr": scores["psnr"], "ssim": scores["ssim"],
                          "matching_loss": snapshot.matching_loss})
    return {"curve": curve, "seconds": time.perf_counter() - tic}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="lenet")
    p.add_argument("--weights", default="random")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the attack")
    p.add_argument("--images", default="0-7", help="photos validation indices: 0-7 or 1,4,9")
    p.add_argument("--losses", default="cos,l2")
    p.add_argument("--schedules", default="none,step")
    p.add_argument("--preset", default="lavp-paper")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--checkpoints", default="250,500,1000,2000,3000,4000")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="attack engine (compiled pays a one-off compile and then runs long budgets faster)")
    p.add_argument("--out", required=True, help="JSON-lines file; existing rows are kept and skipped")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = [c for c in parse_range(args.checkpoints) if c <= args.steps]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["image"], row["loss"], row["schedule"]))
    for index in parse_range(args.images):
        scenario = build_scenario(ScenarioConfig(dataset="photos", index=index, arch=args.arch,
                                                 weights=args.weights, seed=args.seed))
        for loss in args.losses.split(","):
            for schedule in args.schedules.split(","):
                if (index, loss, schedule) in done:
                    continue
                result = run_one(scenario, loss, schedule, args, checkpoints)
                row = {"image": index, "loss": loss, "schedule": schedule, "arch": args.arch,
                       "weights": args.weights, "seed": args.seed, "steps": args.steps,
                       "restarts": args.restarts, "lr": args.lr, "preset": args.preset, **result}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                last = result["curve"][-1]
                print(f"image {index:3d} {loss:4s} {schedule:4s}  PSNR {last['psnr']:6.2f}  SSIM {last['ssim']:.3f}  "
                      f"({result['seconds']:.0f} s)", flush=True)
    summarise(out)
    return 0


def summarise(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups: dict[tuple, list] = {}
    for row in rows:
        for point in row["curve"]:
            groups.setdefault((row["loss"], row["schedule"], point["step"]), []).append(point)
    print(f"\n{'loss':5s} {'sched':5s} {'step':>5s}  {'n':>3s}  {'PSNR med':>8s}  {'SSIM med':>8s}  SSIM>=0.5")
    for (loss, schedule, step), points in sorted(groups.items()):
        psnr = np.median([p["psnr"] for p in points])
        ssim = np.median([p["ssim"] for p in points])
        recovered = np.mean([p["ssim"] >= 0.5 for p in points])
        print(f"{loss:5s} {schedule:5s} {step:5d}  {len(points):3d}  {psnr:8.2f}  {ssim:8.3f}  {recovered:9.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
