"""Job leases: how runners that share a results database avoid computing a job twice.

Before a runner starts a job it *claims* it: in one ``BEGIN IMMEDIATE`` transaction it checks that no
other runner finished the job meanwhile and that no other runner holds a live lease on it, and writes
its own lease ``(job_key, owner, expires_at)`` into the store's ``leases`` table. The lease is renewed
while the job runs (:meth:`JobLeases.heartbeat`, every :data:`HEARTBEAT_SECONDS`, each renewal
extending it to :data:`LEASE_SECONDS` from then) and released once the job's row is written. A second
runner skips a job whose lease is live; a lease that expired (its runner was killed, or lost the
database for longer than the lease) is taken over by the next runner that claims the job, and so is
at once the lease of a runner of this host whose process is gone (a study killed and rerun at once
resumes every job; a recycled pid only makes it wait for the expiry).

Expiry uses each runner's wall clock (``time.time()``): runners on several hosts that share one
database need clocks in step to well under the lease time (NTP does that).

An error row that another runner wrote while this one was running is not retried by this one either:
it counts as that runner's attempt (rerunning the study retries it, as always).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import StoreError
from ..store import ResultStore, open_store

LEASE_SECONDS = 120.0
"""How long a claim on a job lasts unless renewed."""
HEARTBEAT_SECONDS = 30.0
"""How often a running study renews its leases."""


def lease_owner() -> str:
    """A name for this runner that no other runner shares: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the runner ``owner`` (``host:pid:random``) still runs: known only for a runner of this
    host (``False`` when no process has its pid), ``None`` for another host's or an unreadable name."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return None
    return True


@dataclass(frozen=True)
class Lease:
    """A row of the ``leases`` table: ``owner`` claims ``job_key`` until ``expires_at`` (Unix seconds)."""

    job_key: str
    owner: str
    expires_at: float


def read_leases(store: ResultStore) -> list[Lease]:
    """Every lease in the database, live or expired (oldest expiry first)."""
    cursor = store.conn.execute("SELECT job_key, owner, expires_at FROM leases ORDER BY expires_at, job_key")
    return [Lease(row[0], row[1], float(row[2])) for row in cursor]


class JobLeases:
    """One runner's leases on the jobs of an open results database (a writer).

    Args:
        store: the runner's open store; claims and releases run on ``store.conn``, each in its own
            :meth:`~lavp_core.store.ResultStore.transaction`.
        owner: this runner's name (default :func:`lease_owner`).
        lease_seconds: how long a claim or a renewal lasts.
        clock: the time in Unix seconds (``time.time``; a test may pass another).
    """

    def __init__(self, store: ResultStore, *, owner: str | None = None, lease_seconds: float = LEASE_SECONDS,
                 clock: Callable[[], float] = time.time):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self.store = store
        self.owner = owner or lease_owner()
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self.taken_over = 0  # claims that replaced another runner's expired lease
        self._seen: dict[str, str] = {}  # job_key -> created_at of the row stored when this runner began

    def note_stored(self, job_keys: Iterable[str]) -> None:
        """Remember the rows the database holds now for ``job_keys`` (call it when the run begins): a
        claim then refuses a job whose row was written after this (by another runner)."""
        keys = list(job_keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            query = f"SELECT job_key, created_at FROM jobs WHERE job_key IN ({', '.join('?' for _ in chunk)})"
            self._seen.update({row[0]: row[1] for row in self.store.conn.execute(query, chunk)})

    def claim(self, job_key: str) -> bool:
        """Claim ``job_key`` for :data:`lease_seconds`, in one transaction. ``False`` (nothing written)
        when another runner holds a live lease on it, or finished it, or stored an error for it since
        :meth:`note_stored`. Another runner's lease is taken over when it expired, or at once when
        that runner ran on this host and its process is gone (:func:`owner_alive`)."""
        conn = self.store.conn
        with self.store.transaction():
            now = self.clock()
            row = conn.execute("SELECT status, created_at FROM jobs WHERE job_key = ?", (job_key,)).fetchone()
            if row is not None and (row[0] == "done" or row[1] != self._seen.get(job_key)):
                return False
            lease = conn.execute("SELECT owner, expires_at FROM leases WHERE job_key = ?", (job_key,)).fetchone()
            if lease is not None and lease[0] != self.owner:
                if float(lease[1]) > now and owner_alive(lease[0]) is not False:
                    return False
                self.taken_over += 1
            conn.execute("INSERT INTO leases (job_key, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT (job_key) "
                         "DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                         (job_key, self.owner, now + self.lease_seconds))
        return True

    def release(self, job_key: str) -> None:
        """Drop this runner's lease on ``job_key`` (call it once the job's row is written)."""
        with self.store.transaction():
            self.store.conn.execute("DELETE FROM leases WHERE job_key = ? AND owner = ?", (job_key, self.owner))

    def release_all(self) -> None:
        """Drop every lease this runner holds (a run that stops early leaves no claim behind)."""
        with self.store.transaction():
            self.store.conn.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))

    def held(self) -> list[str]:
        """Keys of the jobs this runner holds a lease on."""
        cursor = self.store.conn.execute("SELECT job_key FROM leases WHERE owner = ? ORDER BY job_key", (self.owner,))
        return [row[0] for row in cursor]

    @contextmanager
    def heartbeat(self, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
        """``with leases.heartbeat():`` renews this runner's leases every ``every`` seconds (to
        ``lease_seconds`` from then) in a background thread with its own connection to the database
        (the runner's connection stays the runner's). A renewal that fails (the database locked for
        longer than its busy timeout) is tried again at the next beat."""
        if every <= 0 or every >= self.lease_seconds:
            raise ValueError(f"the heartbeat ({every} s) must be positive and shorter than the lease "
                             f"({self.lease_seconds} s)")
        beats = open_store(self.store.path)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                try:
                    renew_leases(beats, self.owner, self.clock() + self.lease_seconds)
                except StoreError:
                    pass

        thread = threading.Thread(target=beat, daemon=True, name="lease-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            beats.close()


def renew_leases(store: ResultStore, owner: str, expires_at: float) -> int:
    """Extend every lease of ``owner`` to ``expires_at`` in one transaction; the number renewed."""
    with store.transaction():
        cursor = store.conn.execute("UPDATE leases SET expires_at = ? WHERE owner = ?", (expires_at, owner))
    return cursor.rowcount
