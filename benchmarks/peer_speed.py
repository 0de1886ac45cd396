"""The engine beside breaching: the same Inverting-Gradients attack, timed and compared side by side.

``breaching`` (PyPI ``breaching``, Geiping et al.'s framework) is *not* a dependency of LAVP
Explorer: it runs in a separate virtual environment (``--peer-python``, default
``/work/peer-venv/bin/python``), in a worker process (``benchmarks/_peer_breaching.py``) that
imports breaching and torch once and serves every run. Create that environment with

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1   # the project's pins
    /work/peer-venv/bin/pip install breaching                           # 0.1.2: hydra-core, lpips, scipy

For each architecture (``lenet``, ``resnet8``; random weights, ``photos`` image 3, known label) this
script saves the module's state dict, the client's gradient g*, the label and one starting candidate
(``randn``, seed ``--seed``, in normalised space) to a temporary folder; the worker rebuilds the
same module with ``lavp_core.models.create_model`` and loads that state dict. Then, interleaved over
``--repeats`` (each repeat: the engine, then breaching, back to back, so a change of machine load
between repeats hits both), it times

* the engine: ``AttackRun(oracle, update, preset_config("ig", steps=S, restarts=1), info,
  initial=<the candidate>)``, the whole iteration (its own preparation included), after one untimed
  run of the same length;
* breaching's ``invertinggradients`` attack with the same settings (cosine similarity, Adam lr 0.1 on
  the sign of the gradient, boxed, step-lr decay, TV 1e-4, one trial, ``initial_data`` = the same
  candidate, eval-mode batch norm from the model's buffers): its optimisation loop only, after an
  untimed 10-step run; its setup (model copies, final scoring pass) is reported apart;

both on one torch thread. Printed: steps per second of each (best of the repeats), the ratio
engine / breaching per repeat (min / median / max), and the PSNR against the true image of the
engine's result, of breaching's returned candidate (the one after the step whose objective was
lowest) and of breaching's last iterate, plus the PSNR between the engine's and breaching's last
iterates. Unless ``--no-aligned``, one more breaching run per architecture swaps in the engine's
TV definition and learning-rate milestones (the two places where breaching's ``invertinggradients``
differs; see ``_peer_breaching.py``) and reports how close its last iterate comes to the engine's,
as timed and with ``engine="eager"`` (``torch.optim.Adam``, as breaching uses). The signed step makes
the two trajectories equal bit for bit as long as every gradient component has the same sign in
both; round-off of a different evaluation order can flip the sign of a near-zero component, and the
trajectories then part, by an amount that grows with the steps.

The original ``inversefed`` code (the Inverting Gradients paper's repository) is not on PyPI, so it
is not compared here.

If the peer interpreter or breaching is missing or fails, the script says why in one line and times
the engine alone (exit code 0).

    python benchmarks/peer_speed.py [--steps 200] [--repeats 3] [--archs lenet,resnet8]
        [--peer-python /work/peer-venv/bin/python] [--no-aligned]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from lavp_core.attacks import AttackRun, preset_config  # noqa: E402
from lavp_core.gradients import GradientOracle, client_update  # noqa: E402
from lavp_core.metrics import psnr  # noqa: E402
from lavp_core.scenario import ScenarioConfig, build_scenario  # noqa: E402

DEFAULT_PEER = "/work/peer-venv/bin/python"
WORKER = HERE / "_peer_breaching.py"
HOW_TO = ("create it with: python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install torch==2.14.1 "
          "torchvision==0.29.1 && /work/peer-venv/bin/pip install breaching")


class PeerUnavailable(RuntimeError):
    """The peer interpreter, breaching or one of its runs is not usable; the message says why."""


class Peer:
    """The breaching worker: one process under the peer interpreter, one JSON line per job."""

    def __init__(self, python: str, threads: int):
        if not Path(python).exists():
            raise PeerUnavailable(f"no peer interpreter at {python}: {HOW_TO}")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONWARNINGS="ignore")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(WORKER), "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.hello = self._read(first=True)

    def _read(self, first: bool = False) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = " | ".join(self.stderr.read().strip().splitlines()[-3:])
            raise PeerUnavailable(f"the breaching worker under {self.proc.args[0]} exited "
                                  f"(code {self.proc.returncode}) without answering: {tail or 'no output'}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise PeerUnavailable(f"{answer.get('reason')} ({HOW_TO})" if first else str(answer.get("reason")))
        return answer

    def run(self, **job) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


def engine_milestones(steps: int) -> list[int]:
    """The ``step`` schedule's milestones as ``AttackConfig`` documents them: 3/8, 5/8 and 7/8 of the steps."""
    return sorted({max(1, int(steps * f)) for f in (3 / 8, 5 / 8, 7 / 8)})


