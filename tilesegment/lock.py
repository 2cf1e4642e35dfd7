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

Object stores have no locks, and no process death to drop one. For an ``s3://`` output the lock is
the object ``OUTPUT.lock``, created with a conditional PUT (``If-None-Match: *``: exactly one of
several racing runs succeeds) and renewed every ``HEARTBEAT_SECONDS`` by a compare-and-swap PUT
(``If-Match`` its last ETag) while the run lives. A lock object is stale, and is taken over by the
same compare-and-swap (so two runs cannot both take it over), when it was not renewed for
``STALE_SECONDS`` by the store's own clock (no clock skew between machines), or at once when its
owner was a process on this same machine (host, boot and pid namespace) that no longer exists: so
``--resume`` right after a ``kill -9`` on the same machine goes ahead, and one after a lost
machine waits at most ``STALE_SECONDS``. A store that ignores the conditions (checked by a second
conditional PUT that must fail), or a URL scheme other than S3, gets a warning that concurrent
runs on that output are not prevented, and the run goes ahead.
"""

from __future__ import annotations

import email.utils
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .errors import OutputError
from .storage import describe_failure, filesystem, is_url, normalize, remedy

__all__ = ["OutputLock", "lock_path", "lock_holder", "HEARTBEAT_SECONDS", "STALE_SECONDS"]

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0  # an object-store lock is renewed this often
STALE_SECONDS = 120.0  # ... and belongs to a dead run once not renewed for this long


def lock_path(output: str) -> str:
    if is_url(output):
        return normalize(output) + ".lock"
    return os.path.normpath(output).rstrip(os.sep) + ".lock"


def lock_holder(output: str) -> dict[str, Any] | None:
    """Who holds the lock on ``output`` now, or ``None`` if nobody does."""
    if is_url(output):
        return _ObjectLock(output).holder()
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
        self._object = _ObjectLock(output) if is_url(output) else None

    def check(self) -> None:
        """Raise :class:`OutputError` if the lock was lost (an object-store lock taken over while this
        run was stalled for longer than ``STALE_SECONDS``): finishing now could mix two runs."""
        if self._object is not None:
            self._object.check()

    def acquire(self) -> None:
        if self._object is not None:
            self._object.acquire()
            return
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
        if self._object is not None:
            self._object.release()
            return
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


# ---- object stores --------------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    """What makes a pid meaningful: the host, its boot, and the pid namespace (containers)."""
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip() or None
        except OSError:
            return None

    try:
        pidns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _process_gone(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"  # killed, not yet reaped
    except (OSError, IndexError):
        return False


def _conflict(exc: BaseException) -> bool:
    """A failed precondition: another writer's object is there (or changed) first."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _unsupported(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc.__context__ or exc
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("NotImplemented", "501") or type(cause).__name__ == "ParamValidationError"


