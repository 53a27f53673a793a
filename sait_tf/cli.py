"""Small helpers shared by the command-line tools."""

from __future__ import annotations

from absl import app


def parse_size(values: list[str] | None, flag: str) -> tuple[int, int] | None:
    """``--flag=HEIGHT,WIDTH`` (an absl list flag) as a tuple; None when the flag is unset."""
    if not values:
        return None
    try:
        size = tuple(int(v) for v in values)
    except ValueError as error:
        raise app.UsageError(f"--{flag} must be HEIGHT,WIDTH, got {values}") from error
    if len(size) != 2 or min(size) < 1:
        raise app.UsageError(f"--{flag} must be HEIGHT,WIDTH of positive ints, got {values}")
    return size
