"""One writer per output: an exclusive lock held for the whole of a run.

The lock is ``OUTPUT.lock`` beside the output (not inside it, so that ``--overwrite`` can replace
the output while holding it). It is an ``flock`` on that file, which the kernel drops when the
holding process dies, even by SIGKILL: a killed run never leaves a stale lock behind, so
``--resume`` can always take over. The file records who holds it (host, pid, start time) for the
message a second run gets. On release the file is removed while still locked, and a process that
acquired the lock re-checks that the file it locked is still the one at the path, which closes the
race with a removal.

``flock`` works on local file systems and on NFSv4 (as a byte-range lock); on file systems without
it, locking fails loudly rather than silently doing nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from .errors import OutputError

__all__ = ["OutputLock", "lock_path", "lock_holder"]


def lock_path(output: str) -> str:
    return os.path.normpath(output).rstrip(os.sep) + ".lock"


def lock_holder(output: str) -> dict[str, Any] | None:
    """Who holds the lock on ``output`` now, or ``None`` if nobody does."""
    path = lock_path(output)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_owner(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "another tileseg run"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"another tileseg run (pid {owner.get('pid')} on {owner.get('host')}, started {started})"


class OutputLock:
    """``with OutputLock(output):`` holds the lock or raises :class:`OutputError` at once."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path} ({exc.strerror}).",
                                  "Make the output's parent directory writable.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise OutputError(f"{self.output} is being written by {_describe(owner)}.",
                                  "Wait for that run to finish (or stop it), then use --resume; two runs on one output would interleave.") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise OutputError(f"the file system of {self.path} does not support locks.",
                                      "Write the output to a local or NFSv4 file system.") from None
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we locked it: lock the new one
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
