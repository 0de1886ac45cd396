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


# ---- bounded work: a slot queue and a board of owners -----------------------------------------------------


def _loop_task(release: threading.Event, started: list | None = None):
    """A task function that runs until released or cancelled (checking every 10 ms)."""

    def loop(control):
        if started is not None:
            started.append(time.monotonic())
        while not release.is_set() and not control.cancelled:
            time.sleep(0.01)
        return "released" if release.is_set() else "cancelled"

    return loop


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_slot_queue_runs_at_most_its_slots_in_order_and_says_where_each_waits():
    from lavp_core.jobs import SlotQueue

    queue, release = SlotQueue(1), threading.Event()
    order: list[int] = []
    tasks = []
    for k in range(3):
        tasks.append(BackgroundTask(lambda control, k=k: (order.append(k), _loop_task(release)(control))[1],
                                    slots=queue).start())
        assert _until(lambda n=k + 1: sum(queue.load()) == n)  # each in the queue before the next
    assert queue.load() == (1, 2)
    views = [t.view() for t in tasks]
    assert [v.queue_position for v in views] == [None, 1, 2] and all(v.running for v in views)
    assert views[1].elapsed == 0.0  # a waiting task has not started computing
    tasks[2].stop()  # stopped while waiting: it ends at once, without computing
    assert tasks[2].wait(10) and tasks[2].view().state == CANCELLED and tasks[2].view().result is None
    assert tasks[1].view().queue_position == 1
    release.set()
    assert all(t.wait(10) for t in tasks)
    assert order == [0, 1] and queue.load() == (0, 0)


def test_one_job_per_kind_per_owner_and_a_job_nobody_wants_is_stopped():
    from lavp_core.jobs import JobBoard

    board = JobBoard(4, interval=3600)  # no sweeps here: claims only
    release = threading.Event()
    first = BackgroundTask(_loop_task(release), slots=board.slots)
    board.claim("ann", "attack", first, exclusive=True)
    first.start()
    second = BackgroundTask(_loop_task(release), slots=board.slots)
    with pytest.raises(ConfigError, match="already runs"):
        board.claim("ann", "attack", second, exclusive=True)  # refused: the first still runs
    assert board.current("ann", "attack") is first and not first.control.cancelled

    pool = TaskPool(board=board)
    shared = pool.submit("proxies-of-image-3", _loop_task(release), owner="ann", kind="proxies")
    assert pool.submit("proxies-of-image-3", _loop_task(release), owner="bob", kind="proxies") is shared
    assert board.owners(shared) == {"ann", "bob"}
    ann_next = pool.submit("proxies-of-image-4", _loop_task(release), owner="ann", kind="proxies")
    assert board.owners(shared) == {"bob"} and not shared.control.cancelled  # bob still wants it
    pool.submit("proxies-of-image-5", _loop_task(release), owner="bob", kind="proxies")
    assert shared.wait(10) and shared.view().state == CANCELLED  # nobody wants it any more
    assert not ann_next.control.cancelled
    release.set()
    assert first.wait(10) and ann_next.wait(10)


def test_the_watchdog_stops_the_jobs_of_an_owner_that_is_gone_within_seconds():
    from lavp_core.jobs import JobBoard

    present = {"ann": True, "bob": True}
    board = JobBoard(4, alive=lambda owner: present[owner], grace=0.5, interval=0.1)
    release, farewells = threading.Event(), []
    ann = board.claim("ann", "attack", BackgroundTask(_loop_task(release), slots=board.slots)).start()
    bob = board.claim("bob", "attack", BackgroundTask(_loop_task(release), slots=board.slots)).start()
    pool = TaskPool(board=board)
    shared = pool.submit("shared", _loop_task(release), owner="ann", kind="proxies")
    pool.submit("shared", _loop_task(release), owner="bob", kind="proxies")
    board.on_owner_gone("ann", lambda: farewells.append("ann"))

    present["ann"] = False  # ann's tab closed
    gone_at = time.monotonic()
    assert ann.wait(5), "the job of a session that is gone was not stopped"
    assert time.monotonic() - gone_at < 3.0 and ann.view().state == CANCELLED
    assert _until(lambda: farewells == ["ann"], 5)
    assert not bob.finished and not shared.finished  # bob is there and still wants the shared task
    assert board.owners(shared) == {"bob"}

    present["bob"] = False
    time.sleep(0.2)
    present["bob"] = True  # back within the grace period (a dropped connection): nothing is stopped
    time.sleep(0.8)
    assert not bob.finished and not shared.finished
    release.set()
    assert bob.wait(10) and shared.wait(10) and bob.view().result == "released"


def test_a_job_claimed_by_no_one_is_never_stopped_by_the_board():
    from lavp_core.jobs import JobBoard

    board = JobBoard(1, alive=lambda owner: False, grace=0.0, interval=0.05)
    release = threading.Event()
    mine = board.claim("gone", "attack", BackgroundTask(_loop_task(release), slots=board.slots)).start()
    cli = BackgroundTask(_loop_task(release), slots=board.slots).start()  # waits for the one slot
    assert mine.wait(5) and mine.view().state == CANCELLED
    assert _until(lambda: cli.view().queue_position is None, 5)  # it got the freed slot
    time.sleep(0.3)
    assert not cli.finished
    release.set()
    assert cli.wait(10) and cli.view().state == DONE
