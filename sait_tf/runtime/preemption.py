"""Pre-emption: SIGTERM and SIGINT ask long work to stop at its next safe point.

Cluster schedulers pre-empt a job with SIGTERM (and a grace period before SIGKILL); a user
stops one with Ctrl-C (SIGINT). ``install_handlers`` replaces the default handlers, which
would end the process at once, by one that only records the request. Long loops call
``check(where)`` at their safe points (after a training step has been checkpointed, after a
file is written); it raises ``Preempted`` when a stop was requested, and the command exits
with one line and status 128 + the signal number. Running the same command again resumes.
"""

from __future__ import annotations

import signal

_requested: list[int] = []


class Preempted(Exception):
    """Raised at a safe point after SIGTERM or SIGINT; ``signum`` is the signal."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; run the same "
                         "command again to resume")
        self.signum = signum
        self.exit_code = 128 + signum


def _record(signum: int, frame) -> None:
    del frame
    _requested.append(signum)


def install_handlers() -> None:
    """From now on SIGTERM and SIGINT only request a stop (main thread only)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _record)


def requested() -> int | None:
    """The first signal received since ``install_handlers``, or None."""
    return _requested[0] if _requested else None


def check(where: str) -> None:
    """Raises ``Preempted`` (naming ``where``, e.g. "after step 7 of source_only, saved")
    when a stop was requested."""
    signum = requested()
    if signum is not None:
        raise Preempted(signum, where)
