"""Studies: grid validation, jobs into SQLite (parallel, resumable, concurrent), and the paper's analysis."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from lavp_core import cli
from lavp_core.errors import CheckpointError, ConfigError, DatasetError
from lavp_core.hessian import SolverConfig
from lavp_core.metrics import lpips_status
from lavp_core.study import (
    MEAN_ARCH,
    StudyConfig,
    check_one_configuration,
    failed_outcome,
    get_executor,
    list_executors,
    load_results,
    plan_study,
    proxy_rows,
    rankings,
    run_study,
    spearman_table,
)

ROOT = Path(__file__).resolve().parent.parent
FAST_SOLVER = SolverConfig(paper_iterations=5)
TINY = StudyConfig(name="tiny", images=(3, 7, 11), archs=("lenet", "resnet8"), weights="random",
                   losses=("l2", "cos"), steps=3, restarts=2, flavours=("paper",), solver=FAST_SOLVER)
SCORE_COLUMNS = ("mse", "ssim", "psnr", "lpips")


def _cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _study_args(db: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lavp_core", "study", "--db", str(db), "--archs", "lenet", "--weights", "random",
            "--flavours", "paper", "--paper-iterations", "5", "--restarts", "2", "--no-progress", *extra]


@pytest.fixture
def one_thread():
    """Jobs run in this process (workers=0) use one torch thread, as a study's workers do: on a busy
    machine several threads per process slow them down many times."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _job_count(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def _column_values(db: Path, column: str) -> list:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute(f"SELECT {column} FROM jobs ORDER BY job_key")]
    finally:
        conn.close()


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("change, error", [
    ({"archs": ("lenet", "no-such-net")}, ConfigError),
    ({"losses": ("l2", "manhattan")}, ConfigError),
    ({"dataset": "no-such-data"}, ConfigError),
    ({"preset": "no-such-preset"}, ConfigError),
    ({"preset": "rconv"}, "kind analytic, which studies do not run: choose one of dlg, idlg, ig, lavp-paper"),
    ({"preset": "gifd"}, "kind generative, which studies do not run"),
    ({"images": (0, 10_000)}, ConfigError),
    ({"flavours": ("exact", "guess")}, ConfigError),
    ({"dataset": "cifar10"}, DatasetError),
    ({"weights": "/no/such/checkpoint.pt"}, (CheckpointError, ConfigError)),
])
def test_bad_grid_is_rejected_before_any_job_runs(tmp_path, change, error):
    import dataclasses

    config = dataclasses.replace(TINY, **change)
    db = tmp_path / "r.sqlite"
    if isinstance(error, str):  # the message itself is the behaviour under test
        with pytest.raises(ConfigError, match=error):
            run_study(config, db, workers=0, progress=False)
    else:
        with pytest.raises(error):
            run_study(config, db, workers=0, progress=False)
    assert not db.exists()


