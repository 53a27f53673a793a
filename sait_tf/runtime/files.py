"""Files that other processes may read as complete: written under a unique temporary name in
the same folder, then renamed over the final name (``os.replace`` is atomic on POSIX).

A killed writer leaves at most a hidden ``.NAME.<random>.tmp`` file, never a half-written
``NAME``; two processes writing the same file never share a temporary name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

DONE_MARKER = "DONE"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing; renames it to ``path`` on success.

    ``mode`` is "w" (text) or "wb" (bytes). The parent folder is created. On an exception the
    temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=folder)
    try:
        with os.fdopen(handle, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomically(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through ``atomic_open``."""
    with atomic_open(path) as f:
        f.write(text)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json_atomically(path: str, value: Any) -> None:
    """Writes ``value`` as indented, strict JSON (NaN as null) to ``path``."""
    with atomic_open(path) as f:
        json.dump(strict_json(value), f, indent=1, allow_nan=False)


def is_done(folder: str) -> bool:
    """True when ``mark_done`` was called for ``folder`` (a stage, translated set, export...)."""
    return os.path.exists(os.path.join(folder, DONE_MARKER))


def mark_done(folder: str) -> None:
    """Marks the work in ``folder`` complete with an atomically written marker file."""
    write_text_atomically(os.path.join(folder, DONE_MARKER), "done\n")


def remove_stale_temporaries(folder: str, recursive: bool = True) -> int:
    """Deletes the hidden ``.NAME.*.tmp`` files that writers killed inside ``atomic_open`` left
    in ``folder`` (and below it); returns how many. Call it only while no other process
    writes there (a run directory is one job's)."""
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(root, name))
                removed += 1
        if not recursive:
            break
    return removed


def move_files(source: str, destination: str) -> int:
    """Moves every file under ``source`` (but its DONE marker and temporaries) to the same
    relative path under ``destination``, then deletes ``source``; returns how many. The
    folders must be on one file system, where ``os.replace`` moves a finished file at once."""
    moved = 0
    for root, _, names in os.walk(source):
        for name in names:
            if name == DONE_MARKER or (name.startswith(".") and name.endswith(".tmp")):
                continue
            target = os.path.join(destination, os.path.relpath(os.path.join(root, name), source))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(root, name), target)
            moved += 1
    shutil.rmtree(source, ignore_errors=True)
    return moved
