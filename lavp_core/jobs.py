"""Background jobs for an interactive front end: long work runs in a daemon thread, the caller polls.

The app keeps one :class:`BackgroundAttack` per browser session (in that session's state) and reads
:meth:`BackgroundAttack.view` a few times a second to draw the live reconstruction; the worker thread
never touches the UI. :class:`BackgroundTask` runs any function the same way (proxies, a ranking of
four images), and :class:`TaskPool` shares tasks whose result depends only on a key (the proxies of
one scenario) between sessions, like a cache that also remembers work in progress.

Nothing here imports streamlit.
"""

from __future__ import annotations

import atexit
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from . import hessian
from .attacks import AttackSnapshot
from .errors import LavpError
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


class _ThreadedWork:
    """What both kinds of background work share: a daemon worker thread started once, a lock over the
    state, an end state (done, cancelled or failed with a :class:`JobError`) and the elapsed time.
    Subclasses implement :meth:`_body`, which runs in the thread and returns ``DONE`` or ``CANCELLED``."""

    def __init__(self, name: str):
        self._name = name
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

    def _body(self) -> str:
        raise NotImplementedError

    def _work(self) -> None:
        try:
            state = self._body()
            with self._lock:
                self._state = state
        except BaseException as exc:  # the thread must always end in a readable state
            with self._lock:
                self._error = JobError.of(exc)
                self._state = FAILED
        finally:
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

    Thread safety: the worker writes under a lock and :meth:`view` copies under the same lock, so a
    reader never sees a snapshot from one step with the history of another.
    """

    def __init__(self, run: PresetRun, *, summarize: Callable[[AttackOutcome], Any] | None = None,
                 name: str = "lavp-attack"):
        super().__init__(name)
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
        with self._lock:
            return AttackView(self._state, self._snapshot, tuple(self._history), self._outcome, self._summary,
                              self._error, self._elapsed(), self._first_frame, self._stop.is_set())

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

    def __init__(self, fn: Callable[[TaskControl], Any], *, name: str = "lavp-task"):
        super().__init__(name)
        self._fn = fn
        self.control = TaskControl()
        self._result: Any = None

    def stop(self) -> None:
        self.control.cancel()

    def view(self) -> TaskView:
        fraction, message = self.control.progress()
        with self._lock:
            if self._state != RUNNING:
                fraction = 1.0
            return TaskView(self._state, self._result, self._error, fraction, message, self._elapsed())

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
    """

    def __init__(self, max_finished: int = 64):
        self.max_finished = int(max_finished)
        self._lock = threading.Lock()
        self._tasks: OrderedDict[Hashable, BackgroundTask] = OrderedDict()

    def get(self, key: Hashable) -> BackgroundTask | None:
        with self._lock:
            return self._tasks.get(key)

    def submit(self, key: Hashable, fn: Callable[[TaskControl], Any], *, name: str = "lavp-task") -> BackgroundTask:
        with self._lock:
            task = self._tasks.get(key)
            if task is not None and task.view().state in (RUNNING, DONE):
                self._tasks.move_to_end(key)
                return task
            task = BackgroundTask(fn, name=name)
            self._tasks[key] = task
            self._tasks.move_to_end(key)
            self._trim()
        return task.start()

    def _trim(self) -> None:
        finished = [k for k, t in self._tasks.items() if t.finished]
        for key in finished[:max(0, len(finished) - self.max_finished)]:
            del self._tasks[key]
