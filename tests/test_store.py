"""The SQLite results store: schema, idempotent writes, and refusing bad databases without harm."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import sqlite3
import stat
from pathlib import Path

import pytest

from lavp_core.errors import StoreError
from lavp_core.store import APP_NAME, SCHEMA_VERSION, ResultStore, open_store


def _row(key: str, status: str = "done", **extra) -> dict:
    row = {"job_key": key, "proxy_key": "p" + key, "study": "t", "config_json": "{}", "dataset": "photos",
           "split": "val", "image_index": int(key[-1], 16), "arch": "lenet", "weights": "random", "seed": 0,
           "loss": "l2", "preset": "lavp-paper", "attack_json": "{}", "attack_seed": 1, "status": status}
    if status == "done":
        row.update({"mse": 0.01, "psnr": 20.0, "ssim": 0.5, "lpips": None, "lpips_reason": "no weights"})
    row.update(extra)
    return row


def _proxies(value: float = 1.0) -> list[dict]:
    return [{"proxy": "l2_max", "flavour": "exact", "method": "exact", "value": value, "residual": 1e-9,
             "converged": True, "iterations": 3072, "seconds": 1.0, "note": ""},
            {"proxy": "l2_max", "flavour": "paper", "method": "paper", "value": value * 0.9, "residual": 0.1,
             "converged": False, "iterations": 100, "seconds": 0.1, "note": "budget"}]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_store_has_versioned_schema_and_wal(tmp_path):
    with open_store(tmp_path / "r.sqlite") as store:
        meta = store.meta()
        assert meta["app"] == APP_NAME and meta["schema_version"] == str(SCHEMA_VERSION)
        assert store.journal_mode() == "wal"
        assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


def test_write_read_and_rewrite_rules(tmp_path):
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        assert store.write_job(_row("a1"), _proxies(2.0)).action == "inserted"
        # a finished row is never overwritten: a second write is a no-op
        assert store.write_job(_row("a1", mse=99.0), _proxies(5.0)).action == "kept"
        # an errored row is the one kind that a later run replaces
        assert store.write_job(_row("a2", "error", error="boom")).action == "inserted"
        assert store.write_job(_row("a2"), _proxies(3.0)).action == "replaced"
        assert store.write_job(_row("a2", "error", error="again")).action == "kept"
        assert store.statuses() == {"a1": "done", "a2": "done"}
        rows = {r["job_key"]: r for r in store.job_rows()}
        assert rows["a1"]["mse"] == 0.01 and rows["a1"]["lpips"] is None
        values = {(r["job_key"], r["flavour"]): r["value"] for r in store.proxy_rows()}
        assert values == {("a1", "exact"): 2.0, ("a1", "paper"): 1.8, ("a2", "exact"): 3.0, ("a2", "paper"): 2.7}
        shared = store.cached_proxies("pa1")
        assert shared[0] == "a1" and len(shared[1]) == 2
    # readers see the same rows read-only
    with open_store(db, readonly=True) as reader:
        assert reader.count("done") == 2
        with pytest.raises(StoreError, match="read-only"):
            reader.write_job(_row("a3"))


def test_nan_and_inf_round_trip(tmp_path):
    with open_store(tmp_path / "r.sqlite") as store:
        store.write_job(_row("b1", psnr=math.inf, ssim=math.nan))
        row = store.job_rows()[0]
        assert row["psnr"] == math.inf and row["ssim"] is None


def test_not_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"these are my notes, not a database\n" * 100)
    before = _digest(path)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="not an SQLite database"):
            open_store(path, readonly=readonly)
    assert _digest(path) == before


def test_corrupt_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "broken.sqlite"
    with open_store(path) as store:
        for i in range(30):
            store.write_job(_row(f"c{i:x}", config_json="x" * 2000))
    data = bytearray(path.read_bytes())
    data[100:len(data)] = bytes(len(data) - 100)  # keep the header, wipe every page
    path.write_bytes(bytes(data))
    before = _digest(path)
    for readonly in (False, True):
        with pytest.raises(StoreError):
            open_store(path, readonly=readonly)
    assert _digest(path) == before


def test_database_of_another_program_is_refused_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('Ada')")
    conn.commit()
    conn.close()
    before = _digest(path)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="another program"):
            open_store(path, readonly=readonly)
    assert _digest(path) == before
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM customers").fetchall() == [("Ada",)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    conn.close()


def test_foreign_meta_table_is_refused(tmp_path):
    path = tmp_path / "meta.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('app', 'someone-else')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="another program"):
        open_store(path)


def test_newer_schema_is_refused_and_kept(tmp_path):
    path = tmp_path / "future.sqlite"
    with open_store(path) as store:
        store.write_job(_row("d1"), _proxies())
        store.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = _digest(path)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="upgrade"):
            open_store(path, readonly=readonly)
    assert _digest(path) == before
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    conn.close()


def test_read_only_file_refuses_writers_but_serves_readers(tmp_path):
    path = tmp_path / "ro.sqlite"
    with open_store(path) as store:
        store.write_job(_row("e1"), _proxies())
    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    try:
        before = _digest(path)
        with pytest.raises(StoreError, match="read-only"):
            open_store(path)
        with open_store(path, readonly=True) as reader:
            assert [r["job_key"] for r in reader.job_rows()] == ["e1"]
        assert _digest(path) == before
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_read_only_folder_refuses_writers(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    with open_store(folder / "r.sqlite") as store:
        store.write_job(_row("f1"))
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(StoreError, match="read-only"):
            open_store(folder / "r.sqlite")
        with open_store(folder / "r.sqlite", readonly=True) as reader:
            assert reader.count() == 1
    finally:
        folder.chmod(stat.S_IRWXU)


def test_missing_database_for_reader(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nothing.sqlite", readonly=True)
    assert not (tmp_path / "nothing.sqlite").exists()


def _write_many(path: str, offset: int, count: int) -> None:
    with open_store(path) as store:
        for i in range(offset, offset + count):
            store.write_job(_row(f"g{i:04x}", mse=float(i)), _proxies(float(i)))


def test_concurrent_writers_keep_every_row(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    context = multiprocessing.get_context("spawn")
    # two processes with overlapping keys (20..39 written by both), started at once on a fresh file
    procs = [context.Process(target=_write_many, args=(path, 0, 40)),
             context.Process(target=_write_many, args=(path, 20, 40))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open_store(path, readonly=True) as store:
        rows = store.job_rows()
        assert len(rows) == 60 and len({r["job_key"] for r in rows}) == 60
        assert all(r["status"] == "done" and r["mse"] == int(r["job_key"][1:], 16) for r in rows)
        assert len(store.proxy_rows()) == 120


def test_a_schema_1_database_is_read_as_is_and_migrated_by_a_writer(tmp_path):
    """A schema-1 database (the bundled trained study before its migration): a reader leaves it untouched
    (new columns read as NaN); the first
    writer adds rel_mse and correlation from the stored PNGs, and the leases table, in one transaction."""
    import shutil

    import numpy as np

    from lavp_core.study import load_results

    bundled = Path(__file__).resolve().parent.parent / "assets" / "study" / "photos-trained.sqlite"
    db = tmp_path / "old.sqlite"
    shutil.copy(bundled, db)
    with sqlite3.connect(db) as conn:  # back to schema 1, as the bundled study was before its migration
        conn.execute("ALTER TABLE jobs DROP COLUMN rel_mse")
        conn.execute("ALTER TABLE jobs DROP COLUMN correlation")
        conn.execute("DROP TABLE leases")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    before = db.read_bytes()
    old = load_results(db)
    assert old["rel_mse"].isna().all() and old["correlation"].isna().all()
    assert db.read_bytes() == before and not (tmp_path / "old.sqlite-wal").exists()
    with ResultStore(db) as store:
        assert store.meta()["schema_version"] == "2"
        assert {"leases"} <= {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
    new = load_results(db)
    assert len(new) == len(old) and new["rel_mse"].notna().all() and new["correlation"].between(-1, 1).all()
    # independent check: rel_mse times the truth's pixel variance is the stored full-precision MSE, up to the
    # PNGs' 8-bit rounding
    from io import BytesIO

    from PIL import Image

    rows = load_results(db, with_images=True).head(20)
    for _, row in rows.iterrows():
        truth = np.asarray(Image.open(BytesIO(row["truth_png"])).convert("RGB"), dtype=np.float64) / 255
        variance = truth.reshape(-1, 3).var(axis=0).mean()
        assert row["rel_mse"] * variance == pytest.approx(row["mse"], rel=0.05)


@pytest.mark.parametrize("how", ["replaced", "deleted", "wal-deleted"])
def test_a_writer_whose_file_is_replaced_stops_instead_of_writing_into_the_lost_file(tmp_path, how):
    """A `git checkout` of a tracked database (or a copy over it, or rm) while a study runs: SQLite
    would keep committing into the unlinked inode and every later row would vanish with the run."""
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        store.write_job(_row("a1"), _proxies())
        if how == "replaced":
            other = tmp_path / "other.sqlite"
            with open_store(other) as fresh:
                fresh.write_job(_row("b1"), _proxies())
            other.replace(db)
        elif how == "deleted":
            db.unlink()
        else:
            db.with_name(db.name + "-wal").unlink()
        with pytest.raises(StoreError, match="would be lost") as caught:
            store.write_job(_row("a2"), _proxies())
        assert {"replaced": "replaced by another file", "deleted": "was deleted",
                "wal-deleted": "lost its -wal file"}[how] in str(caught.value)
    if how == "replaced":  # the refused row went nowhere
        with open_store(db, readonly=True) as now:
            assert "a2" not in now.statuses()


def test_a_writer_beside_another_writer_keeps_writing(tmp_path):
    """The guard does not fire on a second runner sharing the same file (it writes into the same -wal)."""
    db = tmp_path / "r.sqlite"
    with open_store(db) as first, open_store(db) as second:
        first.write_job(_row("a1"), _proxies())
        second.write_job(_row("a2"), _proxies())
        second.close()
        first.write_job(_row("a3"), _proxies())
        assert set(first.statuses()) == {"a1", "a2", "a3"}


def _read_and_close_elsewhere(db) -> None:
    """Another program reads the database and closes its connection (the app, `report`, the sqlite3 shell)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                    "c.execute('SELECT COUNT(*) FROM jobs').fetchone(); c.close()", str(db)], check=True, timeout=60)


def test_a_second_connection_in_the_writer_process_keeps_the_writers_locks(tmp_path):
    """Regression: a study's lease heartbeat opened a second store in the study's process; reading the
    file's header with open()/close() dropped the process's POSIX locks, so the next other program to
    close a connection checkpointed and deleted the -wal file while the study went on committing into
    the deleted file: every later row was lost."""
    db = tmp_path / "r.sqlite"
    with open_store(db) as store:
        store.write_job(_row("a1"), _proxies())
        with open_store(db) as heartbeat, open_store(db, readonly=True) as reader:
            heartbeat.conn.execute("SELECT COUNT(*) FROM leases").fetchone()
            assert set(reader.statuses()) == {"a1"}
            _read_and_close_elsewhere(db)
            assert db.with_name(db.name + "-wal").exists()
            store.write_job(_row("a2"), _proxies())
        _read_and_close_elsewhere(db)
        store.write_job(_row("a3"), _proxies())
    with open_store(db, readonly=True) as after:
        assert set(after.statuses()) == {"a1", "a2", "a3"}
