"""The ``ray`` study executor: each job runs as a Ray task on a Ray cluster; this process (the driver)
alone writes the results database, one row as each task ends.

* Where: ``address`` names an existing cluster (``"auto"``: ``$RAY_ADDRESS``, else the one started on
  this machine with ``ray start``; ``"HOST:PORT"``: its head). Without one, a local Ray instance is
  started for the run with this machine's cores and stopped at the end. A process that already called
  ``ray.init`` keeps its cluster.
* Resources: a task reserves ``num_cpus = threads`` (and runs with that many torch threads) and, when
  ``device`` is CUDA, ``num_gpus = 1`` (Ray gives each task its own GPU as ``cuda``).
* How many at once: ``workers`` tasks, or with ``workers = 0`` (the default) as many as the alive
  nodes have CPUs (GPUs) for, re-read as nodes come and go. A job whose proxies a task in flight is
  computing waits for them, as in the local pool.
* Shared inputs go to the cluster once: each checkpoint file a job needs (``trained``, ``trained@E``
  or a path on the driver's machine) is read here, checked against the SHA-256 the plan recorded,
  and ``ray.put`` once; a worker writes it to a local cache file and builds the model from it. Images
  and random weights are recreated on the worker from the job's configuration, as the local pool does.
* Failures: a task whose worker process or node dies is retried by Ray (``max_retries``, default 2)
  and then stored as an error row that says why; a job that fails in its own code is stored as an
  error at once (``execute_job`` does that). Killing the driver loses only the jobs in flight: Ray
  cancels the tasks of a driver that is gone, and their leases expire.
* Output: progress shows as for the local pool (the driver's bar). Ray's own messages (a node marked
  dead, a task retried) go to stderr while the run lasts, as does anything else printed to stdout then.

Every node needs this project importable at the driver's working directory or installed (Ray puts the
driver's working directory on the workers' ``sys.path``), with the same Python packages, and the
on-disk datasets (``data_root``) where the job's configuration says. ``import ray`` happens only
when a study runs on this executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError
from ..system import available_cores
from .executors import Claim, Record, register_executor
from .job import JobOutcome, SharedProxies, execute_job, failed_outcome
from .plan import Job

MAX_RETRIES = 2
"""Times Ray runs a job again after its worker process or node died, before it is stored as an error."""
CHECKPOINT_CACHE = "lavp-ray-checkpoints"
"""Folder (in the worker's temporary directory) where shipped checkpoints are written, by SHA-256."""


def _uses_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _slots(ray, threads: int, cuda: bool) -> int:
    """Jobs the alive nodes can run at once: their CPUs // ``threads`` (or their GPUs)."""
    total = 0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            total += int(resources.get("GPU", 0)) if cuda else int(resources.get("CPU", 0) // threads)
    return total


def _check_feasible(ray, threads: int, cuda: bool) -> None:
    """ConfigError when no alive node could run one task (it would wait in Ray's queue for ever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= threads and (not cuda or r.get("GPU", 0) >= 1) for r in nodes):
        largest = max((r.get("CPU", 0) for r in nodes), default=0)
        gpus = sum(r.get("GPU", 0) for r in nodes)
        need = f"{threads} CPUs" + (" and a GPU" if cuda else "")
        raise ConfigError(f"no node of the Ray cluster has {need} for one job (largest node: {largest:g} CPUs; "
                          f"{gpus:g} GPUs in all); lower --threads, use --device cpu, or add such a node")


def _connect(ray, address: str | None) -> bool:
    """Connect to the cluster (or start a local instance); True when this call did it (so the run
    disconnects at its end)."""
    if ray.is_initialized():
        return False
    import logging

    options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:  # "local": a new instance, even where ray start ran or $RAY_ADDRESS is set
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance reports nowhere
        options["num_cpus"] = available_cores()
    elif "RAY_AUTH_MODE" not in os.environ and _auth_token_available():
        # 'ray start' turns token authentication on where a token exists (one is made by any local
        # ray.init); a driver must then send it, which Ray does only in token mode (it works with a
        # cluster without authentication too)
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        ray.init(address="local" if address is None else address, **options)
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} ({exc}); start one with 'ray start --head' "
                          f"(see README, 'Running a study on a Ray cluster') or omit --address to start a local "
                          f"one") from exc
    return True


def _worker_env() -> dict:
    """The tasks' runtime environment: this project's folder on ``PYTHONPATH``, so a worker imports
    ``lavp_core`` from where the driver's copy lives (the same path on every node) whatever the
    driver's working directory."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def _task_error(exc: BaseException) -> str:
    """A one-paragraph reason for a task that failed outside the job's own code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("^|~ ")]
    reason = f"{type(exc).__name__}: {' / '.join(lines[:3])[:400]}"
    if "No module named" in text:
        reason += (" (every Ray node needs this project at the driver's path or installed, with the same "
                   "packages: see README, 'Running a study on a Ray cluster')")
    return reason


def _auth_token_available() -> bool:
    """Whether Ray would find an authentication token here ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _checkpoint(job: Job) -> Path | None:
    """The checkpoint file ``job`` builds its model from (``None`` for random weights)."""
    if job.weights == "random":
        return None
    from ..models import checkpoint_for

    return checkpoint_for(job.arch, job.weights, job.dataset)


_CACHE_FOLDER: Path | None = None


def checkpoint_cache_folder() -> Path:
    """This worker process's checkpoint cache: a private folder (``tempfile.mkdtemp``: 0700, this user's,
    a fresh name nobody could have planted) made on first use and removed when the process exits."""
    global _CACHE_FOLDER
    if _CACHE_FOLDER is None or not _CACHE_FOLDER.is_dir():
        import atexit
        import shutil

        _CACHE_FOLDER = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_CACHE}-"))
        atexit.register(shutil.rmtree, _CACHE_FOLDER, ignore_errors=True)
    return _CACHE_FOLDER


def _cached_checkpoint(checkpoint: bytes, sha256: str | None) -> Path:
    """The shipped checkpoint as a file in the private cache; a cached file is used only if its SHA-256 is
    the one the plan recorded, and a new one is written under a fresh name, then moved into place."""
    from ..hashing import sha256_file

    folder = checkpoint_cache_folder()
    path = folder / f"{sha256}.pt"
    if path.is_file() and not path.is_symlink() and sha256_file(path) == sha256:
        return path
    partial = folder / f"{sha256}.{os.getpid()}.{os.urandom(4).hex()}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(checkpoint)
    os.replace(partial, path)
    return path


def run_job_on_worker(job: Job, shared: SharedProxies | None, device: str, threads: int,
                      checkpoint: bytes | None, engine: str = "auto") -> JobOutcome:
    """A Ray task: run ``job`` here with ``threads`` torch threads, its model built from the shipped
    ``checkpoint`` bytes when it has one (the row still names the job's own ``weights``)."""
    import torch

    torch.set_num_threads(threads)
    run = job
    if checkpoint is not None:
        path = _cached_checkpoint(checkpoint, job.weights_sha256)
        run = dataclasses.replace(job, weights=str(path))
    outcome = execute_job(run, shared, device, engine)
    outcome.row["weights"] = job.weights
    return outcome


def _lost_reason(exc: BaseException, retries: int) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"Ray lost this job's worker ({type(exc).__name__}{': ' + first[:200] if first else ''}) "
            f"after {retries} retr{'y' if retries == 1 else 'ies'}; rerun the study to retry it")


