"""Running a study: :func:`run_study` checks the plan, reads what the database already holds, hands the
pending jobs to an *executor* and stores each outcome as it comes back (only this process writes the
store).

An executor is one function registered by name (:func:`register_executor`; ``run_study(...,
executor=NAME)`` looks it up with :func:`get_executor`). It follows :class:`Executor`: run every job
of ``jobs``, passing ``shared.get(job.proxy_key)`` (read when the job starts) as the proxies to reuse,
and call ``record(outcome, job)`` in the calling process, one outcome at a time, as jobs end. ``record``
stores the row and, when the job computed its proxies, adds them to ``shared`` for later jobs of the
same ``proxy_key``; so an executor should hold back a job whose proxy key a job in flight is computing
(or accept computing them twice). An executor never opens the store and never raises for a failing
job: it records :func:`~lavp_core.study.job.failed_outcome` instead. Only ``local`` (this machine's
cores, :func:`run_local`) exists; another backend (a Ray cluster, say) is one module that registers
itself and is imported by ``lavp_core/study/__init__.py``.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError
from ..store import open_store
from ..system import available_cores
from .job import JobOutcome, SharedProxies, execute_job, failed_outcome
from .plan import Job, StudyConfig, StudyPlan, plan_study

Record = Callable[[JobOutcome, Job], None]
"""Stores one outcome (and shares its proxies); called by an executor in the calling process."""


class Executor(Protocol):
    def __call__(self, jobs: Sequence[Job], shared: Mapping[str, SharedProxies], record: Record, *,
                 workers: int, threads: int, device: str) -> None:
        """Run ``jobs`` (``workers`` at a time, ``threads`` torch threads each, on ``device``) and
        ``record`` each outcome as it ends; see the module docstring for the contract."""


_EXECUTORS: dict[str, Executor] = {}


def register_executor(name: str) -> Callable[[Executor], Executor]:
    """Decorator: register ``fn`` (an :class:`Executor`) as the study executor ``name``."""

    def wrap(fn: Executor) -> Executor:
        _EXECUTORS[name] = fn
        return fn

    return wrap


def get_executor(name: str) -> Executor:
    """The executor registered as ``name``; ConfigError naming the registered ones otherwise."""
    if name not in _EXECUTORS:
        raise ConfigError(f"unknown study executor {name!r}: choose one of {', '.join(_EXECUTORS)}")
    return _EXECUTORS[name]


def list_executors() -> list[str]:
    """Names of the registered study executors."""
    return list(_EXECUTORS)


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


def default_workers(threads: int = 1) -> int:
    """Worker processes that fit the cores with ``threads`` torch threads each (no oversubscription)."""
    return max(1, available_cores() // max(1, int(threads)))


def run_study(config: StudyConfig | StudyPlan, db: str | os.PathLike, *, workers: int | None = None,
              threads: int = 1, device: str = "cpu", progress: bool = True,
              on_job: Callable[[JobOutcome, str], None] | None = None, executor: str = "local") -> StudySummary:
    """Run the jobs of ``config`` that are not finished in ``db`` and store each one as it ends.

    Args:
        config: the study (validated by :func:`~lavp_core.study.plan.plan_study` before anything runs or
            is written).
        db: the results database (created when missing).
        workers: jobs run at once; for ``local``, worker processes (``spawn`` context), default
            :func:`default_workers` of ``threads``, and ``0`` runs the jobs in this process (no torch
            thread setting is changed).
        threads: torch threads of each worker.
        device: ``cpu`` or ``cuda``.
        progress: show a tqdm bar with ETA on stderr.
        on_job: called with each outcome and the store's action (``inserted``/``replaced``/``kept``).
        executor: the registered executor that runs the jobs (:func:`list_executors`): ``local``.

    Returns:
        A :class:`StudySummary`. A job that fails is stored with ``status = 'error'`` and the study
        goes on; rerunning retries it (its row is the only kind ever replaced).
    """
    plan = config if isinstance(config, StudyPlan) else plan_study(config)
    run_jobs = get_executor(executor)
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
            run_jobs(pending, shared, record, workers=workers, threads=threads, device=device)
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


# --------------------------------------------------------------------------------------------
# The local executor: this process, or a pool of spawned worker processes on this machine


@register_executor("local")
def run_local(jobs: Sequence[Job], shared: Mapping[str, SharedProxies], record: Record, *, workers: int,
              threads: int, device: str) -> None:
    """Run ``jobs`` on this machine: one by one in this process when ``workers`` is 0 (its torch
    threads untouched), else in a pool of ``workers`` spawned processes with ``threads`` torch threads
    each (see :func:`_run_pool`)."""
    if workers == 0:
        for job in jobs:
            record(execute_job(job, shared.get(job.proxy_key), device), job)
    else:
        _run_pool(list(jobs), shared, record, workers, threads, device)


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


def _run_pool(pending: list[Job], shared: Mapping[str, SharedProxies], record: Record, workers: int,
              threads: int, device: str) -> None:
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
                    outcome = failed_outcome(job, f"worker process died ({exc}); out of memory? rerun the study "
                                                   f"to retry this job")
                except Exception as exc:  # e.g. a result that could not be sent back
                    outcome = failed_outcome(job, f"{type(exc).__name__}: {exc}")
                record(outcome, job)
            if broken:  # every job still in flight died with the pool: record them, start a new pool
                for _future, job in list(inflight.items()):
                    record(failed_outcome(job, "worker process died with another job's worker; rerun the study "
                                               "to retry this job"), job)
                    computing.discard(job.proxy_key)
                inflight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)

