"""Studies: a grid of (image, architecture, weights, attack loss, attack settings) jobs run into a
results database, and the paper's evaluation of the proxies on what was stored.

A *job* attacks one image on one model with one matching loss (best of the preset's restarts), scores
the reconstruction (MSE, PSNR, SSIM, LPIPS where available), and computes every proxy at the ground
truth twice: by an exact solver (flavour ``exact``: the dense float64 Hessian by default) and by the
paper's recipe (flavour ``paper``: finite-difference power iterations within a recorded budget,
``SolverConfig.paper_iterations``, 100 for each extreme by default). Proxies do not depend on the attack
loss, so jobs that share an image and a model compute them once and share them (``proxies_from``
names the job that computed them).

Each job is identified by the SHA-256 of the canonical JSON of its full configuration
(:attr:`Job.config_json`): rerunning a study skips finished jobs and retries failed ones. The attack's
random starts come from a ``torch.Generator`` seeded from (seed, dataset, split, image index), so
every loss and architecture starts from the same candidates for a given image and results do not
depend on which worker ran a job or when.

Evaluation (the paper's "Evaluation Metric" section): Spearman's σ_S between each proxy and each
similarity score over the images of one (dataset, attack loss, architecture), then the mean of σ_S
over architectures (:func:`spearman_table`); Table 1 and Table 3 layouts (:func:`table1`,
:func:`table3`), the exact-vs-recipe agreement (:func:`recipe_agreement`), and the rankings behind
Figure 1b/1c with Kendall's τ (:func:`rankings`).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, StoreError
from .hessian import SolverConfig
from .store import FLAVOURS, ResultStore, open_store, utc_now

JOB_FORMAT = 1  # part of every job key: bump when the meaning of a stored row changes
EXACT_METHODS = ("exact", "lanczos", "auto")
SCORES = ("mse", "ssim", "psnr", "lpips")  # the paper's cell order: MSE / SSIM / PSNR / LPIPS
MEAN_ARCH = "mean"  # the ``arch`` of the rows of spearman_table averaged over architectures
LOSS_LABELS = {"l2": "L2", "cos": "CS", "cos-layer": "CS-layer"}
TABLE1_ORDER = ("grad_norm", "l2_max", "l2_min", "cos_max", "cos_min")


# --------------------------------------------------------------------------------------------
# Configuration and jobs


@dataclass(frozen=True)
class StudyConfig:
    """A study: the grid of jobs and how each job computes its proxies.

    Args:
        name: a label stored with the study and its rows (``report --study NAME``).
        dataset: registry name of the dataset; ``split`` its split (``val`` as in the paper).
        images: a count N (N images drawn without replacement by a generator seeded with ``seed``,
            sorted; every image when N is at least the split's size) or explicit image indices.
        archs: architecture names; ``weights``: ``"trained"``, ``"random"`` or a checkpoint path.
        seed: seed of random weights, of the image draw and of the attacks' random starts.
        losses: the attack's matching losses (one job per loss).
        preset: an optimisation attack preset (``lavp-paper`` by default); ``steps``, ``restarts``,
            ``lr`` and ``tv_weight`` override its settings when given.
        proxy_losses: the losses whose Hessian eigenvalues are computed (default: ``losses``); the
            paper's ``fusion`` needs ``l2`` and ``cos``.
        flavours: which proxy flavours to compute: ``exact`` and/or ``paper``.
        exact_method: the solver of the ``exact`` flavour: ``exact`` (dense Hessian, certified),
            ``lanczos`` (matrix-free, for large inputs) or ``auto``.
        solver: eigen-solver settings, including the paper recipe's budget ``paper_iterations``.
        data_root: folder of on-disk datasets (CIFAR, image folders); not part of job identity.
        store_images: store the reconstruction and the ground truth as PNGs in each row.
    """

    name: str = "study"
    dataset: str = "photos"
    split: str = "val"
    images: int | tuple[int, ...] = 100
    archs: tuple[str, ...] = ("lenet", "resnet8")
    weights: str = "trained"
    seed: int = 0
    losses: tuple[str, ...] = ("l2", "cos")
    preset: str = "lavp-paper"
    steps: int | None = None
    restarts: int | None = None
    lr: float | None = None
    tv_weight: float | None = None
    proxy_losses: tuple[str, ...] | None = None
    flavours: tuple[str, ...] = FLAVOURS
    exact_method: str = "exact"
    solver: SolverConfig = SolverConfig()
    data_root: str | None = None
    store_images: bool = True


@dataclass(frozen=True)
class Job:
    """One cell of the grid. ``key`` is the SHA-256 of ``config_json`` (the canonical JSON of every
    setting that affects the row); ``proxy_key`` identifies the proxy computation jobs may share."""

    key: str
    proxy_key: str
    config_json: str
    study: str
    dataset: str
    split: str
    index: int
    arch: str
    weights: str
    weights_sha256: str | None
    seed: int
    loss: str
    preset: str
    attack: object  # AttackConfig
    attack_seed: int
    proxy_losses: tuple[str, ...]
    flavours: tuple[str, ...]
    exact_method: str
    solver: SolverConfig
    data_root: str | None = None
    store_images: bool = True


@dataclass(frozen=True)
class StudyPlan:
    """A validated study: its resolved image indices and its jobs (grid order)."""

    config: StudyConfig
    images: tuple[int, ...]
    jobs: tuple[Job, ...]
    study_key: str
    config_json: str


@dataclass(frozen=True)
class StudySummary:
    """What :func:`run_study` did. ``stored_before``: jobs already finished in the database;
    ``done``/``errors``: jobs run now that finished/failed; ``kept``: jobs run now whose row another
    study had written meanwhile (that row was kept)."""

    name: str
    db: str
    total: int
    stored_before: int
    done: int
    errors: int
    kept: int
    seconds: float
    workers: int
    threads: int

    @property
    def run(self) -> int:
        return self.done + self.errors + self.kept

    @property
    def jobs_per_minute(self) -> float:
        return 60.0 * self.run / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["run"] = self.run
        out["jobs_per_minute"] = self.jobs_per_minute
        return out


def canonical_json(value: object) -> str:
    """Sorted-key, compact JSON: the text hashed into job keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(value: object):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


# The SolverConfig fields that can change a stored proxy value or its converged flag, per flavour and
# exact method. Only these enter a job's key, so that tuning another solver (say Lanczos, when the
# study uses the dense ``exact`` method) does not make finished jobs run again.
_SOLVER_FIELDS_ALWAYS = ("tol", "precision", "check_smoothness")
_SOLVER_FIELDS_EXACT = {
    "exact": (),
    "lanczos": ("lanczos_ncv_max", "lanczos_ncv_min", "lanczos_max_products", "lanczos_min_products", "seed"),
    "auto": ("exact_max_dim", "lanczos_ncv_max", "lanczos_ncv_min", "lanczos_max_products",
             "lanczos_min_products", "seed"),
}
_SOLVER_FIELDS_PAPER = ("paper_iterations", "paper_seconds", "paper_fd_step", "seed")


def keyed_solver_settings(solver: SolverConfig, flavours: Sequence[str], exact_method: str) -> dict:
    """The solver settings that identify a job's proxies (see ``_SOLVER_FIELDS_*``)."""
    names = list(_SOLVER_FIELDS_ALWAYS)
    if "exact" in flavours:
        names += _SOLVER_FIELDS_EXACT[exact_method]
    if "paper" in flavours:
        names += _SOLVER_FIELDS_PAPER
    return {name: getattr(solver, name) for name in sorted(set(names))}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the canonical JSON of ``parts`` (same parts, same seed, on every machine)."""
    digest = hashlib.sha256(canonical_json(list(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def study_config_dict(config: StudyConfig, images: Sequence[int]) -> dict:
    """The study configuration as a JSON-ready dict, with the image indices resolved."""
    out = dataclasses.asdict(config)
    out["images"] = list(images)
    # only the solver settings that can change a stored value identify the study (as for its jobs)
    out["solver"] = keyed_solver_settings(config.solver, config.flavours, config.exact_method)
    return out


def _names(value: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    names = tuple(str(v).strip() for v in value)
    if not names or any(not n for n in names):
        raise ConfigError(f"a study needs at least one {what} name (comma-separated), got {list(value)!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"each {what} may appear once in a study, got {list(names)}")
    return names


def _image_indices(config: StudyConfig, size: int) -> tuple[int, ...]:
    import torch

    images = config.images
    if isinstance(images, bool):
        raise ConfigError(f"images must be a count or a list of indices, got {images!r}")
    if isinstance(images, int):
        if images <= 0:
            raise ConfigError(f"a study needs at least one image, got images={images}")
        if images >= size:
            return tuple(range(size))
        order = torch.randperm(size, generator=torch.Generator().manual_seed(int(config.seed)))
        return tuple(sorted(int(i) for i in order[:images]))
    indices = tuple(int(i) for i in images)
    if not indices:
        raise ConfigError("a study needs at least one image index")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"image indices repeat: {list(indices)}")
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ConfigError(f"image indices {bad} are out of range for {config.dataset} {config.split} "
                          f"({size} images: 0..{size - 1})")
    return indices


def plan_study(config: StudyConfig) -> StudyPlan:
    """Check every name and setting of ``config`` and expand its grid into jobs; nothing runs.

    Raises:
        ConfigError: an unknown dataset, architecture, loss, preset or solver, or a bad setting.
        DatasetError / CheckpointError / ModelError: a dataset or checkpoint that cannot be used.
    """
    from .attacks import get_preset, preset_config
    from .data import load_dataset
    from .losses import get_loss
    from .models import model_spec, trained_checkpoint_path
    from .scenario import ScenarioConfig, build_model

    if not isinstance(config, StudyConfig):
        raise ConfigError(f"expected a StudyConfig, got {type(config).__name__}")
    if not str(config.name).strip():
        raise ConfigError("a study needs a name")
    archs = _names(config.archs, "architecture")
    losses = _names(config.losses, "loss")
    for name in archs:
        model_spec(name)
    for name in losses:
        get_loss(name)
    proxy_losses = _names(config.proxy_losses if config.proxy_losses is not None else losses, "proxy loss")
    for name in proxy_losses:
        get_loss(name)
    flavours = _names(config.flavours, "proxy flavour")
    unknown = [f for f in flavours if f not in FLAVOURS]
    if unknown:
        raise ConfigError(f"unknown proxy flavours {unknown}: choose from {', '.join(FLAVOURS)}")
    flavours = tuple(f for f in FLAVOURS if f in flavours)
    if config.exact_method not in EXACT_METHODS:
        raise ConfigError(f"unknown exact method {config.exact_method!r}: choose one of {', '.join(EXACT_METHODS)}")
    if not isinstance(config.solver, SolverConfig):
        raise ConfigError(f"solver must be a SolverConfig, got {type(config.solver).__name__}")
    preset = get_preset(config.preset)
    if preset.kind != "optimisation":
        raise ConfigError(f"preset {preset.name!r} is a {preset.kind} attack; a study runs optimisation attacks "
                          f"(e.g. lavp-paper, ig, dlg)")
    attacks = {loss: preset_config(config.preset, loss=loss, steps=config.steps, restarts=config.restarts,
                                   lr=config.lr, tv_weight=config.tv_weight) for loss in losses}
    dataset = load_dataset(config.dataset, config.split, root=config.data_root)
    images = _image_indices(config, len(dataset))

    weights_sha: dict[str, str | None] = {}
    for arch in archs:  # build each model once: unknown or ill-fitting checkpoints fail here
        scenario = ScenarioConfig(dataset=config.dataset, arch=arch, weights=config.weights, seed=config.seed,
                                  split=config.split, data_root=config.data_root)
        build_model(scenario, dataset.info)
        if config.weights == "random":
            weights_sha[arch] = None
        elif config.weights == "trained":
            weights_sha[arch] = file_sha256(trained_checkpoint_path(arch, config.dataset))
        else:
            weights_sha[arch] = file_sha256(config.weights)

    proxy_settings = {"losses": list(proxy_losses), "flavours": list(flavours),
                      "exact_method": config.exact_method if "exact" in flavours else None,
                      "solver": keyed_solver_settings(config.solver, flavours, config.exact_method)}
    jobs = []
    for index in images:
        attack_seed = derive_seed("attack-start", config.seed, config.dataset, config.split, index)
        for arch in archs:
            scenario_part = {"format": JOB_FORMAT, "dataset": config.dataset, "split": config.split, "index": index,
                             "arch": arch, "weights": config.weights, "weights_sha256": weights_sha[arch],
                             "seed": int(config.seed)}
            proxy_key = sha256_text(canonical_json({**scenario_part, "proxies": proxy_settings}))
            for loss in losses:
                job_config = {**scenario_part, "loss": loss, "preset": preset.name,
                              "attack": dataclasses.asdict(attacks[loss]), "attack_seed": attack_seed,
                              "proxies": proxy_settings}
                text = canonical_json(job_config)
                jobs.append(Job(sha256_text(text), proxy_key, text, str(config.name), config.dataset, config.split,
                                index, arch, config.weights, weights_sha[arch], int(config.seed), loss, preset.name,
                                attacks[loss], attack_seed, proxy_losses, flavours, config.exact_method,
                                config.solver, config.data_root, config.store_images))
    config_json = canonical_json(study_config_dict(config, images))
    return StudyPlan(config, images, tuple(jobs), sha256_text(config_json), config_json)


# --------------------------------------------------------------------------------------------
# One job


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
    from PIL import Image

    from .metrics import to_uint8_image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8_image(image01)).save(buffer, format="PNG")
    return buffer.getvalue()


def proxy_rows(result, flavour: str) -> list[dict]:
    """Rows for the ``proxies`` table from a :class:`~lavp_core.proxies.ProxyResult`."""
    rows = []
    for name, value in result.items():
        diag = result.diagnostics.get(name)
        if diag is not None:
            rows.append({"proxy": name, "flavour": flavour, "method": diag.method, "value": float(value),
                         "residual": float(diag.residual), "converged": bool(diag.converged),
                         "iterations": int(diag.iterations), "seconds": float(diag.seconds), "note": diag.note})
        else:
            method = "direct" if name == "grad_norm" else f"fusion ({result.method})"
            rows.append({"proxy": name, "flavour": flavour, "method": method, "value": float(value),
                         "residual": None, "converged": bool(result.converged(name)), "iterations": None,
                         "seconds": None, "note": ""})
    return rows


def execute_job(job: Job, shared: SharedProxies | None = None, device: str = "cpu") -> JobOutcome:
    """Run one job: attack, scores, proxies (or reuse ``shared``), PNGs. Never raises for a failing
    job: the exception's type and message go into the row with ``status = 'error'``."""
    import torch

    from . import __version__
    from .attacks import run_attack
    from .gradients import client_update
    from .metrics import score_reconstruction
    from .proxies import compute_proxies
    from .scenario import ScenarioConfig, build_scenario

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
        result = run_attack(scenario.model, update, job.attack, scenario.info, generator=generator, device=device)
        scores = score_reconstruction(result.reconstruction, scenario.image, scenario.info)
        row.update({"label": scenario.label, "label_used": result.label_used,
                    "image_description": scenario.description, "matching_loss": result.matching_loss,
                    "restart_losses_json": canonical_json([v if math.isfinite(v) else None
                                                           for v in result.restart_losses]),
                    "best_restart": result.best_restart, "all_diverged": result.all_diverged,
                    "steps": result.steps, "mse": scores["mse"], "psnr": scores["psnr"], "ssim": scores["ssim"],
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


# --------------------------------------------------------------------------------------------
# Running a study


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_workers(threads: int = 1) -> int:
    """Worker processes that fit the cores with ``threads`` torch threads each (no oversubscription)."""
    return max(1, available_cores() // max(1, int(threads)))


def _init_worker(threads: int, parent: int) -> None:
    import threading

    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    # A worker blocked on the pool's queue does not notice that the study process was killed (it holds
    # the queue's write end itself): leave as soon as the parent is gone, so no orphan keeps computing.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="watch-parent").start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_job(job: Job, shared: SharedProxies | None, device: str) -> JobOutcome:
    return execute_job(job, shared, device)


def run_study(config: StudyConfig | StudyPlan, db: str | os.PathLike, *, workers: int | None = None,
              threads: int = 1, device: str = "cpu", progress: bool = True,
              on_job: Callable[[JobOutcome, str], None] | None = None) -> StudySummary:
    """Run the jobs of ``config`` that are not finished in ``db`` and store each one as it ends.

    Args:
        config: the study (validated by :func:`plan_study` before anything runs or is written).
        db: the results database (created when missing).
        workers: worker processes (``spawn`` context); default :func:`default_workers` of ``threads``.
            ``0`` runs the jobs in this process (no torch thread setting is changed).
        threads: torch threads of each worker.
        device: ``cpu`` or ``cuda``.
        progress: show a tqdm bar with ETA on stderr.
        on_job: called with each outcome and the store's action (``inserted``/``replaced``/``kept``).

    Returns:
        A :class:`StudySummary`. A job that fails is stored with ``status = 'error'`` and the study
        goes on; rerunning retries it (its row is the only kind ever replaced).
    """
    plan = config if isinstance(config, StudyPlan) else plan_study(config)
    threads = int(threads)
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    workers = default_workers(threads) if workers is None else int(workers)
    if workers < 0:
        raise ConfigError(f"workers must be 0 (run here) or more, got {workers}")
    began = time.perf_counter()
    with open_store(db) as store:
        store.register_study(plan.study_key, plan.config.name, plan.config_json, (j.key for j in plan.jobs))
        stored = store.statuses(j.key for j in plan.jobs)
        pending = [j for j in plan.jobs if stored.get(j.key) != "done"]
        shared: dict[str, SharedProxies] = {}
        for key in dict.fromkeys(j.proxy_key for j in pending):
            found = store.cached_proxies(key)
            if found is not None:
                shared[key] = SharedProxies(found[0], tuple(found[1]), found[2], found[3])
        counts = {"done": 0, "error": 0, "kept": 0}
        bar = _progress_bar(len(pending), plan.config.name, progress)

        def record(outcome: JobOutcome, job: Job) -> None:
            result = store.write_job(outcome.row, outcome.proxies)
            if result.action == "kept":
                counts["kept"] += 1
            else:
                counts[outcome.row["status"]] += 1
            if outcome.shareable and outcome.row["status"] == "done":
                shared.setdefault(job.proxy_key, SharedProxies(job.key, outcome.proxies,
                                                               outcome.row.get("proxy_exact_seconds"),
                                                               outcome.row.get("proxy_paper_seconds")))
            if on_job is not None:
                on_job(outcome, result.action)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(errors=counts["error"], refresh=False)

        try:
            if workers == 0:
                for job in pending:
                    record(execute_job(job, shared.get(job.proxy_key), device), job)
            else:
                _run_pool(pending, shared, record, workers, threads, device)
        finally:
            if bar is not None:
                bar.close()
    return StudySummary(plan.config.name, str(db), len(plan.jobs), len(plan.jobs) - len(pending), counts["done"],
                        counts["error"], counts["kept"], time.perf_counter() - began, workers, threads)


def _progress_bar(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="job", desc=name, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _run_pool(pending: list[Job], shared: dict[str, SharedProxies], record, workers: int, threads: int,
              device: str) -> None:
    """Keep ``workers`` jobs in flight. A job whose proxies another in-flight job is computing waits for
    them, so each (image, model) pair's proxies are computed once; only this process writes the store."""
    context = multiprocessing.get_context("spawn")
    queue = list(pending)
    computing: set[str] = set()  # proxy keys being computed by a job in flight
    inflight: dict[futures.Future, Job] = {}

    def new_pool() -> futures.ProcessPoolExecutor:
        return futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                           initargs=(threads, os.getpid()))

    pool = new_pool()
    try:
        while queue or inflight:
            while len(inflight) < workers:
                pick = next((i for i, j in enumerate(queue)
                             if j.proxy_key in shared or j.proxy_key not in computing), None)
                if pick is None:
                    break
                job = queue.pop(pick)
                reuse = shared.get(job.proxy_key)
                if reuse is None:
                    computing.add(job.proxy_key)
                inflight[pool.submit(_worker_job, job, reuse, device)] = job
            finished, _ = futures.wait(inflight, return_when=futures.FIRST_COMPLETED)
            broken = False
            for future in finished:
                job = inflight.pop(future)
                computing.discard(job.proxy_key)
                try:
                    outcome = future.result()
                except futures.process.BrokenProcessPool as exc:
                    broken = True
                    outcome = _failed(job, f"worker process died ({exc}); out of memory? rerun the study to "
                                           f"retry this job")
                except Exception as exc:  # e.g. a result that could not be sent back
                    outcome = _failed(job, f"{type(exc).__name__}: {exc}")
                record(outcome, job)
            if broken:  # every job still in flight died with the pool: record them, start a new pool
                for _future, job in list(inflight.items()):
                    record(_failed(job, "worker process died with another job's worker; rerun the study to "
                                        "retry this job"), job)
                    computing.discard(job.proxy_key)
                inflight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _failed(job: Job, message: str) -> JobOutcome:
    row = _identity_row(job)
    row.update({"status": "error", "error": message, "created_at": utc_now()})
    return JobOutcome(row, (), False)


# --------------------------------------------------------------------------------------------
# Reading results


def proxy_column(proxy: str, flavour: str = "exact") -> str:
    """Name of a proxy's value column in :func:`load_results`: ``proxy_column("l2_min", "paper") ==
    "paper_l2_min"``."""
    if flavour not in FLAVOURS:
        raise ConfigError(f"unknown proxy flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    return f"{flavour}_{proxy}"


def proxy_names(df: pd.DataFrame, flavour: str = "exact") -> list[str]:
    """Proxies with a value column of ``flavour`` in ``df``, in Table 1 order, then the rest by name."""
    prefix = f"{flavour}_"
    found = [c[len(prefix):] for c in df.columns
             if c.startswith(prefix) and not c.endswith("_converged") and not c.endswith("_method")]
    first = [p for p in (*TABLE1_ORDER, "fusion") if p in found]
    return first + sorted(p for p in found if p not in first)


def load_results(db: str | os.PathLike, *, study: str | None = None, include_errors: bool = False,
                 with_images: bool = False) -> pd.DataFrame:
    """The stored jobs as one DataFrame (read-only; works while a study writes).

    One row per job: identity columns (``dataset``, ``split``, ``image_index``, ``arch``, ``weights``,
    ``loss``, ``preset`` …), ``status``/``error``, the scores ``mse``, ``psnr``, ``ssim``, ``lpips``
    (NaN where not computed, with ``lpips_reason``), ``matching_loss``, timings, and for every proxy and
    flavour the value column ``{flavour}_{proxy}`` (see :func:`proxy_column`) and a boolean
    ``{flavour}_{proxy}_converged``. ``study`` keeps only that study's jobs; ``include_errors`` keeps
    failed jobs; ``with_images`` adds the PNG bytes ``reconstruction_png`` and ``truth_png``.
    """
    with open_store(db, readonly=True) as store:
        rows = store.job_rows(study=study, status=None if include_errors else "done", with_images=with_images)
        proxies = store.proxy_rows([r["job_key"] for r in rows]) if rows else []
    return _frame(rows, proxies)


def load_proxies(db: str | os.PathLike) -> pd.DataFrame:
    """The ``proxies`` table in long format (job_key, proxy, flavour, method, value, residual,
    converged, iterations, seconds, note)."""
    with open_store(db, readonly=True) as store:
        return pd.DataFrame(store.proxy_rows(), columns=["job_key", "proxy", "flavour", "method", "value",
                                                         "residual", "converged", "iterations", "seconds",
                                                         "note"])


def _frame(rows: list[dict], proxies: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for column in ("mse", "psnr", "ssim", "lpips", "matching_loss", "attack_seconds", "proxy_exact_seconds",
                   "proxy_paper_seconds", "job_seconds"):
        if column in df:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    if proxies:
        long = pd.DataFrame(proxies)
        long["value"] = pd.to_numeric(long["value"], errors="coerce").astype(float)
        long["column"] = long["flavour"] + "_" + long["proxy"]
        values = long.pivot(index="job_key", columns="column", values="value")
        converged = long.pivot(index="job_key", columns="column", values="converged")
        converged = converged.astype(float).fillna(0).astype(bool).add_suffix("_converged")
        df = df.join(values, on="job_key").join(converged, on="job_key")
    return df


# --------------------------------------------------------------------------------------------
# Analysis


def _rank_correlation(name: str, x: Iterable[float], y: Iterable[float], minimum: int) -> tuple[float, float, int]:
    """``scipy.stats.<name>`` over the pairs where neither value is NaN: (statistic, p-value, pairs);
    NaN when fewer than ``minimum`` pairs or either side is constant."""
    from scipy import stats

    a = np.asarray(list(x), dtype=float)
    b = np.asarray(list(y), dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < minimum or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan, math.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = getattr(stats, name)(a, b)
    return float(result.statistic), float(result.pvalue), n


def spearman(x: Iterable[float], y: Iterable[float]) -> tuple[float, float, int]:
    """Spearman's σ_S and its p-value (``scipy.stats.spearmanr``) over the pairs where neither value is
    NaN, and the number of pairs; NaN when fewer than 3 pairs or either side is constant."""
    return _rank_correlation("spearmanr", x, y, 3)


def kendall(x: Iterable[float], y: Iterable[float]) -> tuple[float, float, int]:
    """Kendall's τ and p-value (``scipy.stats.kendalltau``) over the pairs without NaN, and their count
    (NaN when fewer than 2 pairs or either side is constant)."""
    return _rank_correlation("kendalltau", x, y, 2)


CELL = ["dataset", "loss", "arch", "image_index"]


def check_one_configuration(df: pd.DataFrame) -> None:
    """Refuse results in which one image was attacked more than once with the same loss on the same
    architecture (jobs of several study configurations, e.g. two step counts, in one database):
    correlations and rankings over them would count that image twice or pick one at random."""
    if df.empty or not set(CELL) <= set(df.columns):
        return
    repeated = df[df.duplicated(CELL, keep=False)]
    if repeated.empty:
        return
    first = repeated.iloc[0]
    studies = sorted({str(v) for v in repeated.get("study", pd.Series(dtype=str)).dropna()})
    raise ConfigError(f"{repeated.groupby(CELL).ngroups} (image, architecture, loss) cells have results from more than "
                      f"one configuration (e.g. image {int(first['image_index'])} on {first['arch']} with "
                      f"{first['loss']}); studies involved: {', '.join(studies) or 'unnamed'}. Read one study "
                      f"(--study NAME) or keep each configuration in its own database")


def spearman_table(df: pd.DataFrame, proxy_flavour: str = "exact", *, scores: Sequence[str] = SCORES,
                   proxies: Sequence[str] | None = None) -> pd.DataFrame:
    """σ_S between each proxy and each score, per (dataset, attack loss, architecture), and averaged.

    Args:
        df: jobs as from :func:`load_results` (columns ``dataset``, ``loss``, ``arch``, the scores and
            ``{flavour}_{proxy}``).
        proxy_flavour: ``exact`` or ``paper``.
        scores: score columns (``mse``, ``ssim``, ``psnr``, ``lpips``).
        proxies: proxy names (default: every proxy of the flavour in ``df``).

    Returns:
        Long DataFrame with columns ``flavour, dataset, loss, arch, proxy, score, rho, p, n``. Rows with
        ``arch == "mean"`` hold the paper's final metric: the mean over architectures of the per-arch
        σ_S (architectures whose σ_S is undefined are left out; ``n`` then counts the architectures
        averaged and ``p`` is NaN).
    """
    columns = ["flavour", "dataset", "loss", "arch", "proxy", "score", "rho", "p", "n"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    check_one_configuration(df)
    names = list(proxies) if proxies is not None else proxy_names(df, proxy_flavour)
    missing = [p for p in names if proxy_column(p, proxy_flavour) not in df]
    if missing:
        raise ConfigError(f"no {proxy_flavour} values of proxies {missing} in these results")
    out = []
    for (dataset, loss), group in df.groupby(["dataset", "loss"], sort=True):
        for proxy in names:
            for score in scores:
                per_arch = []
                for arch, sub in group.groupby("arch", sort=True):
                    values = sub[score] if score in sub else pd.Series(np.nan, index=sub.index)
                    rho, p, n = spearman(sub[proxy_column(proxy, proxy_flavour)], values)
                    out.append((proxy_flavour, dataset, loss, arch, proxy, score, rho, p, n))
                    per_arch.append(rho)
                finite = [r for r in per_arch if not math.isnan(r)]
                mean = float(np.mean(finite)) if finite else math.nan
                out.append((proxy_flavour, dataset, loss, MEAN_ARCH, proxy, score, mean, math.nan, len(finite)))
    return pd.DataFrame(out, columns=columns)


def loss_label(loss: str) -> str:
    """The paper's label of an attack loss (``l2`` → ``L2``, ``cos`` → ``CS``)."""
    return LOSS_LABELS.get(loss, loss.upper())


def _row_order(pair: tuple[str, str]) -> tuple:
    """Sort key of (dataset, loss) rows: by dataset, then L2, CS, then any other loss by name."""
    dataset, loss = pair
    known = list(LOSS_LABELS)
    return dataset, known.index(loss) if loss in known else len(known), loss


def _cell(values: Sequence[float]) -> str:
    return " / ".join("n/a" if v is None or math.isnan(v) else f"{v:.2f}" for v in values)


def table1(df: pd.DataFrame, proxy_flavour: str = "exact", *, proxies: Sequence[str] | None = None,
           table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1's layout: rows ``<dataset>+<L2|CS>``, columns the proxies (``grad_norm``, ``l2_max``,
    ``l2_min``, ``cos_max``, ``cos_min``, then any other but ``fusion``); each cell is the σ_S averaged
    over architectures, "MSE / SSIM / PSNR / LPIPS", with ``n/a`` where undefined (LPIPS not computed)."""
    if proxies is None:
        proxies = [p for p in proxy_names(df, proxy_flavour) if p != "fusion"]
    return _layout(df, proxy_flavour, list(proxies), table)


def table3(df: pd.DataFrame, proxy_flavour: str = "exact", *, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 3's layout: ``grad_norm`` against the loss-agnostic ``fusion`` sqrt(l2_max · cos_min)."""
    proxies = [p for p in ("grad_norm", "fusion") if proxy_column(p, proxy_flavour) in df]
    return _layout(df, proxy_flavour, proxies, table)


def _layout(df: pd.DataFrame, flavour: str, proxies: list[str], table: pd.DataFrame | None) -> pd.DataFrame:
    if df.empty or not proxies:
        return pd.DataFrame(columns=proxies)
    table = spearman_table(df, flavour, proxies=proxies) if table is None else table
    mean = table[(table["arch"] == MEAN_ARCH) & (table["flavour"] == flavour)]
    rho = {(r.dataset, r.loss, r.proxy, r.score): r.rho for r in mean.itertuples()}
    rows, labels = [], []
    for dataset, loss in sorted({(d, lo) for d, lo in zip(df["dataset"], df["loss"], strict=True)}, key=_row_order):
        labels.append(f"{dataset}+{loss_label(loss)}")
        rows.append([_cell([rho.get((dataset, loss, p, s), math.nan) for s in SCORES]) for p in proxies])
    return pd.DataFrame(rows, index=pd.Index(labels, name="σ_S"), columns=proxies)


def recipe_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """How well the paper's recipe reproduces the exact values, per (dataset, arch, proxy): σ_S between
    the two flavours over the images, the median relative difference |paper − exact| / |exact|, and the
    fraction of recipe values and of exact values certified converged (an exact λ_min below float64's
    resolution, about 1e-16·λ_max, is computed but cannot be certified to a relative tolerance). One
    row per image and model (jobs sharing proxies are counted once)."""
    columns = ["dataset", "arch", "proxy", "rho", "median_rel_diff", "paper_converged", "exact_converged", "n"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    common = [p for p in proxy_names(df, "exact") if p in proxy_names(df, "paper")]
    unique = df.drop_duplicates("proxy_key")
    out = []
    for (dataset, arch), sub in unique.groupby(["dataset", "arch"], sort=True):
        for proxy in common:
            exact = sub[proxy_column(proxy, "exact")].to_numpy(float)
            paper = sub[proxy_column(proxy, "paper")].to_numpy(float)
            rho, _, n = spearman(exact, paper)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.abs(paper - exact) / np.abs(exact)
            rel = rel[np.isfinite(rel)]
            fractions = []
            for flavour in ("paper", "exact"):  # the order of the columns
                conv = sub.get(proxy_column(proxy, flavour) + "_converged")
                fractions.append(float(conv.mean()) if conv is not None and len(conv) else math.nan)
            out.append((dataset, arch, proxy, rho, float(np.median(rel)) if rel.size else math.nan,
                        *fractions, n))
    return pd.DataFrame(out, columns=columns)


def findings(table: pd.DataFrame) -> list[str]:
    """Plain statements of what the σ_S table says: for each (dataset, attack loss) and flavour, the
    averaged σ_S with MSE of ``grad_norm`` and of that loss's own LAVP (λ_max, λ_min), and whether each
    LAVP correlates more strongly than the gradient norm (larger |σ_S|)."""
    from .proxies import proxy_key

    lines = []
    mean = table[(table["arch"] == MEAN_ARCH) & (table["score"] == "mse")]
    rho = {(r.flavour, r.dataset, r.loss, r.proxy): r.rho for r in mean.itertuples()}
    flavours = [f for f in FLAVOURS if f in set(mean["flavour"])]
    for dataset, loss in sorted({(r.dataset, r.loss) for r in mean.itertuples()}, key=_row_order):
        for flavour in flavours:
            base = rho.get((flavour, dataset, loss, "grad_norm"), math.nan)
            parts, verdicts = [f"grad_norm {_signed(base)}"], []
            for extreme in ("max", "min"):
                name = proxy_key(loss, extreme)
                value = rho.get((flavour, dataset, loss, name))
                if value is None:
                    continue
                parts.append(f"{name} {_signed(value)}")
                if math.isnan(value) or math.isnan(base):
                    verdicts.append(f"{name}: undefined")
                else:
                    verdicts.append(f"{name} {'beats' if abs(value) > abs(base) else 'does not beat'} grad_norm")
            lines.append(f"{dataset}+{loss_label(loss)} ({flavour}): σ_S with MSE: {', '.join(parts)}; "
                         f"{'; '.join(verdicts)}")
    return lines


def _signed(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.2f}"


def rankings(df: pd.DataFrame, images: Sequence[int], *, proxy_flavour: str = "exact", arch: str | None = None,
             dataset: str | None = None, proxies: Sequence[str] | None = None) -> pd.DataFrame:
    """The data behind Figure 1b/1c for the chosen image indices, per (dataset, architecture).

    Rows of kind ``observed``: each attack loss's MSE ranking (largest MSE first, as "D > B > C > A").
    Rows of kind ``predicted``: each proxy's ranking (largest value first: the paper expects larger
    proxies for worse reconstructions). Columns ``tau_<loss>`` / ``p_<loss>``: Kendall's τ
    (``scipy.stats.kendalltau``) between the row's values and that loss's MSE over the images.
    """
    if df.empty:
        raise ConfigError("no finished jobs to rank")
    images = [int(i) for i in images]
    if len(images) < 2:
        raise ConfigError("rankings need at least two image indices, e.g. --images 0,5,9,12")
    check_one_configuration(df)
    sub = df[df["image_index"].isin(images)]
    if arch is not None:
        sub = sub[sub["arch"] == arch]
    if dataset is not None:
        sub = sub[sub["dataset"] == dataset]
    found = sorted(set(sub["image_index"]))
    if len(found) < 2:
        scope = df if arch is None else df[df["arch"] == arch]
        available = sorted(set(scope["image_index"]))
        shown = ", ".join(str(i) for i in available[:20]) + (" …" if len(available) > 20 else "")
        raise ConfigError(f"rankings need finished jobs for at least two of the images {images}"
                          + (f" on {arch}" if arch else "") + f"; images with results: {shown or 'none'}")
    names = list(proxies) if proxies is not None else proxy_names(sub, proxy_flavour)
    out = []
    for (ds, model), group in sub.groupby(["dataset", "arch"], sort=True):
        losses = sorted(set(group["loss"]))
        mse = {loss: group[group["loss"] == loss].set_index("image_index")["mse"].reindex(images)
               for loss in losses}
        rows: list[tuple[str, str, pd.Series]] = [("observed", f"MSE ({loss_label(loss)})", mse[loss])
                                                   for loss in losses]
        per_image = group.drop_duplicates("image_index").set_index("image_index").reindex(images)
        rows += [("predicted", p, per_image[proxy_column(p, proxy_flavour)]) for p in names]
        for kind, name, values in rows:
            record = {"dataset": ds, "arch": model, "kind": kind, "name": name, "ranking": _ranking(values)}
            for loss in losses:
                tau, p, _ = kendall(values.to_numpy(float), mse[loss].to_numpy(float))
                record[f"tau_{loss}"], record[f"p_{loss}"] = tau, p
            out.append(record)
    return pd.DataFrame(out)


def _ranking(values: pd.Series) -> str:
    known = values.dropna().sort_values(ascending=False, kind="stable")
    text = " > ".join(str(int(i)) for i in known.index)
    missing = [str(int(i)) for i in values.index if pd.isna(values.get(i))]
    return text + (f" (missing: {', '.join(missing)})" if missing else "")


# --------------------------------------------------------------------------------------------
# Reports


def _markdown(frame: pd.DataFrame, index: bool = True) -> str:
    """A pipe table without the optional ``tabulate`` dependency."""
    header = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for label, row in zip(frame.index, frame.itertuples(index=False), strict=True):
        cells = ([str(label)] if index else []) + [_text(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _text(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def _flavours(df: pd.DataFrame, flavours: Sequence[str]) -> list[str]:
    return [f for f in flavours if proxy_names(df, f)]


def report_data(df: pd.DataFrame, flavours: Sequence[str] = FLAVOURS) -> dict:
    """Everything the report shows, as plain data: Table 1 and Table 3 per flavour (cells of σ_S averaged
    over architectures, "MSE / SSIM / PSNR / LPIPS"), the long σ_S table with per-architecture p-values,
    the recipe-vs-exact agreement and the findings."""
    if df.empty:
        raise StoreError("no finished jobs in these results; run a study first")
    flavours = _flavours(df, flavours)
    long = pd.concat([spearman_table(df, f) for f in flavours], ignore_index=True) if flavours else \
        pd.DataFrame(columns=["flavour", "dataset", "loss", "arch", "proxy", "score", "rho", "p", "n"])
    archs = sorted(set(df["arch"]))
    lpips_reasons = sorted({r for r in df.get("lpips_reason", pd.Series(dtype=object)).dropna() if r})
    return {
        "jobs": int(len(df)),
        "archs": archs,
        "images": {f"{d}+{loss_label(lo)}": int(n) for (d, lo), n in
                   df.groupby(["dataset", "loss"])["image_index"].nunique().items()},
        "flavours": flavours,
        "table1": {f: table1(df, f, table=long) for f in flavours},
        "table3": {f: table3(df, f, table=long) for f in flavours},
        "spearman": long,
        "agreement": recipe_agreement(df) if set(FLAVOURS) <= set(flavours) else pd.DataFrame(),
        "findings": findings(long) if flavours else [],
        "lpips_reasons": lpips_reasons,
    }


def format_report(df: pd.DataFrame, fmt: str = "md", *, flavours: Sequence[str] = FLAVOURS,
                  per_arch: bool = False) -> str:
    """The report as Markdown (``md``), CSV (``csv``: the Table 1 and Table 3 layouts stacked, with
    ``table`` and ``flavour`` columns) or JSON (``json``: everything, including the long σ_S table)."""
    if fmt not in ("md", "csv", "json"):
        raise ConfigError(f"unknown report format {fmt!r}: choose md, csv or json")
    data = report_data(df, flavours)
    if fmt == "json":
        payload = {k: v for k, v in data.items() if k not in ("table1", "table3", "spearman", "agreement")}
        payload["table1"] = {f: t.to_dict(orient="index") for f, t in data["table1"].items()}
        payload["table3"] = {f: t.to_dict(orient="index") for f, t in data["table3"].items()}
        payload["spearman"] = _records(data["spearman"])
        payload["agreement"] = _records(data["agreement"])
        return json.dumps(payload, indent=1, ensure_ascii=False)
    if fmt == "csv":
        parts = []
        for name in ("table1", "table3"):
            for flavour, table in data[name].items():
                frame = table.reset_index().rename(columns={"σ_S": "row"})
                frame.insert(0, "flavour", flavour)
                frame.insert(0, "table", name)
                parts.append(frame)
        return pd.concat(parts, ignore_index=True).to_csv(index=False) if parts else ""
    lines = [f"# Proxy evaluation: {data['jobs']} jobs, architectures {', '.join(data['archs'])}", "",
             "σ_S is Spearman's correlation over the images of one (dataset, attack loss, architecture), averaged "
             "over the architectures (the paper's evaluation metric). Cells: MSE(↓) / SSIM(↑) / PSNR(↑) / "
             "LPIPS(↓); n/a where undefined.",
             "Images per row: " + ", ".join(f"{k} {v}" for k, v in data["images"].items()) + "."]
    if data["lpips_reasons"]:
        lines.append(f"LPIPS unavailable: {data['lpips_reasons'][0]}")
    titles = {"exact": "exact eigenvalues", "paper": "the paper's recipe (finite differences + power iteration)"}
    for flavour in data["flavours"]:
        lines += ["", f"## Table 1: proxies, {titles[flavour]}", "", _markdown(data["table1"][flavour])]
    for flavour in data["flavours"]:
        lines += ["", f"## Table 3: gradient norm vs LAVP fusion, {titles[flavour]}", "",
                  _markdown(data["table3"][flavour])]
    if not data["agreement"].empty:
        agreement = data["agreement"].copy()
        lines += ["", "## Paper recipe vs exact values", "",
                  "rho: σ_S between the two flavours over the images; median_rel_diff: median |paper − exact| / "
                  "|exact|; paper_converged / exact_converged: fraction of values certified within the solver "
                  "tolerance (relative residual; an exact λ_min at float64's resolution, ~1e-16·λ_max, is not).",
                  "",
                  _markdown(agreement, index=False)]
    if data["findings"]:
        lines += ["", "## What the data says", ""] + [f"- {line}" for line in data["findings"]]
    if per_arch:
        long = data["spearman"]
        lines += ["", "## σ_S per architecture (with p-values)", "",
                  _markdown(long[long["arch"] != MEAN_ARCH], index=False)]
    return "\n".join(lines) + "\n"


def format_rankings(table: pd.DataFrame, fmt: str = "md") -> str:
    """The rankings table (see :func:`rankings`) as Markdown, CSV or JSON."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return json.dumps(_records(table), indent=1, ensure_ascii=False)
    if fmt != "md":
        raise ConfigError(f"unknown report format {fmt!r}: choose md, csv or json")
    lines = []
    for (dataset, arch), group in table.groupby(["dataset", "arch"], sort=True):
        lines += [f"## Rankings on {dataset}, {arch}", "",
                  "Observed: MSE ranking under each attack loss (largest MSE first); predicted: each proxy's "
                  "ranking (largest first). τ: Kendall's τ with the MSE under that loss.", "",
                  _markdown(group.drop(columns=["dataset", "arch"]), index=False), ""]
    return "\n".join(lines)


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def parse_images(text: str) -> int | tuple[int, ...]:
    """``"100"`` → a count of 100 images; ``"0,5,9"`` (or ``"5,"``) → those indices."""
    text = text.strip()
    try:
        if "," in text:
            return tuple(int(part) for part in text.split(",") if part.strip())
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"--images takes a count (e.g. 100) or comma-separated indices (e.g. 0,5,9), "
                          f"got {text!r}") from exc


def open_results(db: str | os.PathLike) -> ResultStore:
    """The results database opened read-only (for the app)."""
    return open_store(db, readonly=True)


def summarise(summary: StudySummary) -> str:
    """One line describing a finished study run."""
    text = (f"study {summary.name}: {summary.total} jobs; {summary.stored_before} already stored; run now "
            f"{summary.run} ({summary.done} done, {summary.errors} failed"
            + (f", {summary.kept} stored meanwhile by another study" if summary.kept else "")
            + f") in {summary.seconds:.0f} s with {summary.workers} worker(s) x {summary.threads} thread(s)")
    if summary.run:
        text += f", {summary.jobs_per_minute:.2f} jobs/min"
    return text + f"; results in {summary.db}"


__all__ = [
    "StudyConfig", "Job", "StudyPlan", "StudySummary", "JobOutcome", "SharedProxies", "plan_study", "execute_job",
    "run_study", "default_workers", "load_results", "load_proxies", "proxy_column", "proxy_names", "spearman",
    "kendall", "spearman_table", "table1", "table3", "recipe_agreement", "findings", "rankings", "report_data",
    "format_report", "format_rankings", "parse_images", "open_results", "summarise", "loss_label",
]
