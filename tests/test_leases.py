"""Job leases: runners that share a results database claim each job before running it, so each job is
computed once; a dead runner's expired lease is taken over."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lavp_core.hessian import SolverConfig
from lavp_core.store import open_store
from lavp_core.study import JobLeases, StudyConfig, failed_outcome, plan_study, read_leases, run_study
from lavp_core.study.leases import owner_alive

ROOT = Path(__file__).resolve().parent.parent
TINY = StudyConfig(name="leases", images=(0, 1), archs=("lenet",), weights="random", losses=("l2", "cos"), steps=2,
                   restarts=1, flavours=("paper",), solver=SolverConfig(paper_iterations=5))


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_a_claim_excludes_other_runners_until_released_or_expired(tmp_path):
    clock = Clock()
    db = tmp_path / "r.sqlite"
    with open_store(db) as one, open_store(db) as two:
        a = JobLeases(one, owner="a", lease_seconds=120, clock=clock)
        b = JobLeases(two, owner="b", lease_seconds=120, clock=clock)
        assert a.claim("k1") and a.claim("k2")
        assert not b.claim("k1")  # live lease of a
        assert a.claim("k1")  # a runner may claim its own job again (renews it)
        assert a.held() == ["k1", "k2"]
        a.release("k1")
        assert b.claim("k1") and b.taken_over == 0  # released: free to claim, nothing taken over
        clock.now += 121  # a's lease on k2 expires: its runner is presumed dead
        assert b.claim("k2") and b.taken_over == 1
        a.release("k2")  # a late release does not drop the lease b now holds
        assert {(lease.job_key, lease.owner) for lease in read_leases(one)} == {("k1", "b"), ("k2", "b")}
        assert read_leases(one)[0].expires_at == pytest.approx(clock.now + 120 - 121)  # k1: claimed before
        b.release_all()
        assert read_leases(one) == []


@pytest.mark.timeout(60)
def test_the_live_lease_of_a_gone_runner_of_this_host_is_taken_over_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    host = socket.gethostname()
    dead, alive = f"{host}:{gone.stdout.strip()}:aa", f"{host}:{os.getpid()}:bb"
    assert (owner_alive(dead), owner_alive(alive), owner_alive("elsewhere:1:cc")) == (False, True, None)
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        with store.transaction():
            store.conn.executemany("INSERT INTO leases VALUES (?, ?, ?)",
                                   [("k1", dead, time.time() + 600), ("k2", alive, time.time() + 600)])
        runner = JobLeases(store)
        assert runner.claim("k1") and runner.taken_over == 1  # its runner was killed: no need to wait
        assert not runner.claim("k2")  # a live runner (this test's process, another run)


@pytest.mark.timeout(60)
def test_a_claim_refuses_jobs_another_runner_stored_meanwhile(tmp_path):
    jobs = plan_study(TINY).jobs
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        errored = failed_outcome(jobs[0], "failed before").row
        store.write_job(errored)
        runner = JobLeases(store, owner="runner")
        runner.note_stored(j.key for j in jobs)
        assert runner.claim(jobs[0].key)  # an error row that was there at the start is retried
        runner.release(jobs[0].key)
        store.write_job(failed_outcome(jobs[1], "another runner's attempt").row)
        assert not runner.claim(jobs[1].key)  # stored by another runner during this run: its attempt
        store.write_job(dict(failed_outcome(jobs[2], "").row, status="done", error=None))
        assert not runner.claim(jobs[2].key)  # finished by another runner
        assert runner.held() == []


@pytest.mark.timeout(60)
def test_the_heartbeat_keeps_a_long_job_claimed(tmp_path):
    db = tmp_path / "r.sqlite"
    with open_store(db) as one, open_store(db) as two:
        a = JobLeases(one, owner="a", lease_seconds=1.0)
        b = JobLeases(two, owner="b", lease_seconds=1.0)
        assert a.claim("long-job")
        with a.heartbeat(every=0.2):
            time.sleep(1.6)  # beyond the lease: only the renewals keep it
            assert not b.claim("long-job")
        time.sleep(1.3)  # the runner stopped renewing (it died): the lease runs out
        assert b.claim("long-job") and b.taken_over == 1


@pytest.mark.timeout(120)
def test_run_study_skips_live_leases_and_takes_over_expired_ones(tmp_path, one_thread):
    plan = plan_study(TINY)
    live, dead = plan.jobs[0], plan.jobs[2]
    db = tmp_path / "r.sqlite"
    with open_store(db) as store, store.transaction():
        store.conn.execute("INSERT INTO leases VALUES (?, 'other-host:1:aa', ?)", (live.key, time.time() + 600))
        store.conn.execute("INSERT INTO leases VALUES (?, 'dead-host:2:bb', ?)", (dead.key, time.time() - 5))
    summary = run_study(plan, db, workers=0, progress=False)
    assert (summary.done, summary.errors, summary.kept, summary.skipped) == (3, 0, 0, 1)
    with open_store(db, readonly=True) as store:
        assert set(store.statuses()) == {j.key for j in plan.jobs} - {live.key}
        assert [(lease.job_key, lease.owner) for lease in read_leases(store)] == [(live.key, "other-host:1:aa")]
    # the other runner's lease goes (its row never came): the next run computes the job
    with open_store(db) as store, store.transaction():
        store.conn.execute("DELETE FROM leases")
    again = run_study(plan, db, workers=0, progress=False)
    assert (again.stored_before, again.done, again.skipped) == (3, 1, 0)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_local_pool_claims_each_job_as_it_starts(tmp_path):
    plan = plan_study(dataclasses.replace(TINY, losses=("l2",)))
    held = plan.jobs[1]
    db = tmp_path / "r.sqlite"
    with open_store(db) as store, store.transaction():
        store.conn.execute("INSERT INTO leases VALUES (?, 'other-host:1:aa', ?)", (held.key, time.time() + 600))
    summary = run_study(plan, db, workers=1, progress=False)
    assert (summary.done, summary.skipped) == (1, 1)
    with open_store(db, readonly=True) as store:
        assert list(store.statuses()) == [plan.jobs[0].key]


# ---- two runner processes on one database -----------------------------------------------------

RUNNER = r"""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from lavp_core.hessian import SolverConfig
from lavp_core.study import StudyConfig, plan_study, run_study
from lavp_core.study import executors

