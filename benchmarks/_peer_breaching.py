"""Worker of ``benchmarks/peer_speed.py``: runs of breaching's Inverting-Gradients attack.

Runs under the *peer* interpreter (a separate virtual environment with ``pip install breaching``),
never under the project's: breaching is not a dependency of LAVP Explorer. For each job it reads
what ``peer_speed.py`` wrote to the job's ``data`` folder (``case.pt``: architecture, class count, the model's state
dict, the client's flattened gradient g*, the label, the normalisation and the starting candidate),
rebuilds the same module with ``lavp_core.models.create_model`` (imported by path: only ``torch``
is needed for it) and loads the state dict, then runs ``breaching.attacks.prepare_attack`` with
breaching's own ``invertinggradients`` attack config:

    objective cosine-similarity, optim adam, signed "hard", step_size 0.1, boxed, step_size_decay
    step-lr, regularization.total_variation.scale 1e-4 (inner/outer exponent 1), one trial,
    max_iterations = the job's ``steps``, with ``initial_data`` = the engine's starting candidate.

Timing: the optimisation loop only, from the end of breaching's ``_init_optimizer`` (called right
before its loop) to the start of ``_score_trial`` (called right after it); the rest of
``reconstruct`` (model copies, casting, the final scoring pass) is reported as ``setup_s``.
Both hooks wrap the original methods on the attacker instance and change nothing they compute.

A job with ``aligned`` swaps two definitions for the engine's, to check that the two end at the same
candidate rather than to time breaching as shipped: the total variation becomes mean |dx| + mean |dy|
over the image's interior differences (breaching pads the border with zeros, so its mean also takes
|x| of the last row and column, plus 2e-8), and the learning-rate milestones become the job's ``milestones``
(breaching's are ``steps // 2.667, steps // 1.6, steps // 1.142``).

One process serves many runs, so breaching and torch are imported once: it prints one JSON line
(``{"ok": true, "breaching": version, ...}``, or ``{"ok": false, "reason": ...}`` and exit code 3
when breaching does not import), then reads one JSON job per line on stdin
(``{"data": folder, "out": folder, "steps": N, "warmup": W, "aligned": bool, "milestones": [...]}``)
and answers each with one JSON line: loop and setup seconds, objective values, the milestones used,
the config; it writes ``best.pt`` (what ``reconstruct`` returns: the candidate after the step whose
objective was lowest) and ``final.pt`` (the last iterate) to ``out``. A case's first job first runs
``warmup`` untimed steps. Breaching's own prints go to stderr. By hand::

    echo '{"data": "/tmp/x", "out": "/tmp/x/out", "steps": 50}' | /work/peer-venv/bin/python \
        benchmarks/_peer_breaching.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class _EngineTotalVariation:
    """The engine's TV (mean |dx| + mean |dy| over interior differences), with breaching's regulariser API."""

    def __init__(self, setup, scale=0.1, inner_exp=1, outer_exp=1, **_):
        if inner_exp != 1 or outer_exp != 1:
            raise ValueError("the engine's TV is the anisotropic one (inner_exp = outer_exp = 1)")
        self.scale = scale

    def initialize(self, *args, **kwargs):
        pass

    def __call__(self, x, *args, **kwargs):
        dx = (x[..., :, :, 1:] - x[..., :, :, :-1]).abs().mean()
        dy = (x[..., :, 1:, :] - x[..., :, :-1, :]).abs().mean()
        return self.scale * (dx + dy)

    def __repr__(self):
        return f"Total Variation as the LAVP engine defines it, scale={self.scale}"




def _split(g_star, params):
    """The engine's flat g* (named_parameters() order, which is parameters() order) as breaching's list."""
    if sum(p.numel() for p in params) != g_star.numel():
        raise ValueError(f"the gradient has {g_star.numel()} entries, the rebuilt model "
                         f"{sum(p.numel() for p in params)} parameters")
    gradients, start = [], 0
    for p in params:
        gradients.append(g_star[start:start + p.numel()].view_as(p).clone())
        start += p.numel()
    return gradients


class Peer:
    def __init__(self, threads: int):
        warnings.filterwarnings("ignore")
        logging.disable(logging.INFO)
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        with contextlib.redirect_stdout(sys.stderr):
            import breaching
            from breaching.attacks.optimization_based_attack import regularizer_lookup
            from omegaconf import OmegaConf
        self.breaching, self.OmegaConf = breaching, OmegaConf
        self.regularizer_lookup = regularizer_lookup
        self.shipped_tv = regularizer_lookup["total_variation"]
        sys.path.insert(0, str(REPO))
        from lavp_core.models import create_model

        self.create_model = create_model
        self.warm: set[str] = set()

    def versions(self) -> dict:
        from importlib.metadata import version

        return {"breaching": version("breaching"), "torch": self.torch.__version__,
                "threads": self.torch.get_num_threads(), "python": sys.executable}

    def load(self, folder: str):
        torch = self.torch
        case = torch.load(Path(folder) / "case.pt", weights_only=True)
        model = self.create_model(case["arch"], int(case["num_classes"]), weights="random", seed=0,
                                  in_channels=len(case["mean"]))
        model.load_state_dict(case["state_dict"])
        return case, model.eval()

    def attack(self, case, model, steps: int, aligned: bool, milestones: list[int]):
        torch, breaching = self.torch, self.breaching
        self.regularizer_lookup["total_variation"] = _EngineTotalVariation if aligned else self.shipped_tv
        overrides = [f"optim.max_iterations={steps}", "regularization.total_variation.scale=0.0001",
                     "optim.callback=1000000000", "restarts.num_trials=1"]
        with contextlib.redirect_stdout(sys.stderr):
            cfg = breaching.get_attack_config("invertinggradients", overrides=overrides)
        setup = dict(device=torch.device("cpu"), dtype=torch.float)
        attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
        marks: dict = {}
        init_optimizer, score_trial = attacker._init_optimizer, attacker._score_trial

        def timed_init_optimizer(params):  # breaching calls this right before its loop
            optimizer, scheduler = init_optimizer(params)
            if aligned and milestones:
                scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
            marks["candidate"] = params[0]
            marks["milestones"] = sorted(int(m) for m in getattr(scheduler, "milestones", {}))
            marks["loop_start"] = time.perf_counter()
            return optimizer, scheduler

        def timed_score_trial(*a, **k):  # ... and this right after it
            marks["loop_end"] = time.perf_counter()
            return score_trial(*a, **k)

        attacker._init_optimizer = timed_init_optimizer
        attacker._score_trial = timed_score_trial
        x0 = case["initial"]  # (1, C, H, W), normalised
        metadata = self.OmegaConf.create(dict(shape=list(x0.shape[1:]), mean=list(case["mean"]),
                                              std=list(case["std"]), modality="vision"))
        # public buffers (batch-norm running statistics): breaching then evaluates the model in
        # eval mode, as the engine does; without them it would use batch statistics
        payload = dict(parameters=[p.detach().clone() for p in model.parameters()],
                       buffers=[b.detach().clone() for b in model.buffers()], metadata=metadata)
        shared = dict(gradients=_split(case["gradient"], list(model.parameters())), buffers=None,
                      metadata=dict(num_data_points=1, labels=torch.tensor([int(case["label"])]),
                                    local_hyperparams=None))
        tic = time.perf_counter()
        result, stats = attacker.reconstruct([payload], [shared], {}, initial_data=x0.clone(), dryrun=False)
        total = time.perf_counter() - tic
        return result, stats, marks, total, cfg

    def run(self, job: dict) -> dict:
        case, model = self.load(job["data"])
        aligned, milestones = bool(job.get("aligned", False)), [int(m) for m in job.get("milestones", [])]
        warmup = int(job.get("warmup", 10))
        if job["data"] not in self.warm and warmup > 0:
            self.attack(case, model, warmup, aligned, milestones)
            self.warm.add(job["data"])
        result, stats, marks, total, cfg = self.attack(case, model, int(job["steps"]), aligned, milestones)
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        self.torch.save(result["data"].detach().cpu(), out / "best.pt")
        self.torch.save(marks["candidate"].detach().cpu(), out / "final.pt")
        values = stats.get("Trial_0_Val", [])
        loop = marks["loop_end"] - marks["loop_start"]
        return {"ok": True, "steps": len(values), "loop_s": loop, "setup_s": total - loop,
                "objective_first": values[0] if values else None,
                "objective_last": values[-1] if values else None,
                "milestones": marks["milestones"], "aligned": aligned,
                "config": {"objective": cfg.objective.type, "optimizer": cfg.optim.optimizer,
                           "signed": cfg.optim.signed, "step_size": cfg.optim.step_size,
                           "boxed": cfg.optim.boxed, "decay": cfg.optim.step_size_decay,
                           "tv": self.regularizer_lookup["total_variation"].__name__,
                           "tv_scale": cfg.regularization.total_variation.scale}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    try:
        peer = Peer(args.threads)
        hello = {"ok": True, **peer.versions()}
    except Exception as exc:  # noqa: BLE001 - any failure to import is the answer to report
        print(json.dumps({"ok": False, "reason": f"breaching does not import under {sys.executable}: "
                                                 f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(3)
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = peer.run(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which says why
            answer = {"ok": False, "reason": f"breaching's attack failed: {type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
