"""Background jobs for an interactive front end: long work runs in a daemon thread, the caller polls.

The app keeps one :class:`BackgroundAttack` per browser session (in that session's state) and reads
:meth:`BackgroundAttack.view` a few times a second to draw the live reconstruction; the worker thread
never touches the UI. :class:`BackgroundTask` runs any function the same way (proxies, a ranking of
four images), and :class:`TaskPool` shares tasks whose result depends only on a key (the proxies of
one scenario) between sessions, like a cache that also remembers work in progress.

A server shares its CPU cores between every session, so heavy work is bounded: a :class:`SlotQueue`
lets at most a fixed number of jobs compute at once (the others wait in order and can tell their
position), and a :class:`JobBoard` records which owner (a browser session) wants which job, keeps one
job per kind per owner, and stops jobs whose owners have all gone (a closed tab, a reloaded page) from
a watchdog thread.

Nothing here imports streamlit: the board asks a function it is given whether an owner is still there.
"""

from __future__ import annotations

import atexit
import threading
import time
import traceback
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from . import hessian
from .attacks import AttackSnapshot
from .errors import ConfigError, LavpError
from .runner import AttackOutcome, PresetRun

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"
EXIT_WAIT_SECONDS = 10.0

# The lock serialising forward-mode autodiff across threads lives with the code that uses it
# (lavp_core.hessian takes it around every forward-mode product). It is re-entrant, so background work
# may also hold it around a whole proxy computation, to tell its user that it is waiting.
FORWARD_AD_LOCK = hessian.FORWARD_AD_LOCK

_live: weakref.WeakSet = weakref.WeakSet()  # jobs whose worker thread may still run
_live_lock = threading.Lock()


def _register(job) -> None:
    with _live_lock:
        _live.add(job)


def running_jobs() -> list:
    """Every :class:`BackgroundAttack` and :class:`BackgroundTask` of this process still running."""
    with _live_lock:
        return [job for job in list(_live) if not job.finished]


def stop_all(wait: float = EXIT_WAIT_SECONDS) -> bool:
    """Ask every running job to stop and wait up to ``wait`` seconds in all; True if all have ended.

    Registered with :mod:`atexit`: a worker thread still inside PyTorch when the interpreter tears down
    can abort the process, so jobs get a chance to end first.
    """
    jobs = running_jobs()
    for job in jobs:
        job.stop()
    deadline = time.monotonic() + wait
    for job in jobs:
        job.wait(max(0.0, deadline - time.monotonic()))
    return not running_jobs()


atexit.register(stop_all)


@dataclass(frozen=True)
class JobError:
    """Why a job failed: ``user`` errors (a :class:`~lavp_core.errors.LavpError`) carry a message that
    says what to do; other errors are bugs, with the traceback kept for the log."""

    message: str
    user: bool
    kind: str
    traceback: str = ""

    @classmethod
    def of(cls, exc: BaseException) -> JobError:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if isinstance(exc, LavpError):
            return cls(str(exc), True, type(exc).__name__, text)
        return cls(f"{type(exc).__name__}: {exc}", False, type(exc).__name__, text)


@dataclass(frozen=True)
class AttackView:
    """A consistent copy of a :class:`BackgroundAttack`'s state at one instant.

    ``history`` holds (step, matching loss) of every snapshot seen; ``snapshot`` is the latest one (or
    ``None`` before the first); ``outcome`` and ``summary`` are set once the run has ended;
    ``first_frame_seconds`` is the time from :meth:`BackgroundAttack.start` to the first snapshot.
    """

    state: str
    snapshot: AttackSnapshot | None
    history: tuple[tuple[int, float], ...]
    outcome: AttackOutcome | None
    summary: Any
    error: JobError | None
    elapsed: float
    first_frame_seconds: float | None
    stop_requested: bool
    queue_position: int | None = None  # 1, 2, …: waiting for a free slot; None once computing (or ended)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] (1 once finished)."""
        if self.finished:
            return 1.0
        if self.snapshot is None or self.snapshot.total_steps <= 0:
            return 0.0
        return min(1.0, max(0.0, self.snapshot.step / self.snapshot.total_steps))


