"""Running a study: :func:`run_study` checks the plan, reads what the database already holds, hands the
pending jobs to an *executor* and stores each outcome as it comes back (only this process writes the
store).

An executor is one function registered by name (:func:`register_executor`; ``run_study(...,
executor=NAME)`` looks it up with :func:`get_executor`). It follows :class:`Executor`: run every job
of ``jobs`` that ``claim(job)`` grants (ask just before starting the job; a job refused is skipped and
not recorded: another runner on the same database holds it or finished it, see :mod:`.leases`),
passing ``shared.get(job.proxy_key)`` (read after the claim) as the proxies to reuse, and call
``record(outcome, job)`` in the calling process, one outcome at a time, as jobs end. ``record``
stores the row, releases the job's lease and, when the job computed its proxies, adds them to
``shared`` for later jobs of the same ``proxy_key``; so an executor should hold back a job whose proxy
key a job in flight is computing (or accept computing them twice). An executor never opens the store
and never raises for a failing job: it records :func:`~lavp_core.study.job.failed_outcome` instead.
An executor that takes no ``claim`` argument still works: its jobs are all claimed before it starts.

Executors: ``local`` (this machine's cores, :func:`run_local`) and ``ray`` (a Ray cluster,
:mod:`.ray_executor`, imported when first asked for, so that nothing else imports ray).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError, StoreError
from ..fast_steps import check_engine
from ..store import open_store
from ..system import available_cores
from .job import JobOutcome, SharedProxies, execute_job, failed_outcome
from .leases import JobLeases
from .plan import Job, StudyConfig, StudyPlan, plan_study

Record = Callable[[JobOutcome, Job], None]
"""Stores one outcome (and shares its proxies); called by an executor in the calling process."""
Claim = Callable[[Job], bool]
"""Claims a job for this runner just before it starts; ``False``: skip it (another runner has it)."""


class Executor(Protocol):
    def __call__(self, jobs: Sequence[Job], shared: Mapping[str, SharedProxies], record: Record, *,
                 workers: int, threads: int, device: str, engine: str,
                 claim: Claim) -> int | None:
        """Run the ``jobs`` that ``claim`` grants (``workers`` at a time, ``threads`` torch threads
        each, on ``device``, attacks stepped by ``engine``) and ``record`` each outcome as it ends;
        see the module docstring for the contract. Executor options
        (``run_study(..., executor_options=...)``) come as further keyword arguments. May return the
        number of jobs it ran at once when it chose it itself."""


_EXECUTORS: dict[str, Executor] = {}
_DEFAULT_WORKERS: dict[str, Callable[[int], int]] = {}
# Executors of this package imported when first asked for: name -> (module, the package it needs).
_LAZY_EXECUTORS: dict[str, tuple[str, str]] = {"ray": (f"{__package__}.ray_executor", "ray")}


def register_executor(name: str, *, default_workers: Callable[[int], int] | None = None
                      ) -> Callable[[Executor], Executor]:
    """Decorator: register ``fn`` (an :class:`Executor`) as the study executor ``name``.
    ``default_workers(threads)`` gives the ``workers`` it gets when the caller sets none (default:
    :func:`default_workers`, this machine's cores // threads)."""

    def wrap(fn: Executor) -> Executor:
        _EXECUTORS[name] = fn
        if default_workers is not None:
            _DEFAULT_WORKERS[name] = default_workers
        return fn

    return wrap


def get_executor(name: str) -> Executor:
    """The executor registered as ``name`` (importing this package's module for it on first use);
    ConfigError naming the registered ones otherwise, or naming the package an executor needs."""
    if name not in _EXECUTORS and name in _LAZY_EXECUTORS:
        module, package = _LAZY_EXECUTORS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"study executor {name!r} needs the {package!r} package, which is not installed: "
                              f"pip install {package} (it is in requirements.txt)")
        importlib.import_module(module)
    if name not in _EXECUTORS:
        raise ConfigError(f"unknown study executor {name!r}: choose one of {', '.join(list_executors())}")
    return _EXECUTORS[name]


def list_executors() -> list[str]:
    """Names of the study executors (those registered and those imported when first asked for)."""
    return list(dict.fromkeys([*_EXECUTORS, *_LAZY_EXECUTORS]))


