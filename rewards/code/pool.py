"""The sandbox pool: every local sandbox run of this process, the ``code`` reward's and the
``python`` tool's, takes one of its slots, so together they never run more sandboxes at once
than the machine was sized for.

Before it, each ``code`` reward call had a thread pool of its own and each ``python`` tool call
started its own sandbox from its tool thread: a training step's reward batch, an eval thread's
and a turn's worth of tool calls from every trajectory all ran at once, unbounded. Now they
queue for ``size`` slots (``AHA_CODE_WORKERS``, default ``min(8, cpu count)``), process-wide
like the uid pairs of :mod:`rewards.code.sandbox`. A caller with a deadline (a tool call) waits
for a slot only until its deadline and is told so; a reward call waits its turn.

A run holds its slot until its sandbox process has exited (the backend kills its process group
at the wall clock), so a slot is never lost to a hung program. At exit the pool kills every
sandbox still running (a tool call abandoned by the turn loop runs in a daemon thread that
exit does not wait for); bubblewrap's ``--die-with-parent`` covers a trainer that is killed.

Remote runs (SandboxFusion) use no local slot: the server bounds them, with the backend's own
``remote_concurrency``.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from rewards.code.sandbox import (
    Backend,
    Limits,
    RunResult,
    kill_running,
    make_payload,
    wall_timeout,
)


def default_size() -> int:
    return int(os.environ.get("AHA_CODE_WORKERS", "0")) or max(1, min(8, os.cpu_count() or 1))


class SandboxPool:
    """``size`` slots for sandbox runs, shared by every thread of the process."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or default_size()
        self._slots = threading.BoundedSemaphore(self.size)
        self._lock = threading.Lock()
        self.running = 0  # runs holding a slot now
        self.most_running = 0  # the most at once since start (tests check the bound with it)

    def run(
        self,
        backend: Backend,
        job: dict[str, Any],
        limits: Limits,
        deadline: float | None = None,
    ) -> RunResult:
        """One job in one sandbox, whatever happens: an exception, or no slot free before
        ``deadline`` (``time.monotonic()``; None waits as long as it takes), is the result's
        ``error``. With a deadline, the program's time limits are cut to the time left once
        a slot is held: waiting for one is part of the caller's time."""
        local = getattr(backend, "local", True)
        if local:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._slots.acquire(timeout=wait):
                return RunResult(
                    error=f"no sandbox free: all {self.size} were busy", sandbox=backend.name
                )
            with self._lock:
                self.running += 1
                self.most_running = max(self.most_running, self.running)
        try:
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                limits = replace(
                    limits,
                    timeout_s=min(limits.timeout_s, left),
                    total_timeout_s=min(limits.total_timeout_s, left),
                )
            payload = make_payload(job, limits)
            return backend.run(payload, wall_timeout(payload, limits))
        except Exception as error:  # a broken run is its own result; it never stops the caller
            return RunResult(error=f"{type(error).__name__}: {error}", sandbox=backend.name)
        finally:
            if local:
                with self._lock:
                    self.running -= 1
                self._slots.release()

    def run_jobs(
        self, jobs: Sequence[dict[str, Any] | None], backend: Backend, limits: Limits, workers: int
    ) -> list[RunResult | None]:
        """Every job in its own sandbox (None jobs skipped), results in order; ``workers``
        threads submit them, and at most ``size`` of the process's runs hold a slot at once."""
        if not any(job is not None for job in jobs):
            return [None] * len(jobs)

        def one(job: dict[str, Any] | None) -> RunResult | None:
            return None if job is None else self.run(backend, job, limits)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as threads:
            return list(threads.map(one, jobs))


_POOL: SandboxPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> SandboxPool:
    """The process-wide pool, made on first use; at exit, running sandboxes are killed."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = SandboxPool()
            atexit.register(kill_running)
        return _POOL
