"""Progress of long commands on stderr, so that stdout keeps only the result (one JSON object with ``--json``).

On a terminal one line is rewritten in place (carriage return) at most :data:`TTY_INTERVAL` apart; when
stderr is a file or a pipe (a log, CI) a plain line is written at most :data:`LOG_INTERVAL` apart, plus
the first and the last. ``quiet`` writes nothing.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

TTY_INTERVAL = 0.25  # seconds between rewrites of the line on a terminal: at most 4 a second
LOG_INTERVAL = 5.0  # seconds between plain lines when stderr is not a terminal

_open_line: list[TextIO] = []  # the terminal whose carriage-return line is unfinished (at most one)


def end_open_line() -> None:
    """Finish an unfinished carriage-return progress line, so that what comes next (an ``error:`` line)
    starts on a line of its own. Does nothing when no such line is open."""
    while _open_line:
        stream = _open_line.pop()
        stream.write("\n")
        stream.flush()


def clock_text(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Rate-limited progress lines of one command on ``stream`` (default stderr).

    Args:
        name: what is running, the start of every line (e.g. ``attack ig``).
        quiet: write nothing at all.
        stream: where to write (default ``sys.stderr``, looked up when created).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, name: str, *, quiet: bool = False, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.quiet, self.clock = name, quiet, clock
        self.stream = sys.stderr if stream is None else stream
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            self.tty = False
        self.interval = TTY_INTERVAL if self.tty else LOG_INTERVAL
        self.started = clock()
        self._last = -math.inf
        self._open = 0  # width of the carriage-return line on screen (0: none)
        self._lock = threading.Lock()

    def restart_clock(self) -> None:
        """Count elapsed time and the ETA from now (call when the timed work begins)."""
        self.started = self.clock()

    def note(self, text: str) -> None:
        """One line that stays (the set-up, a phase), written whatever the rate limit."""
        self._write(f"{self.name}: {text}", final=True)

    def step(self, done: int, total: int, loss: float | None = None, extra: str = "") -> None:
        """Steps ``done`` of ``total`` with the current best matching ``loss``; shown when due, and
        always for the first step."""
        now = self.clock()
        if self.quiet or (done > 1 and now - self._last < self.interval):
            return
        elapsed = now - self.started
        remaining = elapsed / done * (total - done) if done > 0 else math.nan
        parts = [f"step {done}/{total} ({100 * done / max(1, total):.0f}%)"]
        if extra:
            parts.append(extra)
        if loss is not None:
            parts.append(f"matching loss {loss:.6g}" if math.isfinite(loss) else "matching loss n/a")
        parts.append(f"{clock_text(elapsed)} elapsed, ETA {clock_text(remaining)}")
        self._write(f"{self.name}: " + "   ".join(parts), final=False, now=now)

    def tick(self, text: str) -> None:
        """A heartbeat of work without steps: ``text`` and the time elapsed, when due."""
        now = self.clock()
        if self.quiet or now - self._last < self.interval:
            return
        self._write(f"{self.name}: {text}   {clock_text(now - self.started)} elapsed", final=False, now=now)

    def finish(self, text: str) -> None:
        """The last line (closes the carriage-return line on a terminal)."""
        self._write(f"{self.name}: {text}", final=True)

    def _write(self, line: str, *, final: bool, now: float | None = None) -> None:
        if self.quiet:
            return
        with self._lock:
            self._last = self.clock() if now is None else now
            if self.tty:
                pad = " " * max(0, self._open - len(line))
                self.stream.write("\r" + line + pad + ("\n" if final else ""))
                self._open = 0 if final else len(line)
                _open_line[:] = [] if final else [self.stream]
            else:
                self.stream.write(line + "\n")
            self.stream.flush()


class Heartbeat:
    """While the ``with`` block runs, a daemon thread calls ``progress.tick(text)`` (for work that reports
    no steps, e.g. an eigen-solver); the thread only writes to the stream."""

    def __init__(self, progress: Progress, text: str):
        self.progress, self.text = progress, text
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if not self.progress.quiet:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="progress-heartbeat")
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.progress.interval)):
            self.progress.tick(self.text)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