def run_engine(oracle, update, info, steps: int, initial: torch.Tensor,
               engine: str = "auto") -> tuple[float, torch.Tensor, str]:
    run = AttackRun(oracle, update, preset_config("ig", steps=steps, restarts=1), info,
                    generator=torch.Generator().manual_seed(0), snapshot_every=steps, initial=initial,
                    engine=engine)
    tic = time.perf_counter()
    for _ in run:
        pass
    seconds = time.perf_counter() - tic
    return seconds, run.result.reconstruction, str(run.engine_used)


def measure(arch: str, args, peer: Peer | None, folder: Path) -> dict:
    scenario = build_scenario(ScenarioConfig(dataset="photos", index=3, arch=arch))
    info = scenario.info
    oracle = GradientOracle(scenario.model)
    update = client_update(oracle, scenario.image, scenario.label)
    initial = torch.randn((1, *update.image_shape), generator=torch.Generator().manual_seed(args.seed))
    case = folder / arch
    case.mkdir()
    torch.save({"arch": arch, "num_classes": info.num_classes, "state_dict": scenario.model.state_dict(),
                "gradient": update.gradient, "label": update.label, "mean": list(info.mean),
                "std": list(info.std), "initial": initial}, case / "case.pt")

    def score(x: torch.Tensor) -> float:
        return psnr(info.denormalize(x.reshape(1, *update.image_shape)), scenario.image01)

    run_engine(oracle, update, info, args.steps, initial)  # warm-up: allocations, traced programs
    engine_s, peer_s, peer_setup, paired = [], [], [], []
    engine_x = peer_out = None
    for rep in range(args.repeats):
        seconds, engine_x, engine_used = run_engine(oracle, update, info, args.steps, initial)
        engine_s.append(seconds)
        if peer is not None:
            peer_out = case / f"rep{rep}"
            answer = peer.run(data=str(case), out=str(peer_out), steps=args.steps, warmup=10)
            peer_s.append(answer["loop_s"])
            peer_setup.append(answer["setup_s"])
            paired.append(answer["loop_s"] / seconds)  # engine steps/s over breaching steps/s
    row = {"arch": arch, "engine": args.steps / min(engine_s), "engine_used": engine_used,
           "psnr_engine": score(engine_x)}
    if peer is None:
        return row
    peer_final = torch.load(peer_out / "final.pt", weights_only=True)
    row.update(peer=args.steps / min(peer_s), paired=sorted(paired), setup=statistics.median(peer_setup),
               milestones=answer["milestones"],
               psnr_peer_best=score(torch.load(peer_out / "best.pt", weights_only=True)),
               psnr_peer_final=score(peer_final),
               psnr_between=psnr(info.denormalize(peer_final), info.denormalize(engine_x)))
    if args.aligned:
        out = case / "aligned"
        answer = peer.run(data=str(case), out=str(out), steps=args.steps, warmup=10, aligned=True,
                          milestones=engine_milestones(args.steps))
        aligned = torch.load(out / "final.pt", weights_only=True)
        _, eager_x, _ = run_engine(oracle, update, info, args.steps, initial, engine="eager")
        row.update(aligned_between=psnr(info.denormalize(aligned), info.denormalize(engine_x)),
                   aligned_maxdiff=float((aligned - engine_x).abs().max()), aligned_psnr=score(aligned),
                   eager_between=psnr(info.denormalize(aligned), info.denormalize(eager_x)),
                   eager_maxdiff=float((aligned - eager_x).abs().max()))
    return row


