"""One process per directory: an exclusive ``flock`` on DIR/.lock, held until the process ends.

The kernel releases the lock when its holder dies, however it dies, so a lock left by a
dead process is taken over, never a reason to refuse. The file holds the holder's pid, host
and start time, for the message that refuses a second process. ``flock`` works on local
file systems and on NFSv4 and Lustre mounts with locking enabled; where a shared file system
ignores it, give each job its own directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_FILE = ".lock"


class DirectoryLocked(RuntimeError):
    """Another live process holds the directory."""


class DirectoryLock:
    """``acquire()`` takes DIR/.lock or raises ``DirectoryLocked`` naming the holder."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryLocked(
                f"{self.directory} is in use by process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for "
                "it to end, stop it, or use another --run_dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