@register_executor("ray", default_workers=lambda threads: 0)
def run_ray(jobs: Sequence[Job], shared: Mapping[str, SharedProxies], record: Record, *, workers: int,
            threads: int, device: str, engine: str = "auto", claim: Claim | None = None, address: str | None = None,
            max_retries: int = MAX_RETRIES) -> int:
    """Run ``jobs`` as Ray tasks (see the module docstring) and ``record`` each outcome here as it
    arrives.

    Args:
        jobs, shared, record, claim: as for every executor (:mod:`.executors`).
        workers: tasks in flight at once; ``0``: as many as the cluster has room for.
        threads: CPUs each task reserves and torch threads it runs.
        device: ``cpu``, or ``cuda`` (each task reserves one GPU).
        engine: how each task's attack evaluates its steps (see :func:`~lavp_core.study.run_study`).
        address: the cluster (``"auto"`` or ``"HOST:PORT"``); ``None`` starts a local instance.
        max_retries: Ray's retries of a task whose worker or node died.

    Returns:
        The most tasks that were in flight at once.
    """
    import ray

    # Ray prints the cluster's own messages (e.g. a node marked dead) on the driver's stdout: send them,
    # and whatever else prints during the run, to stderr, so that stdout keeps what the caller prints
    with contextlib.redirect_stdout(sys.stderr):
        started = _connect(ray, address)
        try:
            _check_feasible(ray, threads, _uses_cuda(device))
            return _run_tasks(ray, list(jobs), shared, record, claim, workers=workers, threads=threads,
                              device=device, engine=engine, max_retries=max_retries)
        finally:
            if started:
                ray.shutdown()


