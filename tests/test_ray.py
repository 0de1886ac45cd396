"""The ``ray`` study executor on a Ray cluster started by the test on this machine (a head and a second
node, loopback only): the same job keys and scores as the local pool, and no job lost or stored twice
when a node dies mid-study."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from lavp_core.errors import ConfigError
from lavp_core.hessian import SolverConfig
from lavp_core.store import open_store
from lavp_core.study import StudyConfig, list_executors, load_results, plan_study, read_leases, run_study

ray = pytest.importorskip("ray", reason="the ray package is not installed (pip install -r requirements.txt)")

ROOT = Path(__file__).resolve().parent.parent
RAY_CLI = Path(sys.executable).with_name("ray")
TINY = StudyConfig(name="ray", images=(0, 1), archs=("lenet",), weights="random", losses=("l2", "cos"), steps=2,
                   restarts=1, flavours=("paper",), solver=SolverConfig(paper_iterations=5))
TASK_TITLE = "ray::run_job_on_worker"  # a Ray worker's process title while it runs a study job
SCORES = ("mse", "psnr", "ssim", "rel_mse", "correlation", "matching_loss", "paper_grad_norm", "paper_l2_max",
          "paper_cos_min")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _session(sid: int) -> list[int]:
    """Processes of session ``sid`` (a node's raylet, object store, agents and workers: Ray gives each
    worker a process group of its own, but they stay in the session of the ``ray start`` that began it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is dead already
                found.append(int(entry.name))
    return found


def _titles(sid: int) -> list[str]:
    titles = []
    for pid in _session(sid):
        try:
            titles.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            pass
    return titles


class Node:
    """A Ray node started with ``ray start --block`` in a session of its own (stopping it kills the
    processes of that session, and only those)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([str(RAY_CLI), "start", "--block", "--disable-usage-stats",
                                      "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                      "--object-store-memory=100000000", *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL every process of the node's session (raylet, object store, workers), as a crash would."""
        deadline = time.monotonic() + 30
        while True:
            left = _session(self.proc.pid)
            if not left or time.monotonic() > deadline:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.poll()  # reap the ray start process
            time.sleep(0.1)
        self.proc.wait(timeout=30)


def _alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def _wait_for_nodes(count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _alive_nodes() != count:
        assert time.monotonic() < deadline, f"the Ray cluster has {_alive_nodes()} alive nodes, not {count}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(request):
    """A one-CPU head on a free loopback port, this process connected to it as the driver; address."""
    folder = Path(tempfile.mkdtemp(prefix="lavp-ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    port = _free_port()
    env = pytest.MonkeyPatch()
    env.setenv("RAY_AUTH_MODE", "disabled")  # the same on every node and driver, whether ~/.ray has a token or not
    env.setenv("RAY_USAGE_STATS_ENABLED", "0")
    head = Node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={folder / 't'}"],
                folder / "head.log")

    def stop() -> None:  # runs even when starting failed
        if ray.is_initialized():
            ray.shutdown()
        head.kill()
        shutil.rmtree(folder, ignore_errors=True)
        env.undo()

    request.addfinalizer(stop)
    head.wait_started()
    address = f"127.0.0.1:{port}"
    import logging

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    _wait_for_nodes(1)
    return {"address": address, "folder": folder}


@pytest.fixture
def second_node(cluster, request):
    """One more one-CPU node joined to the cluster; killed at the end of the test (if still alive)."""
    node = Node([f"--address={cluster['address']}"], cluster["folder"] / f"node-{time.monotonic_ns()}.log")
    request.addfinalizer(node.kill)
    node.wait_started()
    _wait_for_nodes(2)
    yield node


def _scores(db: Path):
    return load_results(db).set_index("job_key").sort_index()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_runs_a_study_to_the_same_keys_and_scores_as_the_local_pool(tmp_path, cluster, second_node):
    """Random weights, and a checkpoint file on the driver's side that Ray ships to the workers."""
    import torch

    from lavp_core.hashing import sha256_file
    from lavp_core.models import create_model
    from lavp_core.study.ray_executor import CHECKPOINT_CACHE

    checkpoint = tmp_path / "mine.pt"
    torch.save(create_model("lenet", 10, weights="random", seed=3).state_dict(), checkpoint)
    plan = plan_study(dataclasses.replace(TINY, weights=("random", str(checkpoint))))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task runs (threads = 1)
    try:
        local = run_study(plan, tmp_path / "local.sqlite", workers=0, progress=False)
    finally:
        torch.set_num_threads(before)
    on_ray = run_study(plan, tmp_path / "ray.sqlite", progress=False, executor="ray",
                       executor_options={"address": cluster["address"]})
    assert (on_ray.done, on_ray.errors, on_ray.kept, on_ray.skipped) == (local.done, 0, 0, 0) == (8, 0, 0, 0)
    assert on_ray.workers == 2  # workers 0: as many tasks at once as the two one-CPU nodes fit
    here, there = _scores(tmp_path / "local.sqlite"), _scores(tmp_path / "ray.sqlite")
    assert list(there.index) == list(here.index) == sorted(j.key for j in plan.jobs)
    for column in SCORES:
        assert there[column].to_numpy() == pytest.approx(here[column].to_numpy(), rel=1e-6, abs=1e-12), column
    assert (there["proxies_from"].notna().sum(), here["proxies_from"].notna().sum()) == (4, 4)
    assert sorted(set(there["weights"])) == sorted({"random", str(checkpoint)})  # the job's own weights
    # the workers (processes of this machine) cached the shipped checkpoint, each in a private folder
    caches = [f for f in Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_CACHE}-*")
              if (f / f"{sha256_file(checkpoint)}.pt").is_file()]
    assert caches and all((f.stat().st_mode & 0o777) == 0o700 for f in caches)
    for folder in caches:  # a worker killed with the cluster does not run its exit handler
        shutil.rmtree(folder, ignore_errors=True)
    driver = f"{socket.gethostname()}:{os.getpid()}"
    assert driver not in set(there["worker"]) and set(here["worker"]) == {driver}  # Ray's workers ran them
    with open_store(tmp_path / "ray.sqlite", readonly=True) as store:
        assert read_leases(store) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("retries", [2, 0])
def test_a_node_that_dies_mid_study_loses_no_job(tmp_path, cluster, second_node, retries):
    """The second node is killed while it runs a job: Ray runs the job again on the head (retries 2), or
    the job is stored once as an error that says why (retries 0); every job ends stored exactly once."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def hold(seconds: float) -> None:  # defined here so that Ray ships it by value
        time.sleep(seconds)

    # the head's CPU is held until the second node is killed, so that the first job runs there
    head = ray.get_runtime_context().get_node_id()
    blocker = ray.remote(hold).options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(
        head, soft=False)).remote(600)
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) > 1:
        assert time.monotonic() < deadline, "the head's CPU was not taken"
        time.sleep(0.1)
    plan = plan_study(TINY)
    killed = threading.Event()

    def kill_when_busy() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            if any(title.startswith(TASK_TITLE) for title in _titles(second_node.proc.pid)):
                second_node.kill()
                killed.set()
                break
            time.sleep(0.05)
        ray.cancel(blocker, force=True)

    watcher = threading.Thread(target=kill_when_busy, daemon=True)
    watcher.start()
    stored = []
    summary = run_study(plan, tmp_path / "r.sqlite", progress=False, executor="ray",
                        executor_options={"address": cluster["address"], "max_retries": retries},
                        on_job=lambda outcome, action: stored.append((outcome.row["job_key"], action)))
    watcher.join(timeout=30)
    assert killed.is_set(), "the second node never ran a job"
    keys = sorted(j.key for j in plan.jobs)
    assert sorted(key for key, _ in stored) == keys and {action for _, action in stored} == {"inserted"}
    df = load_results(tmp_path / "r.sqlite", include_errors=True).set_index("job_key").sort_index()
    assert list(df.index) == keys
    if retries:
        assert (summary.done, summary.errors) == (4, 0)
        assert set(df["status"]) == {"done"}
    else:
        assert (summary.done, summary.errors) == (3, 1)
        error = df.loc[df["status"] == "error", "error"].iloc[0]
        assert "Ray lost this job's worker" in error and "after 0 retries" in error
        assert "rerun the study" in error
        again = run_study(plan, tmp_path / "r.sqlite", progress=False, executor="ray",
                          executor_options={"address": cluster["address"]})
        assert (again.stored_before, again.done) == (3, 1)  # rerunning retries it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_study_with_backend_ray_and_address(tmp_path, cluster):
    db = tmp_path / "r.sqlite"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "lavp_core", "study", "--db", str(db), "--archs", "lenet",
                           "--weights", "random", "--losses", "l2", "--images", "0,", "--steps", "2",
                           "--restarts", "1", "--flavours", "paper", "--paper-iterations", "5", "--no-progress",
                           "--json", "--backend", "ray", "--address", cluster["address"]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["done"], summary["errors"], summary["total"]) == (1, 0, 1)
    assert load_results(db)["status"].tolist() == ["done"]


def test_ray_is_imported_only_when_a_study_runs_on_it():
    code = ("import sys, lavp_core, lavp_core.study as s; from lavp_core import cli; s.get_executor('ray'); "
            "print(sorted(s.list_executors()), 'ray' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['local',", "'ray']", "False"]


def test_an_executor_option_the_executor_lacks_is_refused_before_writing(tmp_path):
    assert {"local", "ray"} <= set(list_executors())
    db = tmp_path / "r.sqlite"
    with pytest.raises(ConfigError, match="study executor 'local' takes no option 'address'"):
        run_study(dataclasses.replace(TINY, images=(0,)), db, workers=0, progress=False,
                  executor_options={"address": "auto"})
    assert not db.exists()


def test_cli_refuses_address_without_backend_ray(tmp_path, capsys):
    from lavp_core import cli

    db = tmp_path / "r.sqlite"
    code = cli.main(["study", "--db", str(db), "--archs", "lenet", "--weights", "random", "--images", "0,",
                     "--losses", "l2", "--address", "auto", "--no-progress"])
    assert code == 2 and "takes no option 'address'" in capsys.readouterr().err
    assert not db.exists()


def test_a_planted_checkpoint_in_the_cache_is_not_trusted():
    """The workers' cache holds a checkpoint under its SHA-256; a file planted there with other content is
    replaced, not used."""
    import hashlib

    from lavp_core.study.ray_executor import _cached_checkpoint, checkpoint_cache_folder

    payload = os.urandom(64)
    digest = hashlib.sha256(payload).hexdigest()
    planted = checkpoint_cache_folder() / f"{digest}.pt"
    planted.write_bytes(b"not the checkpoint")
    try:
        path = _cached_checkpoint(payload, digest)
        assert path == planted and path.read_bytes() == payload
        assert (checkpoint_cache_folder().stat().st_mode & 0o777) == 0o700
        assert checkpoint_cache_folder() == path.parent  # one folder per process, made once
    finally:
        planted.unlink(missing_ok=True)