def _takes_keyword(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@dataclass(frozen=True)
class StudySummary:
    """What :func:`run_study` did. ``stored_before``: jobs already finished in the database;
    ``done``/``errors``: jobs run now that finished/failed; ``kept``: jobs run now whose row another
    study had written meanwhile (that row was kept); ``skipped``: jobs left to another runner on the
    same database (it held a live lease on them, or stored them while this run went on)."""

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
    skipped: int = 0

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
              threads: int = 1, device: str = "cpu", engine: str = "auto", progress: bool = True,
              on_job: Callable[[JobOutcome, str], None] | None = None, executor: str = "local",
              executor_options: Mapping[str, object] | None = None) -> StudySummary:
    """Run the jobs of ``config`` that are not finished in ``db`` and store each one as it ends.

    Each job is claimed with a lease in ``db`` just before it starts (:mod:`.leases`), so several
    runners (processes, machines) on one database share its jobs and compute each once; the lease is
    released when the job's row is written, and a runner that stops early releases the rest.

    Args:
        config: the study (validated by :func:`~lavp_core.study.plan.plan_study` before anything runs or
            is written).
        db: the results database (created when missing).
        workers: jobs run at once; for ``local``, worker processes (``spawn`` context), default
            :func:`default_workers` of ``threads``, and ``0`` runs the jobs in this process (no torch
            thread setting is changed); for ``ray``, default ``0``: as many as the cluster has
            ``threads`` CPUs (or GPUs) for.
        threads: torch threads of each worker (for ``ray``, the CPUs each task reserves).
        device: ``cpu`` or ``cuda``.
        engine: how attacks evaluate their steps (:data:`~lavp_core.fast_steps.ENGINES`); ``auto``
            compiles the steps of long attacks (:func:`~lavp_core.fast_steps.study_engine`).
        progress: show a tqdm bar with ETA on stderr.
        on_job: called with each outcome and the store's action (``inserted``/``replaced``/``kept``).
        executor: the registered executor that runs the jobs (:func:`list_executors`): ``local`` or
            ``ray``.
        executor_options: keyword options of the executor, e.g. ``{"address": "auto"}`` for ``ray``.

    Returns:
        A :class:`StudySummary`. A job that fails is stored with ``status = 'error'`` and the study
        goes on; rerunning retries it (its row is the only kind ever replaced).
    """
    plan = config if isinstance(config, StudyPlan) else plan_study(config)
    run_jobs = get_executor(executor)
    options = dict(executor_options or {})
    for name in options:
        if name in ("claim", "workers", "threads", "device", "engine") or not _takes_keyword(run_jobs, name):
            raise ConfigError(f"study executor {executor!r} takes no option {name!r}")
    if check_engine(engine) != "auto" and not _takes_keyword(run_jobs, "engine"):
        raise ConfigError(f"study executor {executor!r} does not choose an attack engine: leave engine 'auto'")
    threads = int(threads)
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    workers = _DEFAULT_WORKERS.get(executor, default_workers)(threads) if workers is None else int(workers)
    if workers < 0:
        raise ConfigError(f"workers must be 0 (run here) or more, got {workers}")
    began = time.perf_counter()
    with open_store(db) as store:
        store.register_study(plan.study_key, plan.config.name, plan.config_json, (j.key for j in plan.jobs))
        stored = store.statuses(j.key for j in plan.jobs)
        pending = [j for j in plan.jobs if stored.get(j.key) != "done"]
        shared: dict[str, SharedProxies] = {}
        for key in dict.fromkeys(j.proxy_key for j in pending):
            _share_stored_proxies(store, key, shared)
        leases = JobLeases(store)
        leases.note_stored(j.key for j in pending)
        counts = {"done": 0, "error": 0, "kept": 0, "skipped": 0}
        bar = _progress_bar(len(pending), plan.config.name, progress)

        def claim(job: Job) -> bool:
            if not leases.claim(job.key):
                counts["skipped"] += 1
                if bar is not None:  # another runner has it: it leaves this run's bar
                    bar.total -= 1
                    bar.set_postfix(errors=counts["error"], skipped=counts["skipped"])
                return False
            if job.proxy_key not in shared:  # another runner may have computed them meanwhile
                _share_stored_proxies(store, job.proxy_key, shared)
            return True

        def record(outcome: JobOutcome, job: Job) -> None:
            result = store.write_job(outcome.row, outcome.proxies)
            leases.release(job.key)
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
                bar.set_postfix(errors=counts["error"], skipped=counts["skipped"], refresh=False)

        used = None
        if _takes_keyword(run_jobs, "engine"):
            options["engine"] = engine
        try:
            with leases.heartbeat():
                if _takes_keyword(run_jobs, "claim"):
                    used = run_jobs(pending, shared, record, workers=workers, threads=threads, device=device,
                                    claim=claim, **options)
                else:  # an executor that does not claim jobs itself: claim them all now
                    mine = [job for job in pending if claim(job)]
                    used = run_jobs(mine, shared, record, workers=workers, threads=threads, device=device,
                                    **options)
        finally:
            try:
                leases.release_all()
            except StoreError:  # the database is unavailable: the leases expire by themselves
                pass
            if bar is not None:
                bar.close()
    return StudySummary(plan.config.name, str(db), len(plan.jobs), len(plan.jobs) - len(pending), counts["done"],
                        counts["error"], counts["kept"], time.perf_counter() - began,
                        workers if used is None else int(used), threads, counts["skipped"])


def _share_stored_proxies(store, proxy_key: str, shared: dict[str, SharedProxies]) -> None:
    found = store.cached_proxies(proxy_key)
    if found is not None:
        shared.setdefault(proxy_key, SharedProxies(found[0], tuple(found[1]), found[2], found[3]))


def _progress_bar(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="job", desc=name, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


# --------------------------------------------------------------------------------------------
# The local executor: this process, or a pool of spawned worker processes on this machine


@register_executor("local", default_workers=default_workers)
def run_local(jobs: Sequence[Job], shared: Mapping[str, SharedProxies], record: Record, *, workers: int,
              threads: int, device: str, engine: str = "auto", claim: Claim | None = None) -> None:
    """Run ``jobs`` on this machine: one by one in this process when ``workers`` is 0 (its torch
    threads untouched), else in a pool of ``workers`` spawned processes with ``threads`` torch threads
    each (see :func:`_run_pool`). ``claim`` (default: grant every job) is asked as each job starts."""
    claim = claim or _grant
    if workers == 0:
        for job in jobs:
            if claim(job):
                record(execute_job(job, shared.get(job.proxy_key), device, engine), job)
    else:
        _run_pool(list(jobs), shared, record, workers, threads, device, engine, claim)


def _grant(job: Job) -> bool:
    return True


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


def _worker_job(job: Job, shared: SharedProxies | None, device: str, engine: str) -> JobOutcome:
    return execute_job(job, shared, device, engine)


def _run_pool(pending: list[Job], shared: Mapping[str, SharedProxies], record: Record, workers: int,
              threads: int, device: str, engine: str, claim: Claim) -> None:
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
                if not claim(job):
                    continue
                reuse = shared.get(job.proxy_key)
                if reuse is None:
                    computing.add(job.proxy_key)
                inflight[pool.submit(_worker_job, job, reuse, device, engine)] = job
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