def _run_tasks(ray, queue: list[Job], shared: Mapping[str, SharedProxies], record: Record, claim: Claim | None, *,
               workers: int, threads: int, device: str, engine: str, max_retries: int) -> int:
    """The driver's loop: keep the cluster busy, record each outcome as it arrives; the most in flight."""
    from ray import exceptions as ray_errors

    cuda = _uses_cuda(device)
    task = ray.remote(run_job_on_worker).options(num_cpus=threads, num_gpus=1 if cuda else 0, max_retries=max_retries,
                                                 retry_exceptions=False, runtime_env=_worker_env())
    worker_device = "cuda" if cuda else device
    checkpoints: dict[Path, object] = {}  # checkpoint file -> its ObjectRef (put once)
    computing: set[str] = set()  # proxy keys being computed by a task in flight
    inflight: dict[object, Job] = {}
    most = 0
    while queue or inflight:
        limit = max(1, workers or _slots(ray, threads, cuda))
        while len(inflight) < limit:
            pick = next((i for i, j in enumerate(queue) if j.proxy_key in shared or j.proxy_key not in computing),
                        None)
            if pick is None:
                break
            job = queue.pop(pick)
            if claim is not None and not claim(job):
                continue
            try:
                blob = _ship_checkpoint(ray, job, checkpoints)
            except Exception as exc:  # a checkpoint that cannot be read, or changed since the plan
                record(failed_outcome(job, f"{type(exc).__name__}: {exc}"), job)
                continue
            reuse = shared.get(job.proxy_key)
            if reuse is None:
                computing.add(job.proxy_key)
            inflight[task.remote(job, reuse, worker_device, threads, blob, engine)] = job
        most = max(most, len(inflight))
        if not inflight:
            continue
        finished, _ = ray.wait(list(inflight), num_returns=1)
        for ref in finished:
            job = inflight.pop(ref)
            computing.discard(job.proxy_key)
            try:
                outcome = ray.get(ref)
            except (ray_errors.WorkerCrashedError, ray_errors.NodeDiedError, ray_errors.ObjectLostError,
                    ray_errors.LocalRayletDiedError, ray_errors.OutOfMemoryError) as exc:
                outcome = failed_outcome(job, _lost_reason(exc, max_retries))
            except Exception as exc:  # e.g. the worker cannot import this project
                outcome = failed_outcome(job, _task_error(exc))
            record(outcome, job)
    return most


def _ship_checkpoint(ray, job: Job, checkpoints: dict[Path, object]) -> object | None:
    """The ObjectRef of ``job``'s checkpoint bytes (read and put once per file), or ``None``."""
    path = _checkpoint(job)
    if path is None:
        return None
    if path not in checkpoints:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if job.weights_sha256 is not None and digest != job.weights_sha256:
            raise ConfigError(f"checkpoint {path} changed since the study was planned (SHA-256 {digest[:12]}…, "
                              f"planned {job.weights_sha256[:12]}…); rerun the study to plan it anew")
        checkpoints[path] = ray.put(data)
    return checkpoints[path]
