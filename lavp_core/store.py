"""SQLite results store of studies: one row per job, keyed by a hash of the job's full configuration.

Layout (schema version :data:`SCHEMA_VERSION`):

* ``meta(key, value)``: ``app = 'lavp-explorer'``, ``schema_version``, ``created_at``. A database
  without this table, or whose ``app`` is another, belongs to another program and is never touched.
* ``studies(study_key, name, config_json, created_at, updated_at)``: each study configuration that
  wrote to the database; ``study_jobs(study_key, job_key)`` links a study to the jobs of its grid
  (two studies with overlapping grids share the rows of their common jobs).
* ``jobs``: one row per job (image, architecture, weights, attack loss, attack settings, proxy
  settings): its identity columns, ``status`` (``'done'`` or ``'error'`` with the ``error`` text), the
  attack's outcome (``matching_loss``, labels, restarts), the similarity scores (``mse``, ``psnr``,
  ``ssim``, ``lpips`` NULL when unavailable, with ``lpips_reason``), timings, the reconstruction and
  the ground truth as small PNGs (BLOBs), and ``created_at``.
* ``proxies(job_key, proxy, flavour, method, value, residual, converged, iterations, seconds, note)``:
  every proxy of a job in long format, once per flavour (``'exact'``: the exact/certified solver;
  ``'paper'``: the paper's finite-difference power-iteration recipe), so new losses need no new columns.

Safety rules:

* A writer opens the database in WAL mode with a 30 s busy timeout and writes each job in its own
  ``BEGIN IMMEDIATE`` transaction, so readers (the app, ``report``) can read while a study writes,
  two studies can write at once, and a killed run loses at most the jobs in flight.
* Stored rows are never deleted or overwritten, with one documented exception: a job whose stored
  row has ``status = 'error'`` is replaced when the job is run again and succeeds or fails anew.
  A ``'done'`` row always wins; writing the same job again is a no-op.
* An older schema is read as it is (columns it lacks read as NULL) and migrated by the first writer
  that opens it, in one transaction: schema 1 -> 2 adds ``rel_mse`` and ``correlation``, filled for
  the rows already there from their stored 8-bit PNGs (:func:`_rescore_from_pngs`), and the
  ``leases`` table.
* ``leases(job_key, owner, expires_at)``: a runner's claim on a job it is computing (schema 2).
* A file that is not SQLite, is corrupt, belongs to another program, or comes from a newer schema
  is refused with :class:`~lavp_core.errors.StoreError` before anything is written to it. A file or
  folder without write permission is refused to writers; readers open it read-only.
* Any SQLite error while reading (a damaged page found only when a query reaches it) is a ``StoreError``
  naming the file; no error message quotes the file's contents.
* A reader creates nothing: a WAL database whose ``-wal`` and ``-shm`` files are not both there (no writer
  is running) is opened with ``immutable=1``, since a read-only connection would otherwise create them.
* This process never reads the database file itself (its SQLite header) while it holds a connection
  to it: closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
  included, and a WAL database whose writer has lost its locks has its ``-wal`` file checkpointed and
  deleted by the next other process that closes a connection to it (a ``report``, the app, the
  ``sqlite3`` shell), while the writer goes on committing into the deleted file. A study's lease
  heartbeat opening its own connection did exactly that and lost rows. Connections are counted per
  file (:data:`_HELD`); the header is read only when the process holds none, under one lock.
* A writer notices when its file is replaced or its ``-wal`` file deleted under it (``git checkout`` or
  ``git stash`` of a tracked database, a copy over it, ``rm``): SQLite would go on committing into the
  unlinked file, and every row written from then on would be lost when the run ends. Each transaction
  first checks that the path still names the file it opened (device and inode) and, in WAL mode, that
  the ``-wal`` file is still there; if not it raises :class:`~lavp_core.errors.StoreError` and writes
  nothing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreError

APP_NAME = "lavp-explorer"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000
SQLITE_HEADER = b"SQLite format 3\x00"
JOB_STATUSES = ("done", "error")

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE studies (
    study_key   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    config_json TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE jobs (
    job_key             TEXT PRIMARY KEY,
    proxy_key           TEXT NOT NULL,
    study               TEXT NOT NULL,
    config_json         TEXT NOT NULL,
    dataset             TEXT NOT NULL,
    split               TEXT NOT NULL,
    image_index         INTEGER NOT NULL,
    arch                TEXT NOT NULL,
    weights             TEXT NOT NULL,
    weights_sha256      TEXT,
    seed                INTEGER NOT NULL,
    loss                TEXT NOT NULL,
    preset              TEXT NOT NULL,
    attack_json         TEXT NOT NULL,
    attack_seed         INTEGER NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('done', 'error')),
    error               TEXT,
    label               INTEGER,
    label_used          INTEGER,
    image_description   TEXT,
    matching_loss       REAL,
    restart_losses_json TEXT,
    best_restart        INTEGER,
    all_diverged        INTEGER,
    steps               INTEGER,
    mse                 REAL,
    psnr                REAL,
    ssim                REAL,
    rel_mse             REAL,
    correlation         REAL,
    lpips               REAL,
    lpips_reason        TEXT,
    attack_seconds      REAL,
    proxy_exact_seconds REAL,
    proxy_paper_seconds REAL,
    job_seconds         REAL,
    proxies_from        TEXT,
    reconstruction_png  BLOB,
    truth_png           BLOB,
    worker              TEXT,
    torch_threads       INTEGER,
    code_version        TEXT,
    created_at          TEXT NOT NULL
);
CREATE INDEX jobs_proxy_key ON jobs (proxy_key);
CREATE INDEX jobs_grid ON jobs (dataset, loss, arch);
CREATE TABLE proxies (
    job_key    TEXT NOT NULL REFERENCES jobs (job_key) ON DELETE CASCADE,
    proxy      TEXT NOT NULL,
    flavour    TEXT NOT NULL CHECK (flavour IN ('exact', 'paper')),
    method     TEXT NOT NULL,
    value      REAL,
    residual   REAL,
    converged  INTEGER,
    iterations INTEGER,
    seconds    REAL,
    note       TEXT,
    PRIMARY KEY (job_key, proxy, flavour)
);
CREATE TABLE study_jobs (
    study_key TEXT NOT NULL,
    job_key   TEXT NOT NULL,
    PRIMARY KEY (study_key, job_key)
);
CREATE TABLE leases (
    job_key    TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

# Columns of ``jobs`` that a row written by :meth:`ResultStore.write_job` may set (all but the key
# columns are optional; missing ones are NULL).
JOB_COLUMNS: tuple[str, ...] = (
    "job_key", "proxy_key", "study", "config_json", "dataset", "split", "image_index", "arch", "weights",
    "weights_sha256", "seed", "loss", "preset", "attack_json", "attack_seed", "status", "error", "label",
    "label_used", "image_description", "matching_loss", "restart_losses_json", "best_restart",
    "all_diverged", "steps", "mse", "psnr", "ssim", "rel_mse", "correlation", "lpips", "lpips_reason", "attack_seconds",
    "proxy_exact_seconds", "proxy_paper_seconds", "job_seconds", "proxies_from", "reconstruction_png",
    "truth_png", "worker", "torch_threads", "code_version", "created_at",
)
REQUIRED_JOB_COLUMNS = ("job_key", "proxy_key", "study", "config_json", "dataset", "split", "image_index",
                        "arch", "weights", "seed", "loss", "preset", "attack_json", "attack_seed", "status")
BLOB_COLUMNS = ("reconstruction_png", "truth_png")
PROXY_COLUMNS: tuple[str, ...] = ("proxy", "flavour", "method", "value", "residual", "converged",
                                  "iterations", "seconds", "note")


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (what ``created_at`` columns hold)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class WriteOutcome:
    """What :meth:`ResultStore.write_job` did: ``"inserted"``, ``"replaced"`` (an errored row was
    replaced) or ``"kept"`` (a finished row was already there and was left as it was)."""

    action: str
    status: str  # the status of the row now stored


def _no_write_bits(path: Path) -> bool:
    """Whether ``path`` is marked read-only (no write bit at all), which root's access() ignores."""
    return not (path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


_HELD: dict[tuple[int, int], list] = {}
"""(device, inode) -> [open connections of this process to that file, whether it was in WAL mode]."""
_HELD_LOCK = threading.RLock()
"""Held while a store opens (header read, connection, first lock) and while one is counted out."""


def _held(path: Path) -> list | None:
    """This process's entry of :data:`_HELD` for ``path`` (None when it holds no connection to it). While
    it holds one the file's header was checked when that connection opened, and reading the file now
    would drop that connection's locks when the descriptor is closed."""
    return _HELD.get(_file_identity(path))


def _check_header(path: Path) -> None:
    """Refuse a non-empty file that does not start with SQLite's magic header (nothing is written)."""
    if _held(path) is not None:
        return
    with open(path, "rb") as handle:
        head = handle.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:  # the message never quotes the file's bytes
        raise StoreError(f"{path} is not an SQLite database (it does not start with SQLite's header); it was "
                         f"left untouched. Give --db a new file name or the path of a lavp-explorer results "
                         f"database")


def _in_wal_mode(path: Path) -> bool:
    """Whether the database header says WAL (its file-format read and write versions, bytes 18-19, are 2)."""
    held = _held(path)
    if held is not None:
        return held[1]
    with open(path, "rb") as handle:
        header = handle.read(20)
    return len(header) == 20 and 2 in (header[18], header[19])


def _reading(method):
    """Make an SQLite error raised while reading a :class:`ResultStore` (a damaged page, a file changed
    underneath) its :class:`StoreError`, naming the file and what to do."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read results database {self.path} ({exc}): it is damaged or not a "
                             f"lavp-explorer database; nothing was changed. Restore a copy, or run the study "
                             f"into a new file") from exc

    return wrapper


class ResultStore:
    """An open results database.

    Args:
        path: the SQLite file. A writer creates it (and its schema) when missing.
        readonly: open for reading only (``file:...?mode=ro``, ``immutable=1`` for a WAL database without
            a running writer): works on read-only files and folders, and never creates or changes anything.

    Raises:
        StoreError: the file is not SQLite or is corrupt, belongs to another program, has a newer
            schema, is missing (reader), or cannot be written (writer).
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._held_key: tuple[int, int] | None = None  # (device, inode) of the file this store opened
        self._wal = False
        self._wrote = False
        with _HELD_LOCK:
            if readonly:
                self._conn = self._open_reader()
            else:
                self._conn = self._open_writer()
            self._held_key = _file_identity(self.path)
            self._wal = self.journal_mode() == "wal"
            if self._held_key is not None:
                _HELD.setdefault(self._held_key, [0, self._wal])[0] += 1

    # ---- opening -------------------------------------------------------------------------------

    def _open_reader(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise StoreError(f"results database {self.path} does not exist; run a study first "
                             f"('python -m lavp_core study --db {self.path} ...')")
        _check_header(self.path)
        if self.path.stat().st_size == 0:
            raise StoreError(f"{self.path} is an empty file, not a results database; run a study into it first")
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        if _in_wal_mode(self.path) and not all(self.path.with_name(self.path.name + suffix).exists()
                                               for suffix in ("-wal", "-shm")):
            # A read-only connection to a WAL database creates the -wal and -shm files it lacks. With no
            # writer (a writer keeps both while it runs) the main file holds every committed row: read it
            # as immutable, which creates nothing. (A writer that starts meanwhile is not seen.)
            uri += "&immutable=1"
        conn = self._connect(uri)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            conn.close()
            if "unable to open" not in str(exc):
                raise StoreError(f"{self.path} is not a readable SQLite database ({exc}); give --db the path "
                                 f"of a lavp-explorer results database") from exc
            # A WAL database in a folder nobody may write (no -shm file can be made): read it as immutable.
            conn = self._connect(f"{uri}&immutable=1")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a readable SQLite database ({exc}); give --db the path "
                             f"of a lavp-explorer results database") from exc
        try:
            self._validate(conn, creating=False)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a readable results database ({exc}); it was left untouched. "
                             f"Give --db the path of a lavp-explorer results database") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        folder = self.path.resolve().parent
        if not folder.is_dir():
            raise StoreError(f"folder {folder} of the results database does not exist; create it first")
        if not os.access(folder, os.W_OK) or _no_write_bits(folder):
            raise StoreError(f"folder {folder} is read-only, so a study cannot write {self.path.name} there "
                             f"(SQLite needs to create its -wal and -shm files beside it); choose --db in a "
                             f"writable folder. Reports can still read it.")
        exists = self.path.exists()
        if exists:
            if not self.path.is_file():
                raise StoreError(f"{self.path} is not a file; give --db a file name")
            _check_header(self.path)
            if not os.access(self.path, os.W_OK) or _no_write_bits(self.path):
                raise StoreError(f"{self.path} is read-only: a study cannot add rows to it. Copy it to a "
                                 f"writable file, or make it writable (chmod u+w). Reports can still read it.")
        conn = self._connect(f"{self.path.resolve().as_uri()}?mode={'rw' if exists else 'rwc'}")
        try:
            self._validate(conn, creating=True)
            self._enable_wal(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a usable results database ({exc}); nothing was written to "
                             f"it. Give --db a new file name") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, uri: str) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open results database {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        return conn

    def _validate(self, conn: sqlite3.Connection, *, creating: bool) -> None:
        """Check the file is a lavp-explorer database of a schema we know; create the schema in an empty
        file when ``creating``. Nothing is written to a file that fails a check."""
        try:
            tables = self._tables(conn)
            if not tables:
                if not creating:
                    raise StoreError(f"{self.path} holds no results (an empty SQLite file); run a study into it")
                self._create_schema(conn)
                tables = self._tables(conn)
            if "meta" not in tables:
                raise StoreError(f"{self.path} is an SQLite database of another program (it has {len(tables)} "
                                 f"tables, none of them lavp-explorer's meta table); it was left untouched. Give "
                                 f"--db a new file name")
            meta = {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}
            if meta.get("app") != APP_NAME:
                raise StoreError(f"{self.path} belongs to another program (its meta table does not name "
                                 f"{APP_NAME}); it was left untouched. Give --db a new file name")
            try:
                version = int(meta.get("schema_version", ""))
            except ValueError as exc:
                raise StoreError(f"{self.path} has an unreadable schema version (not a number); it was left "
                                 f"untouched") from exc
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer lavp-explorer (schema version {version}, "
                                 f"this one reads up to {SCHEMA_VERSION}); upgrade lavp-explorer to read or "
                                 f"extend it. The file was left untouched")
            if version < 1:
                raise StoreError(f"{self.path} has an unknown schema version {version}; it was left untouched")
            missing = {"jobs", "proxies", "studies", "study_jobs"} - tables
            if missing:
                raise StoreError(f"{self.path} lacks the tables {sorted(missing)}: it is damaged; run the study "
                                 f"into a new file")
            if creating:
                check = conn.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise StoreError(f"{self.path} is corrupt ({check}); it was left untouched. Run the study "
                                     f"into a new file")
                if version < SCHEMA_VERSION:
                    self._migrate(conn, version)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable SQLite database ({exc}); it was left untouched. "
                             f"Give --db a new file name") from exc

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring a schema ``version`` database up to :data:`SCHEMA_VERSION` in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            if current == 1:  # another writer may have migrated it while we waited for the lock
                for column in ("rel_mse", "correlation"):
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} REAL")
                conn.execute("CREATE TABLE leases (job_key TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                             "expires_at REAL NOT NULL)")
                _rescore_from_pngs(conn)
                current = 2
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(current),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @_reading
    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not self._tables(conn):  # another process may have created it while we waited
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                now = utc_now()
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                 [("app", APP_NAME), ("schema_version", str(SCHEMA_VERSION)), ("created_at", now)])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        for _ in range(50):
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError:  # another connection holds a lock for a moment
                mode = None
            if mode == "wal":
                break
            time.sleep(0.1)
        else:
            raise StoreError(f"could not switch {self.path} to WAL mode (is it on a network drive?); use a "
                             f"local file for --db")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")

    # ---- basics --------------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"results database {self.path} is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with _HELD_LOCK:
                self._conn.close()
                self._conn = None
                held = _HELD.get(self._held_key)
                if held is not None:
                    held[0] -= 1
                    if held[0] <= 0:
                        del _HELD[self._held_key]

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_reading
    def meta(self) -> dict[str, str]:
        """The ``meta`` table as a dict (``app``, ``schema_version``, ``created_at``)."""
        return {row["key"]: row["value"] for row in self.conn.execute("SELECT key, value FROM meta")}

    @_reading
    def journal_mode(self) -> str:
        return str(self.conn.execute("PRAGMA journal_mode").fetchone()[0])

    def _require_writer(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only; open it with readonly=False to write")

    def transaction(self):
        """``with store.transaction():`` runs its statements (on ``store.conn``) in one ``BEGIN
        IMMEDIATE`` transaction, committed at the end and rolled back on an exception (writers only)."""
        self._require_writer()
        self._check_same_file()
        self._wrote = self._wal  # from this commit on, a WAL database has its -wal file while it is open
        return _Immediate(self.conn, self.path)

    def _check_same_file(self) -> None:
        """Raise :class:`StoreError` when the path no longer names the file this writer opened, or
        its ``-wal`` file is gone: a commit now would go into an unlinked file and be lost."""
        if self._held_key is None:
            return
        now = _file_identity(self.path)
        wal = self.path.with_name(self.path.name + "-wal")
        if now == self._held_key and (not self._wrote or wal.exists()):
            return
        what = ("was deleted" if now is None else "was replaced by another file" if now != self._held_key
                else "lost its -wal file")
        raise StoreError(f"{self.path} {what} while this run had it open (a git checkout or stash of a "
                         f"tracked database, a copy over it, rm?); rows written now would be lost, so "
                         f"nothing more is written. Rows already committed since then are in the old, "
                         f"unlinked file and cannot be recovered; rerun the command on the database you "
                         f"want and it resumes from what that file holds.")

    # ---- writing -------------------------------------------------------------------------------

    def register_study(self, study_key: str, name: str, config_json: str, job_keys: Iterable[str]) -> None:
        """Record a study configuration and the jobs of its grid (idempotent)."""
        self._require_writer()
        now = utc_now()
        keys = [(study_key, key) for key in job_keys]
        with self.transaction():
            self.conn.execute("INSERT INTO studies (study_key, name, config_json, created_at, updated_at) "
                              "VALUES (?, ?, ?, ?, ?) ON CONFLICT (study_key) DO UPDATE SET updated_at = "
                              "excluded.updated_at", (study_key, name, config_json, now, now))
            self.conn.executemany("INSERT OR IGNORE INTO study_jobs (study_key, job_key) VALUES (?, ?)", keys)

    def write_job(self, row: Mapping[str, object], proxies: Sequence[Mapping[str, object]] = ()) -> WriteOutcome:
        """Store one job's row and its proxies in one ``BEGIN IMMEDIATE`` transaction.

        A stored ``'done'`` row is kept as it is (the call is a no-op); a stored ``'error'`` row is
        replaced, with its proxies; otherwise the row is inserted.
        """
        self._require_writer()
        unknown = set(row) - set(JOB_COLUMNS)
        if unknown:
            raise StoreError(f"unknown job columns {sorted(unknown)}")
        missing = [c for c in REQUIRED_JOB_COLUMNS if row.get(c) is None]
        if missing:
            raise StoreError(f"job row lacks {missing}")
        if row["status"] not in JOB_STATUSES:
            raise StoreError(f"job status must be one of {JOB_STATUSES}, got {row['status']!r}")
        values = {c: _sql_value(row.get(c)) for c in JOB_COLUMNS}
        values["created_at"] = values["created_at"] or utc_now()
        key = values["job_key"]
        with self.transaction():
            found = self.conn.execute("SELECT status FROM jobs WHERE job_key = ?", (key,)).fetchone()
            if found is not None and found["status"] == "done":
                return WriteOutcome("kept", "done")
            if found is not None:  # a previous attempt failed: the only case a row is replaced
                self.conn.execute("DELETE FROM proxies WHERE job_key = ?", (key,))
                self.conn.execute("DELETE FROM jobs WHERE job_key = ?", (key,))
            placeholders = ", ".join("?" for _ in JOB_COLUMNS)
            self.conn.execute(f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({placeholders})",
                              [values[c] for c in JOB_COLUMNS])
            self.conn.executemany(
                f"INSERT INTO proxies (job_key, {', '.join(PROXY_COLUMNS)}) "
                f"VALUES (?, {', '.join('?' for _ in PROXY_COLUMNS)})",
                [[key] + [_sql_value(p.get(c)) for c in PROXY_COLUMNS] for p in proxies])
        return WriteOutcome("inserted" if found is None else "replaced", str(values["status"]))

    # ---- reading -------------------------------------------------------------------------------

    @_reading
    def statuses(self, job_keys: Iterable[str] | None = None) -> dict[str, str]:
        """job_key -> status for the given keys (those stored), or for every job."""
        if job_keys is None:
            return {r[0]: r[1] for r in self.conn.execute("SELECT job_key, status FROM jobs")}
        out: dict[str, str] = {}
        keys = list(job_keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            query = f"SELECT job_key, status FROM jobs WHERE job_key IN ({', '.join('?' for _ in chunk)})"
            out.update({r[0]: r[1] for r in self.conn.execute(query, chunk)})
        return out

    @_reading
    def cached_proxies(self, proxy_key: str) -> tuple[str, list[dict], float | None, float | None] | None:
        """Proxies already computed for ``proxy_key`` by a finished job: (job_key that computed them,
        proxy rows, exact seconds, paper seconds), or ``None``."""
        found = self.conn.execute(
            "SELECT job_key, proxies_from, proxy_exact_seconds, proxy_paper_seconds FROM jobs "
            "WHERE proxy_key = ? AND status = 'done' ORDER BY proxies_from IS NOT NULL, created_at LIMIT 1",
            (proxy_key,)).fetchone()
        if found is None:
            return None
        rows = self.proxy_rows([found["job_key"]])
        if not rows:
            return None
        return (found["proxies_from"] or found["job_key"], rows, found["proxy_exact_seconds"],
                found["proxy_paper_seconds"])

    @_reading
    def proxy_rows(self, job_keys: Iterable[str] | None = None) -> list[dict]:
        """Rows of the ``proxies`` table (with ``job_key``), for the given jobs or all."""
        cols = "job_key, " + ", ".join(PROXY_COLUMNS)
        if job_keys is None:
            cursor = self.conn.execute(f"SELECT {cols} FROM proxies ORDER BY job_key, flavour, proxy")
            return [_python_row(r) for r in cursor]
        out: list[dict] = []
        keys = list(job_keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            cursor = self.conn.execute(f"SELECT {cols} FROM proxies WHERE job_key IN "
                                       f"({', '.join('?' for _ in chunk)}) ORDER BY job_key, flavour, proxy", chunk)
            out.extend(_python_row(r) for r in cursor)
        return out

    @_reading
    def job_rows(self, *, study: str | None = None, status: str | None = None,
                 with_images: bool = False) -> list[dict]:
        """Rows of ``jobs`` as dicts (NULL stays ``None``; NaN is stored as NULL), optionally only the
        jobs of study ``study`` (its name) and of one ``status``; PNG BLOBs only ``with_images``."""
        present = self._columns("jobs")  # an older schema read as it is lacks some columns: NULL
        columns = [c for c in JOB_COLUMNS if with_images or c not in BLOB_COLUMNS]
        query = f"SELECT {', '.join(('j.' + c) if c in present else f'NULL AS {c}' for c in columns)} FROM jobs j"
        args: list[object] = []
        clauses = []
        if study is not None:
            query += (" JOIN study_jobs sj ON sj.job_key = j.job_key JOIN studies s ON s.study_key = sj.study_key")
            clauses.append("s.name = ?")
            args.append(study)
        if status is not None:
            clauses.append("j.status = ?")
            args.append(status)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY j.dataset, j.loss, j.arch, j.image_index, j.job_key"
        rows = [_python_row(r) for r in self.conn.execute(query, args)]
        if study is not None:  # a job may belong to several study configurations of that name
            seen: set[str] = set()
            rows = [r for r in rows if not (r["job_key"] in seen or seen.add(r["job_key"]))]
        return rows

    @_reading
    def studies(self) -> list[dict]:
        """Every study configuration that wrote here, with its number of jobs and of finished jobs."""
        cursor = self.conn.execute(
            "SELECT s.study_key, s.name, s.config_json, s.created_at, s.updated_at, COUNT(sj.job_key) AS jobs, "
            "SUM(CASE WHEN j.status = 'done' THEN 1 ELSE 0 END) AS done FROM studies s "
            "LEFT JOIN study_jobs sj ON sj.study_key = s.study_key LEFT JOIN jobs j ON j.job_key = sj.job_key "
            "GROUP BY s.study_key ORDER BY s.created_at")
        return [dict(r) for r in cursor]

    @_reading
    def images(self, job_key: str) -> tuple[bytes | None, bytes | None]:
        """(reconstruction PNG, ground-truth PNG) of one job; ``None`` where not stored."""
        found = self.conn.execute("SELECT reconstruction_png, truth_png FROM jobs WHERE job_key = ?",
                                  (job_key,)).fetchone()
        if found is None:
            raise StoreError(f"no job {job_key[:12]}… in {self.path}")
        return found["reconstruction_png"], found["truth_png"]

    @_reading
    def count(self, status: str | None = None) -> int:
        if status is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
        return int(self.conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0])


class _Immediate:
    """``with`` block running one ``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception)."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn, self.path = conn, path

    def __enter__(self):
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot write {self.path}: {exc} (another program has held it locked for "
                             f"{BUSY_TIMEOUT_MS // 1000} s, or it is read-only)") from exc
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as error:
                self.conn.execute("ROLLBACK")
                raise StoreError(f"cannot write {self.path}: {error}") from error
        else:
            self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write {self.path}: {exc}") from exc


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when nothing is there."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _sql_value(value):
    """Python value -> SQLite value: bools to 0/1, NaN to NULL, numpy scalars to Python numbers,
    dicts and lists to JSON."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (bytes, bytearray)):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def _rescore_from_pngs(conn: sqlite3.Connection) -> None:
    """Fill ``rel_mse`` and ``correlation`` of stored rows from their reconstruction and truth PNGs (8-bit:
    within about 1e-5 of the full-precision values for the images studied here)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from .metrics import pixel_correlation, relative_mse

    def decode(png: bytes) -> torch.Tensor:
        array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    rows = conn.execute("SELECT job_key, reconstruction_png, truth_png FROM jobs "
                        "WHERE reconstruction_png IS NOT NULL AND truth_png IS NOT NULL").fetchall()
    for row in rows:
        recon, truth = decode(row[1]), decode(row[2])
        conn.execute("UPDATE jobs SET rel_mse = ?, correlation = ? WHERE job_key = ?",
                     (_sql_value(relative_mse(recon, truth)), _sql_value(pixel_correlation(recon, truth)),
                      row[0]))


def _python_row(row: sqlite3.Row) -> dict:
    return {key: row[key] for key in row.keys()}


def open_store(path: str | os.PathLike, *, readonly: bool = False) -> ResultStore:
    """Open (a writer creates) the results database at ``path``; see :class:`ResultStore`."""
    return ResultStore(path, readonly=readonly)
