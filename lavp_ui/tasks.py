"""Background work of the app and how a page shows it live.

Proxies and the Rankings page's attacks are computations whose result depends only on their key: they
run once per server in a shared :class:`lavp_core.jobs.TaskPool` (every session asking for the same key
gets the same task), and a page polls them in a fragment (:func:`live_area`).

Every heavy job goes through the server's :func:`~lavp_ui.serving.job_board`: at most its number of slots
compute at once (the others show their place in line), each session holds one job per kind (an attack,
the proxies of one solver, a ranking's attacks), and the jobs of a session that has ended (a closed tab, a
reloaded page) are stopped within seconds unless another session still wants them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import streamlit as st
import torch

from lavp_core.data import load_dataset
from lavp_core.jobs import FORWARD_AD_LOCK, BackgroundAttack, BackgroundTask, TaskControl, TaskPool
from lavp_core.runner import AttackRequest, PresetRun
from lavp_core.scenario import ScenarioConfig

from .serving import job_board, session_token, torch_threads_per_job
from .sidebar import cached_model, load_scenario

POLL_SECONDS = 1.0  # live areas redraw once a second: on 2 cores every redraw costs the attack CPU time
METHOD_WORK = {"exact": "forming the dense Hessians and diagonalising them",
               "lanczos": "running Lanczos iterations", "paper": "running the paper's power iterations"}


@st.cache_resource(show_spinner=False)
def shared_tasks() -> TaskPool:
    """Computations whose result depends only on their key (proxies of a scenario, a ranking of images),
    shared by every session of this server: a cache that also remembers work in progress."""
    return TaskPool(max_finished=64, board=job_board())


@st.cache_resource(show_spinner=False)
def configure_torch_threads() -> int:
    """Give each of the board's concurrent jobs its share of half the CPU cores (once per server process;
    :func:`~lavp_ui.serving.torch_threads_per_job`); ``$LAVP_TORCH_THREADS`` overrides.

    The browser and the server share the machine with the attack: on 2 cores, PyTorch's two OpenMP threads
    then wait on each other and the default attack takes 2-3 times longer than with one. Under AppTest
    (the test suite's process) nothing is changed.
    """
    wanted = os.environ.get("LAVP_TORCH_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        threads = int(wanted)
    elif st.get_option("global.appTest"):
        return torch.get_num_threads()
    else:
        threads = torch_threads_per_job()
    torch.set_num_threads(threads)
    return threads


@st.cache_resource(show_spinner=False)
def warm_up_engine() -> BackgroundAttack | None:
    """Run a two-step attack once per process in the background, so that the first real attack does not
    pay for PyTorch's one-time set-up (its first frame then comes within a fraction of a second)."""
    try:
        data = load_dataset("photos", "val")
        model = cached_model("lenet", "random", 0, "photos")
        image01, label = data[0]
        run = PresetRun(model, data.info.normalize(image01.unsqueeze(0)), label, data.info,
                        AttackRequest(preset="lavp-paper", loss="cos", steps=2, restarts=2),
                        generator=torch.Generator().manual_seed(0), snapshot_every=1)
        return BackgroundAttack(run, name="lavp-warm-up").start()
    except Exception:  # warming up is an optimisation only
        return None


def live_area(render: Callable[[], None], is_running: Callable[[], bool], *, interval: float = POLL_SECONDS) -> None:
    """Draw ``render()`` in a fragment that redraws itself every ``interval`` seconds while
    ``is_running()``; when the work ends the whole page reruns once (buttons, final results)."""
    polling = is_running()

    def body() -> None:
        running = is_running()
        render()
        if polling and not running:
            st.rerun()

    st.fragment(run_every=interval if polling else None)(body)()


def eta_text(done: int, total: int, elapsed: float) -> str:
    """The time left at the run's own speed so far (``done`` of ``total`` steps in ``elapsed`` seconds), in
    words; empty until the run has made progress."""
    if total <= 0 or done <= 0 or elapsed <= 0 or done >= total:
        return ""
    rate = done / elapsed
    left = (total - done) / rate
    return f"about {left:.0f} s left at this run's speed ({rate:,.0f} steps/s so far)"


def proxies_task(config: ScenarioConfig, method: str) -> BackgroundTask:
    """The shared background computation of every proxy of ``config``'s image with ``method``."""
    from lavp_core.proxies import compute_proxies

    def compute(control: TaskControl):
        control.report(0.0, "waiting for another proxy computation to end")
        with FORWARD_AD_LOCK:  # one proxy computation at a time per process (see lavp_core.jobs)
            control.report(0.0, METHOD_WORK.get(method, f"computing the proxies ({method})"))
            scenario = load_scenario(config)
            return compute_proxies(scenario.model, scenario.image, scenario.label, losses=("l2", "cos"),
                                   method=method)

    return shared_tasks().submit(("proxies", config, method), compute, name=f"lavp-proxies-{method}",
                                 owner=session_token(), kind=f"proxies-{method}")


def known_proxies_task(config: ScenarioConfig, method: str) -> BackgroundTask | None:
    """The shared proxies computation of ``config`` with ``method`` if one was started (else ``None``)."""
    return shared_tasks().get(("proxies", config, method))


class _Cancelled(Exception):
    """Raised from a study's per-job callback to end it early (finished jobs stay stored)."""


def new_attacks_task(config, db: str) -> BackgroundTask:
    """Run the study ``config`` (a :class:`lavp_core.study.StudyConfig`) into ``db`` in the background,
    shared by sessions; its result is the DataFrame of exactly that study's jobs."""
    from lavp_core.study import load_results, plan_study, run_study

    def work(control: TaskControl):
        plan = plan_study(config)
        total = len(plan.jobs)
        done = [0]

        def on_job(outcome, action) -> None:
            done[0] += 1
            control.report(done[0] / total, f"{done[0]} of {total} attacks done")
            if control.cancelled:
                raise _Cancelled

        control.report(0.0, "waiting for a proxy computation to end")
        with FORWARD_AD_LOCK:  # the jobs compute proxies in this process (see lavp_core.jobs)
            control.report(0.0, f"0 of {total} attacks done")
            try:
                run_study(plan, db, workers=0, progress=False, on_job=on_job)
            except _Cancelled:
                pass
        df = load_results(db)
        keys = {job.key for job in plan.jobs}
        return df[df["job_key"].isin(keys)].reset_index(drop=True) if not df.empty else df

    return shared_tasks().submit(("study", config, db), work, name="lavp-rankings", owner=session_token(),
                                 kind="rankings")


def new_attacks_known(config, db: str) -> BackgroundTask | None:
    """The shared run of the study ``config`` into ``db`` if one was started (else ``None``)."""
    return shared_tasks().get(("study", config, db))