def _fmt(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", default="lenet,resnet8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared starting candidate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side (default 1)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER,
                        help=f"interpreter of the virtual environment with breaching (default {DEFAULT_PEER})")
    parser.add_argument("--no-aligned", dest="aligned", action="store_false",
                        help="skip the run of breaching with the engine's TV and milestones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peer, why = None, ""
    try:
        peer = Peer(args.peer_python, args.threads)
    except PeerUnavailable as exc:
        why = str(exc)
    print(f"engine: torch {torch.__version__}, {torch.get_num_threads()} thread(s); ig preset, {args.steps} steps, "
          f"R = 1, best of {args.repeats} interleaved repeats, same starting candidate (seed {args.seed})")
    if peer is not None:
        h = peer.hello
        print(f"breaching {h['breaching']} (torch {h['torch']}, {h['threads']} thread(s)) under {h['python']}; "
              f"breaching's time is its optimisation loop alone, the engine's its whole run")
    else:
        print(f"breaching not compared: {why}")
    print()

    rows = []
    with tempfile.TemporaryDirectory(prefix="peer-speed-") as tmp:
        try:
            for arch in args.archs.split(","):
                try:
                    rows.append(measure(arch, args, peer, Path(tmp)))
                except PeerUnavailable as exc:  # breaching failed mid-way: say why, go on without it
                    print(f"breaching not compared from {arch} on: {exc}")
                    if peer is not None:
                        peer.close()
                    peer = None
                    rows.append(measure(arch, args, None, Path(tmp)))
        finally:
            if peer is not None:
                peer.close()

    print("| arch | engine steps/s | breaching steps/s | engine / breaching per repeat (min / median / max) "
          "| breaching setup s | PSNR engine | PSNR breaching (returned / last iterate) "
          "| PSNR engine vs breaching last |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "peer" in r:
            p = r["paired"]
            print(f"| {r['arch']} | {r['engine']:.1f} | {r['peer']:.1f} | {p[0]:.2f} / {statistics.median(p):.2f} / "
                  f"{p[-1]:.2f} | {r['setup']:.3f} | {r['psnr_engine']:.2f} | {r['psnr_peer_best']:.2f} / "
                  f"{r['psnr_peer_final']:.2f} | {_fmt(r['psnr_between'])} |")
        else:
            print(f"| {r['arch']} | {r['engine']:.1f} | - | - | - | {r['psnr_engine']:.2f} | - | - |")
    engines = sorted({r["engine_used"] for r in rows})
    print()
    print(f"engine evaluated steps as: {', '.join(engines)}")
    with_peer = [r for r in rows if "peer" in r]
    if with_peer:
        print(f"learning-rate milestones: engine {engine_milestones(args.steps)}, breaching as shipped "
              f"{with_peer[0]['milestones']}")
    aligned = [r for r in with_peer if "aligned_between" in r]
    if aligned:
        print()
        print("breaching with the engine's TV and milestones (one run each): its last iterate against the engine's "
              f"(as timed: {', '.join(engines)}; and engine='eager', torch.optim.Adam as breaching uses)")
        print()
        print("| arch | PSNR breaching-aligned | PSNR vs engine | max abs difference | PSNR vs engine (eager) "
              "| max abs difference (eager) |")
        print("|---|---|---|---|---|---|")
        for r in aligned:
            print(f"| {r['arch']} | {r['aligned_psnr']:.2f} | {_fmt(r['aligned_between'])} | "
                  f"{r['aligned_maxdiff']:.2e} | {_fmt(r['eager_between'])} | {r['eager_maxdiff']:.2e} |")
        print()
        print("(differences in normalised units; PSNR between two reconstructions in dB, 'identical' when equal)")


if __name__ == "__main__":
    main()
