"""Progress of long steps, for a person at a terminal and for a log file alike.

At a terminal (stderr is a TTY and ``CI`` is not set) a step draws a tqdm bar. Anywhere else (CI,
``nohup``, a pipe into a log) a bar is noise, but silence for minutes is worse: the step logs one line
at most every ``SQZ_PROGRESS_INTERVAL`` seconds (default 10) with its stage, done/total, rate and ETA,
plus a last line when it ends. Steps without a count (one long library call, such as an ONNX export)
use :func:`stage`, which logs when it starts and ends and, without a terminal, a heartbeat meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger("sqz_export.progress")

INTERVAL_ENV = "SQZ_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0

T = TypeVar("T")


def use_bars() -> bool:
    """Progress bars only for a person watching a terminal, never in CI logs."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


def log_interval() -> float:
    """Seconds between two progress lines without a terminal (``SQZ_PROGRESS_INTERVAL``)."""
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(text), 0.0) if text else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """done/total of one step: a tqdm bar at a terminal, periodic log lines elsewhere.

    Use it as a context manager and call :meth:`update` as work completes. ``unit`` is a plural
    noun ("windows", "layers"), as it reads in "3/32 windows, 0.5 windows/s".
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self._enabled = enabled
        self._bar: Any = None
        self._start = time.monotonic()
        self._last_log = self._start
        self._interval = log_interval()
        if enabled and use_bars():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(completed=exc[0] is None)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._enabled:
            now = time.monotonic()
            if now - self._last_log >= self._interval and self.done < self.total:
                self._last_log = now
                logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """``stage: done/total unit (pct), rate, ETA`` as logged."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({self.done / self.total:.0%})"
        text += f", {rate:.3g} {self.unit}/s"
        if self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ", ETA unknown"
        else:
            text += f", done in {_duration(elapsed)}"
        return text

    def close(self, completed: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._enabled and completed and self.total:
            logger.info("%s", self.line(time.monotonic()))
        self._enabled = False


def track(items: Iterable[T], total: int, desc: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """Yields ``items`` while reporting how many of ``total`` are done (see :class:`Progress`)."""
    with Progress(total, desc, unit, enabled) as progress:
        for item in items:
            yield item
            progress.update()


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    """Logs the start and end of a step without a count; without a terminal, a heartbeat meanwhile."""
    start = time.monotonic()
    logger.info("%s ...", desc)
    stop = threading.Event()
    heartbeat = None
    if not use_bars() and log_interval() > 0:

        def beat() -> None:
            while not stop.wait(log_interval()):
                logger.info("%s: still running (%s)", desc, _duration(time.monotonic() - start))

        heartbeat = threading.Thread(target=beat, name=f"progress {desc}", daemon=True)
        heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        if heartbeat is not None:
            heartbeat.join()
    logger.info("%s: done in %s", desc, _duration(time.monotonic() - start))
