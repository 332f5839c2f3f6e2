"""One run at a time in a run folder: RUN_DIR/run.lock.

A run holds an flock(2) on RUN_DIR/run.lock from the moment it takes the folder until it ends.
The kernel drops that lock when the process ends, however it ends (kill -9 included), so a lock
left by a dead run is never in the way, and there is no stale lock to detect on a local disk;
on NFS the server drops it when the dead client's lease runs out (about 90 s). The file holds the
holder's pid, host and start time, which the refusal names. It is emptied when the run ends and
never deleted: deleting a lock file races with a process that has just opened it.

Some file systems have no locks (flock fails with ENOLCK or EOPNOTSUPP, e.g. Lustre mounted
without ``-o flock``). There the file's content is the lock: a run writes its pid, host and
process start time into an empty file and empties it when it ends. A file naming a process of
this host that is gone (or whose pid now belongs to a newer process) is stale and taken over. A
file naming another host cannot be checked from here: the refusal names the file to delete once
that run is over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunInUseError(RuntimeError):
    """Another live run holds the folder."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), which tells a live
    process from a newer one that got the same pid; None when it is gone or unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # fields after "pid (comm)": 3 is at index 0


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    current = _process_start(pid)
    return start is None or current is None or current == start


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another aha run"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {since})"


class RunLock:
    """The lock on one run folder; ``acquire`` takes it or raises RunInUseError."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Raises RunInUseError when a live run holds the folder; OSError when the folder cannot
        be written (read-only, missing)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunInUseError(self._refusal(holder, locked=True)) from None
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            self._claim_without_locks(fd)  # this file system has no locks
        self.fd = fd
        try:
            self._write_holder(fd)
        except OSError:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Empty the file and drop the lock (closing the file drops the flock)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # a read-only disk: the flock still goes with close
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _claim_without_locks(self, fd: int) -> None:
        holder = self._holder(fd)
        if not holder:
            return
        if holder.get("host") != socket.gethostname():
            os.close(fd)
            raise RunInUseError(
                self._refusal(holder, locked=False)
                + f"; its host cannot be checked from here: delete {self.path} once it has ended"
            )
        if _alive(int(holder.get("pid", -1)), holder.get("start")):
            os.close(fd)
            raise RunInUseError(self._refusal(holder, locked=False))
        # a run of this host that is gone: its lock is stale

    def _refusal(self, holder: dict[str, Any], locked: bool) -> str:
        run_dir = self.path.parent
        message = f"run_dir: {run_dir} is in use by {_describe(holder)}"
        pid = holder.get("pid")
        if (
            locked
            and isinstance(pid, int)
            and holder.get("host") == socket.gethostname()
            and not _alive(pid, holder.get("start"))
        ):
            # flock is shared with children forked by that run: one of them outlived it
            return (
                f"run_dir: {run_dir} is locked by a process left over from the run of pid {pid}, "
                f"which has ended; end that process (fuser {self.path} names it)"
            )
        return message + "; wait for it to end or stop it (one run per folder)"

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            holder = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _write_holder(fd: int) -> None:
        pid = os.getpid()
        holder = {
            "pid": pid,
            "host": socket.gethostname(),
            "start": _process_start(pid),
            "since": time.time(),
        }
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