class SlotQueue:
    """At most ``slots`` heavy jobs compute at once; the others wait first come, first served.

    A job calls :meth:`acquire` in its worker thread before computing and :meth:`release` after;
    :meth:`position` says where a waiting job stands (1 = next), so a page can show it.
    """

    def __init__(self, slots: int):
        if int(slots) < 1:
            raise ConfigError(f"a slot queue needs at least one slot, got {slots}")
        self.slots = int(slots)
        self._cond = threading.Condition()
        self._holders: set[int] = set()
        self._waiting: deque[int] = deque()

    def acquire(self, token: int, cancelled: Callable[[], bool], poll: float = 0.1) -> bool:
        """Wait until ``token`` may compute (True) or ``cancelled()`` turns true while it waits (False)."""
        with self._cond:
            self._waiting.append(token)
            try:
                while True:
                    if cancelled():
                        return False
                    if self._waiting[0] == token and len(self._holders) < self.slots:
                        self._holders.add(token)
                        return True
                    self._cond.wait(poll)
            finally:
                self._waiting.remove(token)
                self._cond.notify_all()

    def release(self, token: int) -> None:
        with self._cond:
            self._holders.discard(token)
            self._cond.notify_all()

    def position(self, token: int) -> int | None:
        """1-based place of ``token`` among the waiting jobs, or ``None`` when it is not waiting."""
        with self._cond:
            for place, waiting in enumerate(self._waiting, start=1):
                if waiting == token:
                    return place
            return None

    def load(self) -> tuple[int, int]:
        """(jobs computing, jobs waiting) now."""
        with self._cond:
            return len(self._holders), len(self._waiting)


class SharedSlot:
    """One place in a :class:`SlotQueue` shared by a group of jobs that compute together (the Attack page's
    L2 and cosine runs of one comparison): the first member to ask waits in the queue for one slot, the
    others join it, and the slot is released when the last member ends. The server-wide cap counts the
    group as one computation; each member still claims its own kind on the :class:`JobBoard`.

    It has :class:`SlotQueue`'s interface (``slots``, :meth:`acquire`, :meth:`release`, :meth:`position`,
    :meth:`load`), so a job takes it where it would take the queue.
    """

    def __init__(self, queue: SlotQueue):
        self.queue = queue
        self.slots = queue.slots
        self._lock = threading.Lock()  # held while the first member waits, so the others join its slot
        self._members: set[int] = set()

    def acquire(self, token: int, cancelled: Callable[[], bool], poll: float = 0.1) -> bool:
        """Join the group's slot (waiting for it in the queue if no member holds it yet)."""
        with self._lock:
            if not self._members and not self.queue.acquire(id(self), cancelled, poll):
                return False
            self._members.add(token)
            return True

    def release(self, token: int) -> None:
        with self._lock:
            if token in self._members:
                self._members.discard(token)
                if not self._members:
                    self.queue.release(id(self))

    def position(self, token: int) -> int | None:
        """The group's place among the waiting jobs (``None`` once it computes)."""
        return self.queue.position(id(self))

    def load(self) -> tuple[int, int]:
        return self.queue.load()