folder, name = Path(sys.argv[1]), sys.argv[2]
real = executors.execute_job

def counted(job, shared, device, engine="auto"):  # every computation leaves a line; a slow job keeps both busy
    with open(folder / "computed.txt", "a") as out:
        out.write(f"{job.key} {name}\n")
    time.sleep(0.6)
    return real(job, shared, device, engine)

executors.execute_job = counted
plan = plan_study(StudyConfig(name="leases", images=(0, 1, 2), archs=("lenet",), weights="random",
                              losses=("l2", "cos"), steps=2, restarts=1, flavours=("paper",),
                              solver=SolverConfig(paper_iterations=5)))
(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.02)
summary = run_study(plan, folder / "r.sqlite", workers=0, progress=False)
print(json.dumps(summary.to_dict()))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_runners_on_one_database_compute_each_job_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runners = [subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path), name], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    try:
        deadline = time.monotonic() + 150
        while not all((tmp_path / f"ready-{n}").exists() for n in ("a", "b")):
            assert all(r.poll() is None for r in runners), [r.communicate() for r in runners]
            assert time.monotonic() < deadline, "the runners did not start"
            time.sleep(0.05)
        (tmp_path / "go").touch()  # both begin at once
        results = []
        for runner in runners:
            out, err = runner.communicate(timeout=150)
            assert runner.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for runner in runners:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
    keys = {j.key for j in plan_study(dataclasses.replace(TINY, images=(0, 1, 2))).jobs}
    computed = [line.split() for line in (tmp_path / "computed.txt").read_text().splitlines()]
    assert sorted(key for key, _ in computed) == sorted(keys)  # each job computed exactly once
    assert {name for _, name in computed} == {"a", "b"}  # and the work was shared
    assert sum(r["done"] for r in results) == len(keys)
    assert all(r["kept"] == 0 and r["errors"] == 0 for r in results)
    assert sum(r["skipped"] for r in results) == len(keys)  # each runner skipped what the other ran
    db = tmp_path / "r.sqlite"
    assert _integrity(db) == "ok"
    with open_store(db, readonly=True) as store:
        assert set(store.statuses()) == keys and set(store.statuses().values()) == {"done"}
        assert read_leases(store) == []
        workers = {row["worker"] for row in store.job_rows()}
    assert len(workers) == 2  # the rows name both runner processes
