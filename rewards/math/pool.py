"""A pool of checker subprocesses with a hard per-item timeout that works from any thread.

Symbolic checking can hang (``9^{9^{9^{9}}}``) or crash, and ``signal.alarm`` only works in the
main thread (TRL calls rewards from wherever it likes), so each item goes to a worker process
and the caller waits on the pipe with ``select``: a worker that misses the deadline is killed
and replaced, the item scores 0 with the flag "timeout", and the run goes on (the grader
timeout in a process pool is oat's design, github.com/sail-sg/oat).

Workers are ``python -m rewards.math.worker`` subprocesses started with a cleaned environment:
no ``LD_PRELOAD`` (vLLM sets one for its allocator) and one BLAS thread each.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the rewards package
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Verdict:
    equal: bool
    why: str  # "math_verify", "different", "timeout", "crash", ...


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


class _Worker:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rewards.math.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_worker_env(),
            cwd=_ROOT,
        )
        self._buffer = b""
        self.ready = False

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.process.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError("worker exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def call(self, request: dict[str, Any], timeout_s: float) -> Verdict:
        reply = self.exchange(request, timeout_s)
        return Verdict(bool(reply["equal"]), str(reply["why"]))

    def exchange(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request, one JSON reply; TimeoutError past ``timeout_s``."""
        if not self.ready:  # the first call also waits for the imports, outside the item's budget
            if self._read_line(time.monotonic() + _START_TIMEOUT_S) is None:
                raise TimeoutError("worker did not start")
            self.ready = True
        self.process.stdin.write(json.dumps(request).encode() + b"\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            raise TimeoutError
        return json.loads(line)

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        except Exception:
            pass

    def close(self) -> None:
        try:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=2)
        except Exception:
            self.kill()


class CheckerPool:
    """``size`` worker processes, started on first use; ``check_many`` is safe from any thread."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or max(1, min(4, os.cpu_count() or 1))
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.replaced = 0  # workers killed for a timeout or crash, for tests and logs

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            for _ in range(self.size):
                worker = _Worker()
                self._all.append(worker)
                self._idle.put(worker)
            self._started = True

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker()
        with self._lock:
            self._all = [w for w in self._all if w is not worker] + [fresh]
            self.replaced += 1
        return fresh

    def check(self, gold: str, pred: str, options: dict[str, Any], timeout_s: float) -> Verdict:
        if self._closed:
            raise RuntimeError("checker pool is closed")
        self._start()
        worker = self._idle.get()
        try:
            return worker.call({"gold": gold, "pred": pred, "options": options}, timeout_s)
        except TimeoutError:
            worker = self._replace(worker)
            return Verdict(False, "timeout")
        except (EOFError, OSError, ValueError):
            worker = self._replace(worker)
            return Verdict(False, "crash")
        finally:
            self._idle.put(worker)

    def calculate(self, expression: str, timeout_s: float) -> tuple[str | None, str | None]:
        """The calculator tool's (value, None), or (None, why not): unreadable, undefined, or
        past ``timeout_s`` (the worker is then killed and replaced)."""
        if self._closed:
            raise RuntimeError("checker pool is closed")
        self._start()
        worker = self._idle.get()
        try:
            reply = worker.exchange({"calculate": expression}, timeout_s)
            return reply.get("result"), reply.get("error")
        except TimeoutError:
            worker = self._replace(worker)
            return None, f"took longer than {timeout_s:g} s"
        except (EOFError, OSError, ValueError):
            worker = self._replace(worker)
            return None, "the calculator's worker crashed"
        finally:
            self._idle.put(worker)

    def check_many(
        self, pairs: list[tuple[str, str]], options: dict[str, Any], timeout_s: float
    ) -> list[Verdict]:
        if len(pairs) <= 1:
            return [self.check(g, p, options, timeout_s) for g, p in pairs]
        with ThreadPoolExecutor(max_workers=self.size) as threads:
            return list(threads.map(lambda gp: self.check(gp[0], gp[1], options, timeout_s), pairs))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()


_POOL: CheckerPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool() -> CheckerPool:
    """The process-wide pool, created on first use and closed at exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._closed:
            _POOL = CheckerPool(int(os.environ.get("AHA_MATH_WORKERS", "0")) or None)
            atexit.register(_POOL.close)
        return _POOL
