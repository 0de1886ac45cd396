"""Background jobs: an attack iterated in a thread, generic tasks, the shared task pool."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lavp_core.attacks import AttackSnapshot
from lavp_core.errors import ConfigError
from lavp_core.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    BackgroundAttack,
    BackgroundTask,
    TaskPool,
    running_jobs,
    stop_all,
)
from lavp_core.runner import AttackRequest, PresetRun


@pytest.fixture
def make_run(photos_val, lenet):
    image01, label = photos_val[0]
    image = photos_val.info.normalize(image01.unsqueeze(0))

    def make(steps: int, every: int = 5, restarts: int = 1) -> PresetRun:
        return PresetRun(lenet, image, label, photos_val.info,
                         AttackRequest(preset="lavp-paper", loss="cos", steps=steps, restarts=restarts),
                         generator=torch.Generator().manual_seed(0), snapshot_every=every)

    return make


def test_background_attack_streams_snapshots_and_keeps_the_outcome(make_run):
    seen = []
    job = BackgroundAttack(make_run(12), summarize=lambda outcome: seen.append(outcome) or {"steps": outcome.steps})
    assert job.view().state == RUNNING and job.view().snapshot is None
    job.start()
    assert job.wait(120)
    view = job.view()
    assert view.state == DONE and view.finished and view.fraction == 1.0
    assert view.outcome is not None and view.outcome.steps == 12 and not view.outcome.cancelled
    assert view.summary == {"steps": 12} and seen == [view.outcome]  # summarize ran once, with the outcome
    assert [step for step, _ in view.history] == [1, 5, 10, 12]  # first, every 5th and last step
    assert view.snapshot.step == 12 and view.snapshot.image01.shape == (3, 32, 32)
    assert view.first_frame_seconds is not None and 0 < view.first_frame_seconds <= view.elapsed


def test_stop_cancels_between_steps_and_the_partial_result_is_the_outcome(make_run):
    job = BackgroundAttack(make_run(100_000, every=1)).start()
    deadline = time.monotonic() + 60
    while job.view().snapshot is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.stop()
    assert job.wait(60)
    view = job.view()
    assert view.state == CANCELLED and view.stop_requested
    assert view.outcome.cancelled and 0 < view.outcome.steps < 100_000
    assert view.outcome.reconstruction is not None


class _GatedRun:
    """Yields one snapshot each time the test opens the gate, so every view is taken at a known step."""

    def __init__(self, steps: int):
        self.total_steps, self.outcome = steps, None
        self.gate = threading.Semaphore(0)

    def cancel(self):
        pass

    def __iter__(self):
        for step in range(1, self.total_steps + 1):
            assert self.gate.acquire(timeout=30)
            yield AttackSnapshot(step, self.total_steps, 1.0 / step, (1.0 / step,), torch.zeros(3, 2, 2), None)


def test_views_are_consistent_copies():
    run = _GatedRun(5)
    job = BackgroundAttack(run).start()
    assert job.view().snapshot is None and job.view().history == ()
    earlier = []
    for step in range(1, 6):
        run.gate.release()
        deadline = time.monotonic() + 30
        while (job.view().snapshot is None or job.view().snapshot.step < step) and time.monotonic() < deadline:
            time.sleep(0.001)
        view = job.view()
        assert view.snapshot.step == step and view.history[-1] == (step, 1.0 / step)
        assert [s for s, _ in view.history] == list(range(1, step + 1))
        earlier.append(view)
    assert job.wait(30)
    # a view is a copy: later steps did not change what an earlier view holds
    assert [len(v.history) for v in earlier] == [1, 2, 3, 4, 5]
    assert earlier[0].snapshot.step == 1


def test_a_failing_run_ends_in_a_readable_state():
    class Broken:
        def __iter__(self):
            raise ConfigError("bad setting: use another")
            yield  # pragma: no cover

        def cancel(self):
            pass

    job = BackgroundAttack(Broken()).start()
    assert job.wait(10)
    view = job.view()
    assert view.state == FAILED and view.error.user and view.error.message == "bad setting: use another"
    assert "ConfigError" in view.error.traceback


def test_background_task_result_error_progress_and_cancel():
    done = BackgroundTask(lambda control: (control.report(0.5, "half"), 42)[1]).start()
    assert done.wait(10) and done.view().state == DONE and done.view().result == 42
    assert done.view().progress == 1.0

    def boom(control):
        raise RuntimeError("bug")

    failed = BackgroundTask(boom).start()
    assert failed.wait(10)
    error = failed.view().error
    assert failed.view().state == FAILED and not error.user and "RuntimeError" in error.message

    release = threading.Event()

    def loop(control):
        for i in range(1000):
            if control.cancelled:
                return i
            control.report(i / 1000, f"item {i}")
            release.wait(0.01)
        return 1000

    slow = BackgroundTask(loop).start()
    time.sleep(0.05)
    assert slow.view().running and slow.view().message.startswith("item")
    slow.stop()
    assert slow.wait(10) and slow.view().state == CANCELLED and slow.view().result < 1000


def test_task_pool_shares_by_key_and_replaces_failures():
    pool = TaskPool(max_finished=2)
    calls = []

    def work(control):
        calls.append(1)
        return len(calls)

    first = pool.submit("a", work)
    assert pool.submit("a", work) is first and pool.get("a") is first
    first.wait(10)
    assert pool.submit("a", work) is first and calls == [1]  # a finished result is reused

    broken = pool.submit("b", lambda control: 1 / 0)
    broken.wait(10)
    again = pool.submit("b", work)
    assert again is not broken  # a failed task is replaced
    again.wait(10)
    for key in "cde":
        pool.submit(key, work).wait(10)
    assert pool.get("a") is None and pool.get("e") is not None  # at most 2 finished tasks kept


def test_stop_all_ends_every_running_job(make_run):
    jobs = [BackgroundAttack(make_run(100_000, every=50)).start() for _ in range(2)]
    assert all(job in running_jobs() for job in jobs)
    assert stop_all(wait=60)
    assert all(job.view().state == CANCELLED for job in jobs) and not running_jobs()


def test_wait_first_snapshot_returns_once_the_first_frame_is_there(make_run):
    job = BackgroundAttack(make_run(100_000, every=1000)).start()
    assert job.wait_first_snapshot(60)
    assert job.view().snapshot is not None and job.view().snapshot.step == 1
    job.stop()
    assert job.wait(60)