class _ThreadedWork:
    """What both kinds of background work share: a daemon worker thread started once, a lock over the
    state, an end state (done, cancelled or failed with a :class:`JobError`) and the elapsed time.
    Subclasses implement :meth:`_body`, which runs in the thread and returns ``DONE`` or ``CANCELLED``,
    and :meth:`_cancel_requested`. With a :class:`SlotQueue`, the body waits for a slot first; a job
    stopped while it waits ends cancelled without computing, and its elapsed time starts with the body."""

    def __init__(self, name: str, slots: SlotQueue | SharedSlot | None = None):
        self._name = name
        self._slots = slots
        self._lock = threading.Lock()
        self._state = RUNNING
        self._error: JobError | None = None
        self._started: float | None = None
        self._ended: float | None = None
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self):
        """Start the worker thread (once); returns ``self``."""
        with self._lock:
            if self._thread is not None:
                return self
            if self._slots is None:
                self._started = time.perf_counter()
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
        _register(self)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work has ended (or ``timeout`` seconds passed); True if it has ended."""
        return self._finished.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def _elapsed(self) -> float:
        """Seconds since the start (up to the end once ended); call under ``self._lock``."""
        now = self._ended if self._ended is not None else time.perf_counter()
        return 0.0 if self._started is None else now - self._started

    def queue_position(self) -> int | None:
        """1-based place among the jobs waiting for a slot, or ``None`` (computing, ended, or no queue)."""
        return None if self._slots is None else self._slots.position(id(self))

    def _body(self) -> str:
        raise NotImplementedError

    def _cancel_requested(self) -> bool:
        raise NotImplementedError

    def _work(self) -> None:
        holding = False
        try:
            if self._slots is not None:
                holding = self._slots.acquire(id(self), self._cancel_requested)
                if not holding:  # stopped while waiting: nothing was computed
                    with self._lock:
                        self._state = CANCELLED
                    return
                with self._lock:
                    self._started = time.perf_counter()
            state = self._body()
            with self._lock:
                self._state = state
        except BaseException as exc:  # the thread must always end in a readable state
            with self._lock:
                self._error = JobError.of(exc)
                self._state = FAILED
        finally:
            if holding:
                self._slots.release(id(self))
            with self._lock:
                self._ended = time.perf_counter()
            self._finished.set()


class BackgroundAttack(_ThreadedWork):
    """Iterate a :class:`~lavp_core.runner.PresetRun` in a daemon thread; read its progress any time.

    Args:
        run: the attack, already constructed (so that bad settings fail in the caller, at once).
        summarize: optional function called in the worker thread with the outcome when the run ends;
            its return value is kept as ``view().summary`` (e.g. the similarity scores).
        name: name of the worker thread (for logs).
        slots: optional :class:`SlotQueue` the run waits in before computing.

    Thread safety: the worker writes under a lock and :meth:`view` copies under the same lock, so a
    reader never sees a snapshot from one step with the history of another.
    """

    def __init__(self, run: PresetRun, *, summarize: Callable[[AttackOutcome], Any] | None = None,
                 name: str = "lavp-attack", slots: SlotQueue | SharedSlot | None = None):
        super().__init__(name, slots)
        self.run = run
        self._summarize = summarize
        self._snapshot: AttackSnapshot | None = None
        self._history: list[tuple[int, float]] = []
        self._outcome: AttackOutcome | None = None
        self._summary: Any = None
        self._first_frame: float | None = None
        self._stop = threading.Event()
        self._first = threading.Event()

    def stop(self) -> None:
        """Ask the attack to stop after its current step; the result so far becomes the outcome."""
        self._stop.set()
        self.run.cancel()

    def wait_first_snapshot(self, timeout: float | None = None) -> bool:
        """Block until the first snapshot (or the end of the run) or ``timeout``; True if either came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._first.wait(0.02) or self._finished.is_set():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def view(self) -> AttackView:
        """A consistent copy of the current state (cheap: the images are shared, not copied)."""
        position = self.queue_position()
        with self._lock:
            return AttackView(self._state, self._snapshot, tuple(self._history), self._outcome, self._summary,
                              self._error, self._elapsed(), self._first_frame, self._stop.is_set(), position)

    def _cancel_requested(self) -> bool:
        return self._stop.is_set()

    def _body(self) -> str:
        for snapshot in self.run:
            with self._lock:
                if self._first_frame is None:
                    self._first_frame = time.perf_counter() - self._started
                self._snapshot = snapshot
                self._history.append((int(snapshot.step), float(snapshot.matching_loss)))
            self._first.set()
        outcome = self.run.outcome
        summary = self._summarize(outcome) if self._summarize is not None and outcome is not None else None
        with self._lock:
            self._outcome, self._summary = outcome, summary
        cancelled = self._stop.is_set() or (outcome is not None and outcome.cancelled)
        return CANCELLED if cancelled else DONE


class TaskControl:
    """What a task's function receives: a cancellation flag and a way to report progress."""

    def __init__(self):
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress = 0.0
        self._message = ""

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def report(self, fraction: float, message: str = "") -> None:
        """Record progress in [0, 1] and a short line saying what is being done."""
        with self._lock:
            self._progress = min(1.0, max(0.0, float(fraction)))
            self._message = str(message)

    def progress(self) -> tuple[float, str]:
        with self._lock:
            return self._progress, self._message