class _ObjectLock:
    """The lock of an output in an object store (see the module docstring)."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.url = lock_path(output)
        self.fs, self.key = filesystem(self.url)
        self.conditional = hasattr(self.fs, "call_s3")  # s3fs: conditional PUTs and ETags
        self.etag: str | None = None
        self.lost = False
        self._started, self._token = time.time(), uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _owner(self) -> bytes:
        owner = {"pid": os.getpid(), **_machine(), "started": self._started, "renewed": time.time(),
                 "token": self._token, "heartbeat_s": HEARTBEAT_SECONDS, "stale_s": STALE_SECONDS}
        return json.dumps(owner).encode()

    def _put(self, **condition: str) -> str | None:
        out = self.fs.pipe_file(self.key, self._owner(), **condition)
        etag = out.get("ETag") if isinstance(out, dict) else None
        return etag or self.fs.info(self.key).get("ETag")

    def _state(self) -> tuple[str, float | None, dict[str, Any]] | None:
        """``(etag, seconds since last renewed by the store's clock, owner)``, or None if there is no lock."""
        bucket, key, _ = self.fs.split_path(self.key)
        try:
            head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
            body = self.fs.cat_file(self.key)
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(body.decode() or "{}")
        except ValueError:
            owner = {}
        modified = head.get("LastModified")
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        age = now - modified.timestamp() if modified is not None else None
        return str(head.get("ETag")), age, owner

    @staticmethod
    def _stale(owner: dict[str, Any], age: float | None) -> bool:
        here = _machine()
        same_machine = all(here[k] is not None and owner.get(k) == here[k] for k in ("host", "boot", "pidns"))
        if same_machine and _process_gone(owner.get("pid")):
            return True
        limit = float(owner.get("stale_s") or STALE_SECONDS)
        return age is not None and age > limit

    def holder(self) -> dict[str, Any] | None:
        if not self.conditional:
            return None
        try:
            state = self._state()
        except Exception:
            return None
        if state is None or self._stale(state[2], state[1]):
            return None
        return {**state[2], "renewed_ago": state[1]}

    def _fail(self, exc: BaseException) -> OutputError:
        return OutputError(f"cannot write the lock object {self.url}: {describe_failure(exc)}.", remedy(self.url, exc))

    def _unprotected(self, why: str) -> None:
        log.warning("%s; concurrent tileseg runs on %s are not prevented: start only one at a time.", why, self.output)

    def acquire(self) -> None:
        if not self.conditional:
            self._unprotected(f"{self.url.split('://')[0]}:// stores have no conditional writes here")
            return
        for _ in range(10):
            try:
                self.etag = self._put(mode="create")
            except Exception as exc:
                if _unsupported(exc):
                    self._unprotected("this object store does not support conditional writes")
                    return
                if not _conflict(exc):
                    raise self._fail(exc) from None
            else:
                if not self._conditions_honoured():
                    self._unprotected("this object store ignores conditional writes (If-None-Match)")
                    self._remove()
                    return
                break
            try:
                state = self._state()
            except Exception as exc:
                raise self._fail(exc) from None
            if state is None:
                continue  # released meanwhile
            etag, age, owner = state
            if not self._stale(owner, age):
                limit = float(owner.get("stale_s") or STALE_SECONDS)
                raise OutputError(f"{self.output} is being written by {_describe(owner)}.",
                                  "Wait for that run to finish (or stop it), then use --resume; two runs on one output would interleave. "
                                  f"If that run is dead on another machine, its lock expires {limit:.0f} s after its last renewal"
                                  f"{f' ({age:.0f} s ago)' if age is not None else ''}.")
            try:
                self.etag = self._put(IfMatch=etag)  # compare-and-swap: only one run takes over a stale lock
            except Exception as exc:
                if not _conflict(exc):
                    raise self._fail(exc) from None
                continue
            log.warning("took over the lock of %s from %s, which is no longer running.", self.output, _describe(owner))
            break
        else:
            raise OutputError(f"could not take the lock object {self.url}: it kept changing.",
                              "Another tileseg run is probably starting on the same output; run only one.")
        self._stop.clear()
        self._beat = threading.Thread(target=self._renew, name="tileseg-lock-heartbeat", daemon=True)
        self._beat.start()

    def _conditions_honoured(self) -> bool:
        """A second create must fail; a store that ignores ``If-None-Match`` would let two runs in."""
        try:
            self.etag = self._put(mode="create")
        except Exception as exc:
            if _conflict(exc):
                return True
            if not _unsupported(exc):
                raise self._fail(exc) from None
        return False

    def _remove(self) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            log.warning("could not remove the lock object %s (%s).", self.url, describe_failure(exc))
        self.etag = None

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as exc:
                if _conflict(exc) and not self._still_ours():
                    self.lost = True
                    log.error("lost the lock on %s: another run took it over while this one was stalled.", self.output)
                    return
                log.warning("could not renew the lock on %s (%s); trying again.", self.output, describe_failure(exc))

    def _still_ours(self) -> bool:
        """After a failed renewal: was it our own earlier renewal that landed (its reply lost)?"""
        try:
            state = self._state()
        except Exception:
            return True  # cannot tell: try again at the next beat
        if state is not None and state[2].get("token") == self._token:
            self.etag = state[0]
            return True
        return False

    def check(self) -> None:
        if self.lost:
            raise OutputError(f"lost the lock on {self.output}: another run took it over while this one was stalled "
                              f"for more than {STALE_SECONDS:.0f} s.",
                              "Make sure only one run writes this output, then finish it with --resume.")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.etag is None or self.lost:
            return
        bucket, key, _ = self.fs.split_path(self.key)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
        except Exception as exc:
            if _conflict(exc) or isinstance(exc, FileNotFoundError):
                return
            try:  # a store without conditional deletes: delete it if it is still ours
                state = self._state()
                if state is not None and state[0] == self.etag:
                    self._remove()
            except Exception as again:
                log.warning("could not remove the lock object %s (%s); the next run takes it over once stale.",
                            self.url, describe_failure(again))
        finally:
            self.etag = None
