"""Progress on the console: stage lines with their elapsed time, round lines with an ETA, no long silences.

Library code never prints: it reports through the ``fedchurn.progress`` logger (one message per step), and may
attach structured fields in ``extra`` that a renderer reads:

- ``progress_stage``: a short name of what starts now (``"starting Ray with 2 CPUs"``); it is what a heartbeat
  says while nothing else is printed;
- ``progress_round``: ``(round, rounds, seconds)`` once a round finished; the renderer adds the ETA.

:class:`ConsoleProgress` is the renderer the CLI installs (only ``fedchurn/cli`` writes to the console). Every
line starts with the time since the process started. When the stream is a terminal, a rich status line shows the
current stage with a live clock; otherwise (a log file, a pipe) a plain heartbeat line is written after
``heartbeat_s`` seconds without output, so logs stay readable and never go quiet for long.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = [
    "PROGRESS_LOGGER",
    "ConsoleProgress",
    "EpochTimer",
    "eta_seconds",
    "format_duration",
    "process_started",
    "report_stage",
    "skip_final_collection",
]

PROGRESS_LOGGER = "fedchurn.progress"
STAGE_FIELD = "progress_stage"
ROUND_FIELD = "progress_round"

_IMPORTED_AT = time.time()
_progress = logging.getLogger(PROGRESS_LOGGER)


def process_started() -> float:
    """When this process started (seconds since the epoch): the clock a user's wait is measured by.

    On Linux from ``/proc`` (so interpreter start-up and imports count); elsewhere when this module was imported.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as uptime:
            up = float(uptime.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        started_after_boot = int(fields[19]) / ticks  # field 22 of stat; fields[0] is field 3
        return min(time.time() - (up - started_after_boot), _IMPORTED_AT)
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def eta_seconds(durations: Sequence[float], *, done: int, total: int) -> float | None:
    """Seconds left for ``total - done`` more steps of about the recent ``durations``.

    The first step often pays one-off costs, so it is left out once there are others; the mean of the last three
    then follows a change of pace (a bank stopping at its budget). None when nothing was timed yet.
    """
    remaining = total - done
    if remaining <= 0:
        return 0.0
    timed = list(durations[1:] if len(durations) > 1 else durations)[-3:]
    if not timed:
        return None
    return remaining * sum(timed) / len(timed)


def skip_final_collection() -> None:
    """Call when a command is done: the interpreter then exits without walking every object torch, Ray and Flower
    left (its last garbage collections took 1-3 s of a user's wait, measured on 2 CPUs). The memory goes back to
    the system with the process; files and streams are closed and flushed as usual."""
    import gc

    gc.freeze()


def report_stage(message: str, *args: Any, logger: logging.Logger | None = None) -> None:
    """Log a stage starting now on the progress logger (``message % args``); the heartbeat then names it."""
    text = message % args if args else message
    (logger or _progress).info(text, extra={STAGE_FIELD: text})


class EpochTimer:
    """Times repeated steps (epochs, rounds) and says how long the rest will take: ``timer.lap()`` after each."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.durations: list[float] = []
        self._started = self._last = time.perf_counter()

    def lap(self, seconds: float | None = None) -> float:
        """One more step done; it took ``seconds`` when the caller measured it, else the time since the last."""
        now = time.perf_counter()
        self.durations.append(now - self._last if seconds is None else float(seconds))
        self._last = now
        self.done += 1
        return self.durations[-1]

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    @property
    def eta(self) -> float | None:
        return eta_seconds(self.durations, done=self.done, total=self.total)


class ConsoleProgress(logging.Handler):
    """Renders ``fedchurn.progress`` records: ``[  12.3 s] message`` lines, ETAs, and a heartbeat.

    ``install()`` attaches it to the progress logger for the duration of a ``with`` block and starts the
    heartbeat; the lines go to ``stream`` (stderr by default, so stdout keeps only results).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        started: float | None = None,
        heartbeat_s: float = 1.25,
        live: bool | None = None,
    ) -> None:
        super().__init__(logging.INFO)
        self.stream = stream if stream is not None else sys.stderr
        self.started = process_started() if started is None else started
        self.heartbeat_s = heartbeat_s
        self.live = self.stream.isatty() if live is None else live
        self.stage = "starting up"
        self.round_seconds: list[float] = []
        self._last_output = self._stage_started = time.monotonic()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._started_output = False
        self._status: Any = None  # rich Status when live

    # --- rendering -------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.time() - self.started

    def line(self, text: str) -> None:
        """Write one line, prefixed with the time since the process started."""
        with self._lock:
            stamped = f"[{self.elapsed():6.1f} s] {text}"
            if self._status is not None:
                if not self._started_output:
                    self._status.start()  # the live line appears with the first progress line
                self._status.console.print(stamped, highlight=False, markup=False)
            else:
                if self.stream is not sys.stdout:
                    sys.stdout.flush()  # results printed so far come first, also when both go to one file
                self.stream.write(stamped + "\n")
                self.stream.flush()
            self._last_output = time.monotonic()
            self._started_output = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            stage = getattr(record, STAGE_FIELD, None)
            finished = getattr(record, ROUND_FIELD, None)
            with self._lock:
                if stage is not None:
                    self.stage = str(stage)
                    self._stage_started = time.monotonic()
                if finished is not None:
                    text = self._round_text(text, finished)
                self.line(text)
                self._update_status()
        except Exception:  # a progress line must never break a run
            self.handleError(record)

    def _round_text(self, text: str, finished: tuple[int, int, float]) -> str:
        server_round, rounds, seconds = finished
        self.round_seconds.append(float(seconds))
        if server_round < rounds:
            eta = eta_seconds(self.round_seconds, done=server_round, total=rounds)
            self.stage = f"training round {server_round + 1}/{rounds}"
            self._stage_started = time.monotonic()
            return f"{text}  ETA {format_duration(eta or 0.0)}"
        self.stage = "finishing: final checkpoint, encoder and summary"
        self._stage_started = time.monotonic()
        return text

    def _update_status(self) -> None:
        if self._status is not None:
            self._status.update(f"{self.stage} …")

    # --- heartbeat -------------------------------------------------------------------------------

    def tick(self) -> None:
        """One heartbeat: refresh the live status, or write a 'still ...' line after ``heartbeat_s`` of quiet.

        Quiet until the first line: a command that fails on its input says only its one-line error."""
        with self._lock:
            if not self._started_output:
                return
            quiet = time.monotonic() - self._last_output
            if self._status is not None:
                self._status.update(f"{self.stage} … [{self.elapsed():.1f} s]")
            elif quiet >= self.heartbeat_s:
                self.line(f"  … still {self.stage} ({time.monotonic() - self._stage_started:.0f} s so far)")

    def _beat(self) -> None:
        while not self._stop.wait(0.25):
            self.tick()

    @contextmanager
    def install(self, logger_name: str = PROGRESS_LOGGER) -> Iterator[ConsoleProgress]:
        """Render the progress logger's records while the block runs, with a heartbeat."""
        logger = logging.getLogger(logger_name)
        saved = (list(logger.handlers), logger.level, logger.propagate)
        logger.handlers = [self]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if self.live:
            from rich.console import Console

            self._status = Console(file=self.stream).status(f"{self.stage} …")
        beat = threading.Thread(target=self._beat, name="fedchurn-progress", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            self._stop.set()
            beat.join()
            if self._status is not None:
                self._status.stop()
                self._status = None
            logger.handlers, level, logger.propagate = saved[0], saved[1], saved[2]
            logger.setLevel(level)


def run_with_progress(command: Callable[[], int]) -> int:
    """Run a CLI command with stage and progress lines on stderr, then skip the interpreter's final collection."""
    with ConsoleProgress().install():
        code = command()
    skip_final_collection()
    return code
