"""Progress lines for long work: stage, step, rate and ETA."""

from __future__ import annotations

import time

from absl import logging


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss``); ``?`` for an unknown duration."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:d}:{secs:02d}"


class Progress:
    """Logs ``[stage] step i/n  r it/s  ETA mm:ss`` at most every ``interval_s`` seconds.

    The rate and the ETA count only the steps after the first one: the first step of a
    stage includes tracing and compiling its function, which can take minutes, and would
    make a short stage look long (the ETA is "?" until a second step is done).
    """

    def __init__(self, stage: str, total: int, start: int = 0, interval_s: float = 10.0) -> None:
        self.stage, self.total, self.start = stage, total, start
        self.interval_s = interval_s
        self._first: tuple[int, float] | None = None
        self._last = -float("inf")

    def update(self, step: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        if not force and now - self._last < self.interval_s and step < self.total:
            return
        self._last = now
        first_step, first_time = self._first
        rate = (step - first_step) / (now - first_time) if step > first_step else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        logging.info("[%s] step %d/%d  %s it/s  ETA %s  %s", self.stage, step, self.total,
                     f"{rate:.2f}" if rate > 0 else "?", format_duration(eta), extra)