@dataclass(frozen=True)
class TaskView:
    """A consistent copy of a :class:`BackgroundTask`'s state."""

    state: str
    result: Any
    error: JobError | None
    progress: float
    message: str
    elapsed: float
    queue_position: int | None = None  # 1, 2, …: waiting for a free slot; None once computing (or ended)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def finished(self) -> bool:
        return self.state != RUNNING


class BackgroundTask(_ThreadedWork):
    """Run ``fn(control)`` in a daemon thread and keep its result or error.

    ``fn`` receives a :class:`TaskControl`; a function made of several parts should check
    ``control.cancelled`` between them and may call ``control.report``. :meth:`stop` sets the flag: a
    function that never checks it runs to its end (its result is then still kept).
    """

    def __init__(self, fn: Callable[[TaskControl], Any], *, name: str = "lavp-task", slots: SlotQueue | None = None):
        super().__init__(name, slots)
        self._fn = fn
        self.control = TaskControl()
        self._result: Any = None

    def stop(self) -> None:
        self.control.cancel()

    def view(self) -> TaskView:
        fraction, message = self.control.progress()
        position = self.queue_position()
        with self._lock:
            if self._state != RUNNING:
                fraction = 1.0
            return TaskView(self._state, self._result, self._error, fraction, message, self._elapsed(), position)

    def _cancel_requested(self) -> bool:
        return self.control.cancelled

    def _body(self) -> str:
        result = self._fn(self.control)
        with self._lock:
            self._result = result
        return CANCELLED if self.control.cancelled else DONE


class TaskPool:
    """Tasks keyed by what their result depends on, shared by every caller (thread-safe).

    :meth:`submit` returns the task already known for ``key`` (running or done) or starts a new one;
    a failed or cancelled task is replaced on the next submit. At most ``max_finished`` finished tasks
    are kept (least recently submitted dropped first); running tasks are always kept.

    With a :class:`JobBoard`, new tasks wait in its slot queue, and a submit that names an ``owner``
    records that owner's interest on the board (one task per kind per owner; a task nobody wants any
    more is stopped).
    """

    def __init__(self, max_finished: int = 64, board: JobBoard | None = None):
        self.max_finished = int(max_finished)
        self.board = board
        self._lock = threading.Lock()
        self._tasks: OrderedDict[Hashable, BackgroundTask] = OrderedDict()

    def get(self, key: Hashable) -> BackgroundTask | None:
        with self._lock:
            return self._tasks.get(key)

    def submit(self, key: Hashable, fn: Callable[[TaskControl], Any], *, name: str = "lavp-task",
               owner: str | None = None, kind: str | None = None) -> BackgroundTask:
        """The task for ``key``, started if needed; ``owner`` (with the task's ``kind``, default
        ``name``) is recorded on the board."""
        with self._lock:
            task = self._tasks.get(key)
            if task is None or task.view().state not in (RUNNING, DONE):
                task = BackgroundTask(fn, name=name, slots=None if self.board is None else self.board.slots)
                self._tasks[key] = task
            self._tasks.move_to_end(key)
            self._trim()
        if self.board is not None and owner is not None and not task.finished:
            self.board.claim(owner, kind or name, task)
        return task.start()

    def _trim(self) -> None:
        finished = [k for k, t in self._tasks.items() if t.finished]
        for key in finished[:max(0, len(finished) - self.max_finished)]:
            del self._tasks[key]


