"""Progress lines for long work: stage, step, rate and ETA."""

from __future__ import annotations

import time

from absl import logging


class Progress:
    """Logs ``[stage] step i/n  r it/s  ETA mm:ss`` at most every ``interval_s`` seconds."""

    def __init__(self, stage: str, total: int, start: int = 0, interval_s: float = 10.0) -> None:
        self.stage, self.total, self.start = stage, total, start
        self.interval_s = interval_s
        self._t0 = time.monotonic()
        self._last = -float("inf")

    def update(self, step: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s and step < self.total:
            return
        self._last = now
        done = step - self.start
        rate = done / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_txt = f"{int(eta // 60):d}:{int(eta % 60):02d}" if eta == eta else "?"
        logging.info("[%s] step %d/%d  %.2f it/s  ETA %s  %s",
                     self.stage, step, self.total, rate, eta_txt, extra)
