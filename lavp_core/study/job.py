"""Executing one job: attack the image, score the reconstruction, compute (or reuse) the proxies at the
ground truth, and return the rows to store. Runs in whichever process an executor chooses; it never
touches the results database."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..store import utc_now
from .plan import Flavour, Job, canonical_json

if TYPE_CHECKING:
    from ..proxies import ProxyResult


@dataclass(frozen=True)
class SharedProxies:
    """Proxies computed by an earlier job of the same ``proxy_key``, reused instead of recomputed."""

    job_key: str
    rows: tuple[dict, ...]
    exact_seconds: float | None
    paper_seconds: float | None


@dataclass(frozen=True)
class JobOutcome:
    """A job's row for the ``jobs`` table and its rows for the ``proxies`` table; ``shareable`` is set
    when the job computed its proxies itself (so later jobs of its ``proxy_key`` may reuse them)."""

    row: dict
    proxies: tuple[dict, ...]
    shareable: bool


def _identity_row(job: Job) -> dict:
    return {"job_key": job.key, "proxy_key": job.proxy_key, "study": job.study, "config_json": job.config_json,
            "dataset": job.dataset, "split": job.split, "image_index": job.index, "arch": job.arch,
            "weights": job.weights, "weights_sha256": job.weights_sha256, "seed": job.seed, "loss": job.loss,
            "preset": job.preset, "attack_json": canonical_json(dataclasses.asdict(job.attack)),
            "attack_seed": job.attack_seed}


def _png(image01) -> bytes:
    """A (C, H, W) image in [0, 1] as PNG bytes."""
    from ..metrics import image_file_bytes

    return image_file_bytes(image01, "PNG")


def proxy_rows(result: ProxyResult, flavour: Flavour) -> list[dict]:
    """Rows for the ``proxies`` table from a :class:`~lavp_core.proxies.ProxyResult`.

    ``method`` says how each value was obtained: the eigen-solver of an eigenvalue (from its
    diagnostics, with residual, iterations and seconds), ``fusion (<solver>)`` for a fusion of
    eigenvalues, ``direct`` for a value computed directly (``grad_norm``).
    """
    rows = []
    for name, value in result.items():
        diag = result.diagnostics.get(name)
        if diag is not None:
            rows.append({"proxy": name, "flavour": flavour, "method": diag.method, "value": float(value),
                         "residual": float(diag.residual), "converged": bool(diag.converged),
                         "iterations": int(diag.iterations), "seconds": float(diag.seconds), "note": diag.note})
        else:
            method = f"fusion ({result.method})" if name in result.fusions else "direct"
            rows.append({"proxy": name, "flavour": flavour, "method": method, "value": float(value),
                         "residual": None, "converged": bool(result.converged(name)), "iterations": None,
                         "seconds": None, "note": ""})
    return rows


def execute_job(job: Job, shared: SharedProxies | None = None, device: str = "cpu",
                engine: str = "auto") -> JobOutcome:
    """Run one job: attack, scores, proxies (or reuse ``shared``), PNGs. Never raises for a failing
    job: the exception's type and message go into the row with ``status = 'error'``. ``engine`` is
    how the attack evaluates its steps (:data:`~lavp_core.fast_steps.ENGINES`; every engine gives the
    same numbers to round-off, so it is not part of the job's identity)."""
    import torch

    from .. import __version__
    from ..attacks import run_attack
    from ..fast_steps import study_engine
    from ..gradients import client_update
    from ..metrics import score_reconstruction
    from ..proxies import compute_proxies
    from ..scenario import ScenarioConfig, build_scenario

    began = time.perf_counter()
    row = _identity_row(job)
    row.update({"worker": f"{socket.gethostname()}:{os.getpid()}", "torch_threads": torch.get_num_threads(),
                "code_version": __version__})
    try:
        scenario = build_scenario(ScenarioConfig(dataset=job.dataset, index=job.index, arch=job.arch,
                                                 weights=job.weights, seed=job.seed, split=job.split,
                                                 data_root=job.data_root), device=device)
        update = client_update(scenario.model, scenario.image, scenario.label)
        generator = torch.Generator().manual_seed(job.attack_seed)
        result = run_attack(scenario.model, update, job.attack, scenario.info, generator=generator, device=device,
                            engine=study_engine(engine, job.attack.steps, job.attack.optimizer))
        scores = score_reconstruction(result.reconstruction, scenario.image, scenario.info)
        row.update({"label": scenario.label, "label_used": result.label_used,
                    "image_description": scenario.description, "matching_loss": result.matching_loss,
                    "restart_losses_json": canonical_json([v if math.isfinite(v) else None
                                                           for v in result.restart_losses]),
                    "best_restart": result.best_restart, "all_diverged": result.all_diverged,
                    "steps": result.steps, "mse": scores["mse"], "psnr": scores["psnr"], "ssim": scores["ssim"],
                    "rel_mse": scores["rel_mse"], "correlation": scores["correlation"],
                    "lpips": scores["lpips"], "lpips_reason": scores["lpips_reason"] or None,
                    "attack_seconds": result.seconds})
        if shared is not None:
            rows = [dict(r) for r in shared.rows]
            row.update({"proxies_from": shared.job_key, "proxy_exact_seconds": shared.exact_seconds,
                        "proxy_paper_seconds": shared.paper_seconds})
        else:
            rows = []
            for flavour in job.flavours:
                method = job.exact_method if flavour == "exact" else "paper"
                values = compute_proxies(scenario.model, scenario.image, scenario.label, losses=job.proxy_losses,
                                         method=method, config=job.solver, device=device)
                rows.extend(proxy_rows(values, flavour))
                row[f"proxy_{flavour}_seconds"] = values.seconds
        if job.store_images:
            row["truth_png"] = _png(scenario.image01[0])
            if result.reconstruction is not None:
                row["reconstruction_png"] = _png(scenario.info.denormalize(result.reconstruction.float().cpu())[0])
        row["status"] = "done"
        outcome_rows, shareable = tuple(rows), shared is None
    except Exception as exc:  # a failing job is recorded and the study goes on
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        place = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
        row.update({"status": "error", "error": f"{type(exc).__name__}: {exc}{place}"})
        outcome_rows, shareable = (), False
    row["job_seconds"] = time.perf_counter() - began
    row["created_at"] = utc_now()
    return JobOutcome(row, outcome_rows, shareable)


def failed_outcome(job: Job, message: str) -> JobOutcome:
    """The outcome of a job that an executor could not run or whose result was lost (``message`` says
    why); stored with ``status = 'error'``, so rerunning the study retries it."""
    row = _identity_row(job)
    row.update({"status": "error", "error": message, "created_at": utc_now()})
    return JobOutcome(row, (), False)