class JobBoard:
    """Who wants which background job, for a server shared by many owners (browser sessions).

    Args:
        slots: how many heavy jobs may compute at once (a :class:`SlotQueue` of that size is
            :attr:`slots`; give it to the jobs).
        alive: ``alive(owner) -> bool``: whether an owner is still there (default: always).
        grace: seconds an owner must stay gone before its jobs are stopped (a dropped connection that
            comes back within it keeps them).
        interval: seconds between two sweeps of the watchdog thread.

    :meth:`claim` records that an owner wants a job as its one job of a kind: the owner's previous job of
    that kind loses the owner, and a job no owner wants any more is stopped. The watchdog (started by the
    first claim) calls :meth:`sweep`, which drops the owners gone for ``grace`` seconds, stops the jobs left
    without owners and runs the callbacks given to :meth:`on_owner_gone`. A job claimed by no one (the
    command line, a test) is never stopped by the board.
    """

    def __init__(self, slots: int, *, alive: Callable[[str], bool] | None = None, grace: float = 5.0,
                 interval: float = 1.0):
        self.slots = SlotQueue(slots)
        self.alive = alive if alive is not None else (lambda owner: True)
        self.grace, self.interval = float(grace), float(interval)
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str], _ThreadedWork] = {}  # (owner, kind) -> job
        self._owners: dict[int, set[str]] = {}  # id(job) -> owners
        self._jobs: dict[int, _ThreadedWork] = {}
        self._gone_since: dict[str, float] = {}
        self._farewells: dict[str, list[Callable[[], None]]] = {}
        self._watchdog: threading.Thread | None = None

    def claim(self, owner: str, kind: str, job, *, exclusive: bool = False):
        """Record that ``owner`` wants ``job`` as its one job of ``kind``; returns ``job``.

        Raises:
            ConfigError: ``exclusive`` and the owner's previous job of this kind still runs (nothing is
                changed; the message says to stop it or wait).
        """
        dropped = []
        with self._lock:
            previous = self._current.get((owner, kind))
            if previous is not None and previous is not job and not previous.finished:
                if exclusive:
                    raise ConfigError(f"this session already runs a job of kind {kind!r}; stop it or wait for it "
                                      f"to end before starting another")
                dropped = self._drop_owner(previous, owner)
            self._current[(owner, kind)] = job
            self._jobs[id(job)] = job
            self._owners.setdefault(id(job), set()).add(owner)
            self._gone_since.pop(owner, None)
        for orphan in dropped:
            orphan.stop()
        self._ensure_watchdog()
        return job

    def current(self, owner: str, kind: str):
        """The job ``owner`` last claimed as its ``kind`` (running or ended), or ``None``."""
        with self._lock:
            return self._current.get((owner, kind))

    def owners(self, job) -> set[str]:
        with self._lock:
            return set(self._owners.get(id(job), ()))

    def on_owner_gone(self, owner: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once, from the watchdog, when ``owner`` has been gone for ``grace`` seconds."""
        with self._lock:
            self._farewells.setdefault(owner, []).append(callback)
        self._ensure_watchdog()

    def load(self) -> tuple[int, int]:
        """(jobs computing, jobs waiting for a slot) on this board's queue."""
        return self.slots.load()

    def sweep(self, now: float | None = None) -> list:
        """One pass of the watchdog: stop the jobs whose owners have all been gone for ``grace`` seconds
        and say farewell to those owners. Returns the jobs it stopped."""
        now = time.monotonic() if now is None else now
        with self._lock:
            owners = {owner for owner, _ in self._current} | set(self._farewells)
        gone = set()
        for owner in owners:
            try:
                alive = bool(self.alive(owner))
            except Exception:  # a failing check must not stop anyone's work
                alive = True
            if alive:
                with self._lock:
                    self._gone_since.pop(owner, None)
                continue
            with self._lock:
                since = self._gone_since.setdefault(owner, now)
            if now - since >= self.grace:
                gone.add(owner)
        stopped, farewells = [], []
        with self._lock:
            for owner in gone:
                for key in [k for k in self._current if k[0] == owner]:
                    stopped.extend(self._drop_owner(self._current.pop(key), owner))
                farewells.extend(self._farewells.pop(owner, []))
                self._gone_since.pop(owner, None)
            for key in [k for k, job in self._jobs.items() if job.finished]:  # forget ended jobs
                if not any(j is self._jobs[key] for j in self._current.values()):
                    self._jobs.pop(key)
                    self._owners.pop(key, None)
        for job in stopped:
            job.stop()
        for farewell in farewells:
            try:
                farewell()
            except Exception:  # cleaning up after one owner must not end the watchdog
                pass
        return stopped

    def _drop_owner(self, job, owner: str) -> list:
        """Remove ``owner`` from ``job``'s owners (under the lock); the job if it now has none and runs."""
        owners = self._owners.get(id(job))
        if owners is None:
            return []
        owners.discard(owner)
        return [job] if not owners and not job.finished else []

    def _ensure_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is not None:
                return
            self._watchdog = threading.Thread(target=self._watch, name="lavp-job-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.sweep()
            except Exception:  # the watchdog must outlive any one failure
                pass