def test_cli_rejects_unknown_names_before_writing(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    for flag, value in (("--archs", "lenet,nonet"), ("--losses", "l2,nope"), ("--dataset", "nodata")):
        status = cli.main(["study", "--db", str(db), "--weights", "random", "--images", "2", flag, value])
        assert status == 2
        assert "unknown" in capsys.readouterr().err
    for preset, kind in (("rconv", "analytic"), ("gifd", "generative")):  # listed by `list`, refused by name
        status = cli.main(["study", "--db", str(db), "--weights", "random", "--images", "2", "--preset", preset])
        err = capsys.readouterr().err
        assert status == 2 and "unknown" not in err
        assert err.startswith(f"error: preset '{preset}' is an attack of kind {kind}")
    assert not db.exists()


def test_job_keys_are_stable_and_cover_the_grid():
    import dataclasses

    plan = plan_study(TINY)
    assert len(plan.jobs) == 3 * 2 * 2
    assert len({j.key for j in plan.jobs}) == 12
    assert [j.key for j in plan_study(TINY).jobs] == [j.key for j in plan.jobs]
    # one proxy computation per (image, model); the same random starts for every loss and model of an image
    assert len({j.proxy_key for j in plan.jobs}) == 6
    for index in TINY.images:
        assert len({j.attack_seed for j in plan.jobs if j.index == index}) == 1
    # the study's name is not part of a job's identity, but every attack and proxy setting is
    renamed = plan_study(dataclasses.replace(TINY, name="other"))
    assert [j.key for j in renamed.jobs] == [j.key for j in plan.jobs]
    more_steps = plan_study(dataclasses.replace(TINY, steps=4))
    assert not {j.key for j in more_steps.jobs} & {j.key for j in plan.jobs}
    assert [j.proxy_key for j in more_steps.jobs] == [j.proxy_key for j in plan.jobs]
    budget = plan_study(dataclasses.replace(TINY, solver=SolverConfig(paper_iterations=6)))
    assert not {j.proxy_key for j in budget.jobs} & {j.proxy_key for j in plan.jobs}
    assert json.loads(plan.jobs[0].config_json)["proxies"]["solver"]["paper_iterations"] == 5
    # solver settings the study's flavours never use do not make finished jobs run again
    unused = dataclasses.replace(FAST_SOLVER, lanczos_ncv_max=9, lanczos_max_products=7, memory_mb=32.0,
                                 exact_max_dim=10)
    same = plan_study(dataclasses.replace(TINY, solver=unused))
    assert [j.key for j in same.jobs] == [j.key for j in plan.jobs] and same.study_key == plan.study_key
    exact = dataclasses.replace(TINY, flavours=("exact", "paper"), exact_method="exact")
    by_lanczos = dataclasses.replace(exact, exact_method="lanczos")
    assert ({j.key for j in plan_study(exact).jobs}
            == {j.key for j in plan_study(dataclasses.replace(exact, solver=unused)).jobs})
    assert not ({j.key for j in plan_study(by_lanczos).jobs}
                & {j.key for j in plan_study(dataclasses.replace(by_lanczos, solver=unused)).jobs})
    drawn = plan_study(dataclasses.replace(TINY, images=5)).images
    assert len(drawn) == 5 and list(drawn) == sorted(drawn)
    assert plan_study(dataclasses.replace(TINY, images=5)).images == drawn


def test_unknown_executor_is_rejected_before_writing(tmp_path):
    db = tmp_path / "r.sqlite"
    with pytest.raises(ConfigError, match="unknown study executor 'slurm'.*local"):
        run_study(TINY, db, executor="slurm", progress=False)
    assert not db.exists()
    assert "local" in list_executors()


def test_a_registered_executor_runs_the_jobs(tmp_path, monkeypatch):
    import dataclasses

    from lavp_core.study import executors

    seen = []

    def refuse(jobs, shared, record, *, workers, threads, device):  # records every job as failed, in order
        seen.append((len(jobs), workers, threads, device))
        for job in jobs:
            record(failed_outcome(job, "refused by the test executor"), job)

    monkeypatch.setitem(executors._EXECUTORS, "refuse", refuse)
    assert get_executor("refuse") is refuse
    config = dataclasses.replace(TINY, archs=("lenet",), images=(0, 1))
    db = tmp_path / "r.sqlite"
    summary = run_study(config, db, workers=3, threads=2, progress=False, executor="refuse")
    assert seen == [(4, 3, 2, "cpu")]
    assert (summary.total, summary.done, summary.errors, summary.workers, summary.threads) == (4, 0, 4, 3, 2)
    df = load_results(db, include_errors=True)
    assert sorted(df["job_key"]) == sorted(j.key for j in plan_study(config).jobs)
    assert (df["error"] == "refused by the test executor").all()


def test_proxy_rows_label_how_each_value_was_obtained():
    from types import SimpleNamespace

    diag = SimpleNamespace(method="paper", residual=1e-3, converged=False, iterations=5, seconds=0.5, note="n")
    values = {"grad_norm": 2.0, "l2_max": 3.0, "fusion": 4.0, "new_direct_proxy": 5.0}
    result = SimpleNamespace(items=values.items, diagnostics={"l2_max": diag}, fusions={"fusion": (("l2", "max"),)},
                             method="paper", converged=lambda name: name != "fusion")
    rows = {r["proxy"]: r for r in proxy_rows(result, "paper")}
    assert {name: r["method"] for name, r in rows.items()} == {
        "grad_norm": "direct", "l2_max": "paper", "fusion": "fusion (paper)", "new_direct_proxy": "direct"}
    assert rows["l2_max"]["iterations"] == 5 and rows["l2_max"]["converged"] is False
    assert rows["fusion"]["converged"] is False and rows["new_direct_proxy"]["converged"] is True
    assert all(r["flavour"] == "paper" for r in rows.values())


# ---- a tiny study, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("study") / "tiny.sqlite"
    summary = run_study(TINY, db, workers=2, progress=False)
    return db, summary


def test_tiny_study_runs_end_to_end(tiny_db, one_thread):
    db, summary = tiny_db
    assert (summary.total, summary.done, summary.errors, summary.workers) == (12, 12, 0, 2)
    df = load_results(db, with_images=True)
    assert len(df) == 12 and df["job_key"].is_unique
    assert set(df["arch"]) == {"lenet", "resnet8"} and set(df["loss"]) == {"l2", "cos"}
    assert (df["status"] == "done").all()
    for column in ("mse", "psnr", "ssim", "matching_loss", "paper_grad_norm", "paper_l2_max", "paper_cos_min",
                   "attack_seconds", "proxy_paper_seconds"):
        assert df[column].notna().all(), column
    # proxies are computed once per (image, model) and shared by the other loss's job
    assert df["proxies_from"].notna().sum() == 6
    shared = df.dropna(subset=["proxies_from"])
    source = df.set_index("job_key").loc[shared["proxies_from"]]
    assert np.array_equal(shared["paper_l2_max"].to_numpy(), source["paper_l2_max"].to_numpy())
    # LPIPS: a real distance where its AlexNet weights are cached, else NULL (never 0) with the reason stored
    status = lpips_status()
    stored_lpips = _column_values(db, "lpips")
    if status.available:
        assert all(v is not None and v > 0 for v in stored_lpips)
        assert df["lpips_reason"].isna().all()
    else:
        assert stored_lpips == [None] * 12 and df["lpips"].isna().all()
        assert set(df["lpips_reason"]) == {status.reason} and "AlexNet" in status.reason
    png = Image.open(io.BytesIO(df["reconstruction_png"].iloc[0]))
    assert png.size == (32, 32)
    assert Image.open(io.BytesIO(df["truth_png"].iloc[0])).size == (32, 32)
    # results do not depend on the worker that ran a job: rerunning one job here gives the same numbers
    from lavp_core.study import SharedProxies, execute_job

    job = plan_study(TINY).jobs[0]
    again = execute_job(job, SharedProxies("skip", (), None, None)).row
    stored = df.set_index("job_key").loc[job.key]
    assert again["mse"] == pytest.approx(stored["mse"], rel=1e-6)


def test_rerun_skips_finished_jobs(tiny_db):
    db, _ = tiny_db
    again = run_study(TINY, db, workers=2, progress=False)
    assert (again.stored_before, again.run) == (12, 0)
    assert len(load_results(db)) == 12


def test_report_sigma_equals_scipy_on_stored_columns(tiny_db):
    db, _ = tiny_db
    df = load_results(db)
    table = spearman_table(df, "paper")
    conn = sqlite3.connect(db)
    checked = 0
    for row in table[table["arch"] != MEAN_ARCH].itertuples():
        if row.score == "lpips":
            continue
        pairs = conn.execute(
            f"SELECT j.{row.score}, p.value FROM jobs j JOIN proxies p ON p.job_key = j.job_key "
            "WHERE j.status = 'done' AND j.dataset = ? AND j.loss = ? AND j.arch = ? AND p.proxy = ? "
            "AND p.flavour = 'paper' ORDER BY j.image_index", (row.dataset, row.loss, row.arch, row.proxy)).fetchall()
        # NULL (NaN) values, e.g. a fusion of a negative recipe eigenvalue, are left out of the pairs
        pairs = [(s, v) for s, v in pairs if s is not None and v is not None]
        assert row.n == len(pairs)
        if len(pairs) < 3 or len({v for _, v in pairs}) == 1 or len({s for s, _ in pairs}) == 1:
            assert math.isnan(row.rho)
            continue
        scores, values = zip(*pairs, strict=True)
        expected = stats.spearmanr(values, scores)
        assert row.rho == pytest.approx(expected.statistic, abs=1e-12)
        assert row.p == pytest.approx(expected.pvalue, abs=1e-12)
        checked += 1
    conn.close()
    assert checked >= 20
    means = table[table["arch"] == MEAN_ARCH].set_index(["loss", "proxy", "score"])["rho"]
    per_arch = table[table["arch"] != MEAN_ARCH].groupby(["loss", "proxy", "score"])["rho"].mean()
    pd.testing.assert_series_equal(means.sort_index(), per_arch.sort_index(), check_names=False)


def _expected_cell(db: Path, loss: str, proxy: str) -> str:
    """A Table 1/3 cell computed from the stored rows alone: per architecture, scipy's Spearman between
    the paper-flavour proxy and each score over the images (pairs with NULL left out; undefined for
    fewer than 3 pairs or a constant side), averaged over the architectures where it is defined."""
    conn = sqlite3.connect(db)
    parts = []
    for score in SCORE_COLUMNS:
        per_arch = []
        for (arch,) in conn.execute("SELECT DISTINCT arch FROM jobs ORDER BY arch").fetchall():
            pairs = conn.execute(
                f"SELECT p.value, j.{score} FROM jobs j JOIN proxies p ON p.job_key = j.job_key WHERE j.status = "
                "'done' AND j.loss = ? AND j.arch = ? AND p.proxy = ? AND p.flavour = 'paper' AND p.value IS NOT NULL "
                f"AND j.{score} IS NOT NULL", (loss, arch, proxy)).fetchall()
            if len(pairs) >= 3 and len({v for v, _ in pairs}) > 1 and len({s for _, s in pairs}) > 1:
                per_arch.append(stats.spearmanr(*zip(*pairs, strict=True)).statistic)
        parts.append(f"{sum(per_arch) / len(per_arch):.2f}" if per_arch else "n/a")
    conn.close()
    return " / ".join(parts)


def _markdown_cell(text: str, title: str, row: str, column: str) -> str:
    """The cell (row, column) of the first pipe table after the heading that starts with ``title``."""
    lines = text[text.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == row:
            return cells[header.index(column)]
    raise AssertionError(f"no row {row!r} under {title!r}")


def test_report_cli_formats(tiny_db, capsys):
    db, _ = tiny_db
    assert cli.main(["report", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "| photos+L2 |" in text and "| photos+CS |" in text and "Table 3" in text
    assert "| σ_S | grad_norm | l2_max | l2_min | cos_max | cos_min |" in text
    # cells equal σ_S recomputed with scipy from the stored columns
    l2_max_cs = _expected_cell(db, "cos", "l2_max")
    fusion_l2 = _expected_cell(db, "l2", "fusion")
    assert l2_max_cs.split(" / ")[0] != "n/a"  # the MSE part is defined: the check compares numbers
    assert _markdown_cell(text, "## Table 1", "photos+CS", "l2_max") == l2_max_cs
    assert _markdown_cell(text, "## Table 3", "photos+L2", "fusion") == fusion_l2
    status = lpips_status()
    assert (f"LPIPS unavailable: {status.reason}" in text) == (not status.available)
    if not status.available:
        assert l2_max_cs.endswith(" / n/a") and fusion_l2.endswith(" / n/a")
    assert cli.main(["report", "--db", str(db), "--format", "json", "--flavour", "paper"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["table1"]["paper"]) == {"photos+L2", "photos+CS"}
    assert payload["table1"]["paper"]["photos+CS"]["l2_max"] == l2_max_cs
    assert cli.main(["report", "--db", str(db), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))  # tidy: one value per cell
    assert set(frame["loss"]) == {"l2", "cos"} and set(frame["flavour"]) == {"paper"}
    assert not frame.duplicated(["arch", "loss", "proxy", "flavour", "score"]).any()
    cell = frame[(frame["arch"] == "mean") & (frame["loss"] == "cos") & (frame["proxy"] == "l2_max")
                 & (frame["score"] == "mse")].iloc[0]
    assert f"{cell['sigma']:.2f}" == l2_max_cs.split(" / ")[0] and cell["ci_low"] <= cell["sigma"] <= cell["ci_high"]
    assert cli.main(["report", "--db", str(db), "--rankings", "--images", "3,7,11", "--flavour", "paper",
                     "--format", "json"]) == 0
    ranks = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in ranks if r["kind"] == "observed"} == {"MSE (L2)", "MSE (CS)"}


def test_rankings_kendall_matches_scipy(tiny_db):
    db, _ = tiny_db
    df = load_results(db)
    table = rankings(df, [3, 7, 11], proxy_flavour="paper", arch="lenet")
    lenet = df[df["arch"] == "lenet"]
    mse = {loss: lenet[lenet["loss"] == loss].set_index("image_index")["mse"].loc[[3, 7, 11]] for loss in ("l2", "cos")}
    proxy = lenet[lenet["loss"] == "l2"].set_index("image_index")["paper_l2_max"].loc[[3, 7, 11]]
    row = table[table["name"] == "l2_max"].iloc[0]
    assert row["tau_l2"] == pytest.approx(stats.kendalltau(proxy, mse["l2"]).statistic)
    assert row["tau_cos"] == pytest.approx(stats.kendalltau(proxy, mse["cos"]).statistic)
    assert row["ranking"] == " > ".join(str(i) for i in proxy.sort_values(ascending=False).index)


# ---- failures, kills and concurrent studies ---------------------------------------------------------


def test_failing_job_is_recorded_and_retried(tmp_path, monkeypatch, one_thread):
    import dataclasses

    import lavp_core.attacks as attacks

    real = attacks.run_attack

    def flaky(model, update, config, info, **kwargs):
        if config.loss == "cos":
            raise RuntimeError("simulated failure")
        return real(model, update, config, info, **kwargs)

    config = dataclasses.replace(TINY, archs=("lenet",), images=(0,))
    db = tmp_path / "r.sqlite"
    monkeypatch.setattr(attacks, "run_attack", flaky)
    first = run_study(config, db, workers=0, progress=False)
    assert (first.done, first.errors) == (1, 1)
    errors = load_results(db, include_errors=True).set_index("loss")
    assert errors.loc["cos", "status"] == "error" and "simulated failure" in errors.loc["cos", "error"]
    monkeypatch.setattr(attacks, "run_attack", real)
    second = run_study(config, db, workers=0, progress=False)
    assert (second.stored_before, second.done, second.errors) == (1, 1, 0)
    df = load_results(db, include_errors=True)
    assert len(df) == 2 and (df["status"] == "done").all()


@pytest.mark.slow
def test_exact_and_paper_flavours_side_by_side(tmp_path, one_thread):
    import dataclasses

    config = dataclasses.replace(TINY, archs=("lenet",), images=(5,), flavours=("exact", "paper"))
    db = tmp_path / "r.sqlite"
    assert run_study(config, db, workers=0, progress=False).done == 2
    df = load_results(db)
    row = df.dropna(subset=["proxy_exact_seconds"]).iloc[0]
    assert row["exact_l2_min_converged"] and row["exact_cos_min_converged"]
    assert row["exact_grad_norm"] == pytest.approx(row["paper_grad_norm"])
    assert 0 < row["exact_l2_min"] <= row["exact_l2_max"]
    assert df["proxies_from"].notna().sum() == 1  # the second loss reused the first job's proxies
    conn = sqlite3.connect(db)
    methods = dict(conn.execute("SELECT flavour, method FROM proxies WHERE proxy = 'l2_min' LIMIT 2").fetchall())
    conn.close()
    assert methods == {"exact": "exact", "paper": "paper"}


@pytest.mark.slow
def test_killed_study_resumes_without_duplicates(tmp_path):
    db = tmp_path / "r.sqlite"
    args = _study_args(db, "--images", "0,1,2,3", "--losses", "l2,cos", "--steps", "30", "--workers", "1")
    proc = subprocess.Popen(args, cwd=ROOT, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while _job_count(db) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.kill()  # SIGKILL to the study process alone, as a crash would
        proc.communicate(timeout=60)
        # its worker notices and leaves too (no orphan keeps computing)
        deadline = time.time() + 20
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    stored = _job_count(db)
    assert 1 <= stored < 8
    before = load_results(db, include_errors=True).set_index("job_key")
    done = subprocess.run(args, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert f"{stored} already stored" in done.stdout
    after = load_results(db, include_errors=True)
    assert len(after) == 8 and after["job_key"].is_unique and (after["status"] == "done").all()
    kept = after.set_index("job_key").loc[before.index]
    assert (kept["created_at"] == before["created_at"]).all()  # rows of the killed run were not rewritten
    conn = sqlite3.connect(db)
    duplicates = conn.execute("SELECT COUNT(*) FROM (SELECT job_key, proxy, flavour, COUNT(*) c FROM proxies "
                              "GROUP BY job_key, proxy, flavour HAVING c > 1)").fetchone()[0]
    conn.close()
    assert duplicates == 0


@pytest.mark.slow
def test_two_studies_write_one_database_at_once(tmp_path):
    db = tmp_path / "shared.sqlite"
    common = ["--losses", "l2", "--steps", "20", "--workers", "1"]
    procs = [subprocess.Popen(_study_args(db, "--name", name, "--images", images, *common), cwd=ROOT,
                              env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, images in (("first", "0,1,2"), ("second", "1,2,3"))]
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err
    df = load_results(db, include_errors=True)
    assert len(df) == 4 and df["job_key"].is_unique
    assert (df["status"] == "done").all()
    assert df[["mse", "psnr", "ssim", "paper_grad_norm", "paper_l2_max", "paper_l2_min"]].notna().all().all()
    assert sorted(load_results(db, study="first")["image_index"]) == [0, 1, 2]
    assert sorted(load_results(db, study="second")["image_index"]) == [1, 2, 3]


def test_report_refuses_bad_databases(tmp_path, capsys):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 50)
    assert cli.main(["report", "--db", str(junk)]) == 2
    assert "not an SQLite database" in capsys.readouterr().err
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert cli.main(["study", "--db", str(other), "--archs", "lenet", "--weights", "random", "--images", "1",
                     "--steps", "2", "--flavours", "paper", "--workers", "0", "--no-progress"]) == 2
    assert "another program" in capsys.readouterr().err
    assert cli.main(["report", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_study_over_two_snapshots_stores_both_keyed_apart(tmp_path, monkeypatch, one_thread):
    """Model state as a study dimension: two snapshots of one architecture are two cells per image."""
    import dataclasses

    from lavp_core import models

    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    for epoch, seed in ((0, 1), (3, 2)):  # two model states of lenet "trained" on photos
        torch.save(models.create_model("lenet", 10, seed=seed).state_dict(), tmp_path / f"lenet-photos-epoch{epoch}.pt")
    config = dataclasses.replace(TINY, name="snapshots", images=(3,), archs=("lenet",),
                                 weights=("trained@0", "trained@3"), losses=("cos",))
    plan = plan_study(config)
    assert [j.weights for j in plan.jobs] == ["trained@0", "trained@3"]
    assert len({j.key for j in plan.jobs}) == 2 and len({j.proxy_key for j in plan.jobs}) == 2
    assert plan.jobs[0].weights_sha256 != plan.jobs[1].weights_sha256
    db = tmp_path / "snap.sqlite"
    run_study(plan, db, workers=0, progress=False)
    df = load_results(db)
    assert sorted(df["weights"]) == ["trained@0", "trained@3"] and df["job_key"].is_unique
    check_one_configuration(df)  # two states of one model are two cells, not a repeated one
    assert df.set_index("weights")["paper_grad_norm"].nunique() == 2  # each state's own gradient


def test_an_unset_schedule_keeps_older_study_keys_and_a_set_one_changes_the_attack():
    import dataclasses

    plan = plan_study(TINY)
    assert '"schedule"' not in plan.config_json
    stepped = plan_study(dataclasses.replace(TINY, schedule="step"))
    assert stepped.study_key != plan.study_key
    assert {j.attack.schedule for j in stepped.jobs} == {"step"} and {j.attack.schedule for j in plan.jobs} == {"none"}
