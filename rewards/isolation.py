"""Calling a reward function so that it can neither hang the trainer nor poison it.

Where a reward runs depends on where its code comes from (rl/setup.build_rewards):

- **A worker process** (:class:`ProcessReward`): rewards from a file (``path.py:function``) or
  an installed package's ``aha.rewards`` entry point, i.e. user code, which may hang. Each has
  one long-lived worker, ``python -m rewards.reward_worker NAME``, which finds the function by
  its registry name (imports paid once) and takes one pickled call at a time over a pipe. A
  call that misses its deadline kills the worker's whole process group (the reward's own
  children too) and starts a fresh worker, so no slot stays taken and nothing outlives the
  trainer. A worker also ends itself if the trainer dies without saying so (``kill -9``).
- **A daemon thread per call** (:func:`call_in_thread`): aha's built-ins, which bound their own
  time (math in its checker processes, code in its sandbox), and functions that exist only in
  this process (registered in a notebook, a lambda), which another process cannot load. A
  timed-out thread cannot be killed and runs on, but it holds no shared slot, and as a daemon
  it never keeps the interpreter from exiting (a thread pool's threads are joined at exit,
  which is how a hung reward used to keep a finished run, and Ctrl-C, waiting forever).

Async rewards (TRL allows ``async def``) are awaited on one event loop: in a worker, the
worker's own; in this process, one loop on a daemon thread (as TRL does), where a timed-out
call is also cancelled, which frees it if it is waiting on something.

What a reward returned is checked where it ran (:func:`checked_scores`), and what it reported
through TRL's ``log_extra``/``log_metric`` is collected per call and handed back only with
good scores (a worker's calls are replayed here).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import math
import numbers
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])  # the directory that holds the rewards package
START_TIMEOUT_S = 120.0  # a worker's imports, outside any call's budget (they happen once)
_HEADER = struct.Struct(">Q")  # each message: its length, then that many bytes of pickle


class RewardTimeout(Exception):
    """The call took longer than its timeout (its worker was killed, or its thread left)."""


class RewardRaised(Exception):
    """The reward (or its worker) failed; the message says how, in one line."""


class BadScores(ValueError):
    """The reward returned something that is not one score per completion; ``row`` is the
    completion whose score is bad, or None when the whole answer is."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


def describe(error: BaseException) -> str:
    """An exception as one line: ``ValueError: plugin bug``."""
    return " ".join("".join(traceback.format_exception_only(error)).split())


def checked_scores(value: Any, count: int) -> list[float | None]:
    """The scores a reward returned, as floats (None: "does not apply"); raises BadScores.

    NaN also means "does not apply", as in TRL, which turns None into NaN and sums rewards with
    nansum. ``inf``, ``-inf`` and anything that is not a number (a string, a list) are errors:
    one of them made every weight NaN.
    """
    if hasattr(value, "tolist") and not isinstance(value, list | tuple):  # numpy, torch
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise BadScores(f"returned {type(value).__name__} instead of a list of {count} scores")
    if len(value) != count:
        raise BadScores(f"returned {len(value)} scores for {count} completions")
    scores: list[float | None] = []
    for row, item in enumerate(value):
        if item is None:
            scores.append(None)
            continue
        number = _as_number(item)
        if number is None:
            shown = repr(item)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise BadScores(
                f"returned {shown} ({type(item).__name__}, not a number) for completion {row} "
                f"of {count}",
                row,
            )
        if math.isinf(number):
            raise BadScores(f"returned {number} for completion {row} of {count}", row)
        scores.append(None if math.isnan(number) else number)
    return scores


def _as_number(item: Any) -> float | None:
    # float("1.5") parses text; a score must be a number already (numpy and torch scalars are).
    if isinstance(item, str | bytes) or not (
        isinstance(item, numbers.Real) or hasattr(type(item), "__float__")
    ):
        return None
    try:
        return float(item)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several numbers
        return None


@dataclass
class RewardOutput:
    """One successful call: its scores and what it reported through log_extra / log_metric."""

    scores: list[float | None]
    extra: list[tuple[str, list]] = field(default_factory=list)
    metrics: list[tuple[str, float]] = field(default_factory=list)

    def log_extra(self, column: str, values: list) -> None:
        self.extra.append((str(column), list(values)))

    def log_metric(self, name: str, value: Any) -> None:
        number = _as_number(value)
        if number is not None:  # a metric that is not a number is left out, not a crash later
            self.metrics.append((str(name), number))


def call_reward(fn: Any, kwargs: dict[str, Any], timeout_s: float, name: str) -> RewardOutput:
    """Call ``fn`` (TRL's keyword arguments, without the log hooks) where it belongs."""
    if isinstance(fn, ProcessReward):
        return fn.call(kwargs, timeout_s)
    return call_in_thread(fn, kwargs, timeout_s, name)


# ---------------------------------------------------------------- in this process


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The loop async rewards of this process run on, in a daemon thread (started on first use)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="aha-reward-loop", daemon=True).start()
        return _LOOP


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def call_in_thread(
    fn: Any, kwargs: dict[str, Any], timeout_s: float, name: str = "reward"
) -> RewardOutput:
    """One call in a daemon thread of its own; RewardTimeout if it misses ``timeout_s``."""
    count = len(kwargs["completions"])
    output = RewardOutput([])
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            value = fn(**kwargs, log_extra=output.log_extra, log_metric=output.log_metric)
            if inspect.isawaitable(value):
                future = asyncio.run_coroutine_threadsafe(_awaited(value), _event_loop())
                box["future"] = future
                value = future.result()
            box["scores"] = checked_scores(value, count)
        except BaseException as error:  # noqa: BLE001 - SystemExit in a reward is its error too
            box["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, name=f"aha-reward-{name}", daemon=True).start()
    if not done.wait(_wait_s(timeout_s)):  # Ctrl-C interrupts this wait
        future = box.get("future")
        if future is not None:
            future.cancel()
        raise RewardTimeout
    error = box.get("error")
    if isinstance(error, BadScores):
        raise error
    if error is not None:
        raise RewardRaised(describe(error)) from error
    output.scores = box["scores"]
    return output


def _wait_s(timeout_s: float | None) -> float | None:
    return timeout_s if timeout_s is not None and math.isfinite(timeout_s) else None


# ---------------------------------------------------------------- in a worker process


def _worker_env() -> dict[str, str]:
    # No LD_PRELOAD (vLLM sets one for its allocator); the trainer's import path, so that what
    # the trainer could import (a notebook's sys.path additions too), the worker can.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    paths = [_ROOT, *(p or os.getcwd() for p in sys.path), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def write_message(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


class _Worker:
    """One ``python -m rewards.reward_worker NAME`` process, in a process group of its own."""

    def __init__(self, name: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rewards.reward_worker", name, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # the protocol; the reward's prints go to our stderr
            env=_worker_env(),
            start_new_session=True,  # killpg reaches what the reward started; no terminal ^C
        )
        self._poll = select.poll()
        self._poll.register(self.process.stdout.fileno(), select.POLLIN)  # type: ignore[union-attr]
        self._buffer = bytearray()
        self.ready = False
        self.busy = False

    def send(self, message: Any) -> None:
        write_message(self.process.stdin.fileno(), message)  # type: ignore[union-attr]

    def receive(self, timeout_s: float | None) -> Any:
        """The next message, or RewardTimeout; EOFError if the worker exited."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()  # type: ignore[union-attr]
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= _HEADER.size + size:
                    data = bytes(self._buffer[_HEADER.size : _HEADER.size + size])
                    del self._buffer[: _HEADER.size + size]
                    return pickle.loads(data)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RewardTimeout
            # poll, not select: a trainer may hold more than select's 1024 descriptors.
            if self._poll.poll(None if remaining is None else max(1, int(remaining * 1000))):
                chunk = os.read(fd, 1 << 20)  # Ctrl-C interrupts the poll above
                if not chunk:
                    raise EOFError
                self._buffer += chunk

    def exit_code(self) -> int | None:
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]

    def close(self) -> None:
        """An idle worker is asked to end (stdin closed) and given a second; then killed."""
        if not self.busy:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]
                self.process.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def _start(name: str) -> _Worker | None:
    """A new worker, or None if none can be started now (no memory to fork): the next call
    tries again and, failing, is that call's error."""
    try:
        return _Worker(name)
    except OSError:
        return None


_LIVE: weakref.WeakSet[ProcessReward] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At exit, every worker ends, hung or not: the process is done when its work is."""
    for reward in list(_LIVE):
        reward.close()


class ProcessReward:
    """A user reward called in a worker process of its own; TRL's signature when called
    directly (without a timeout), :meth:`call` with one."""

    def __init__(self, name: str, fn: Any = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.name = name
        # What the trainer reads off the function, from the copy it loaded to check the config.
        self.required_columns = tuple(getattr(fn, "required_columns", ()))
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__name__ = getattr(fn, "__name__", name)
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # workers killed for a timeout or a crash (tests, logs)
        self._lock = threading.Lock()
        self._closed = False
        # Started now: its imports overlap the trainer's model loading.
        self._worker: _Worker | None = _start(name)
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        """The current worker's process id (tests)."""
        return self._worker.process.pid if self._worker is not None else None

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        log_extra = kwargs.pop("log_extra", None)
        log_metric = kwargs.pop("log_metric", None)
        output = self.call({"prompts": prompts, "completions": completions, **kwargs}, None)
        for column, values in output.extra:
            if log_extra is not None:
                log_extra(column, values)
        for metric, value in output.metrics:
            if log_metric is not None:
                log_metric(metric, value)
        return output.scores

    def call(self, kwargs: dict[str, Any], timeout_s: float | None) -> RewardOutput:
        """One call; RewardTimeout (the worker killed and replaced), RewardRaised or BadScores."""
        with self._lock:
            if self._closed:
                raise RewardRaised("its worker process was closed")
            worker = self._worker = self._worker or _start(self.name)
            if worker is None:
                raise RewardRaised("its worker process could not be started")
            worker.busy = True
            try:
                reply = self._exchange(worker, kwargs, _wait_s(timeout_s))
            except (RewardTimeout, RewardRaised) as error:
                self._replace(worker)
                raise error from None
            except EOFError:
                code = worker.exit_code()
                self._replace(worker)
                raise RewardRaised(f"its worker process exited (exit code {code})") from None
            except BaseException:  # Ctrl-C mid-call: the worker's state is unknown; end it
                worker.kill()
                self._worker = None
                raise
            worker.busy = False
        if "raised" in reply:
            raise RewardRaised(reply["raised"])
        if "bad" in reply:
            raise BadScores(reply["bad"], reply["row"])
        return RewardOutput(reply["scores"], reply["extra"], reply["metrics"])

    def _exchange(self, worker: _Worker, kwargs: dict[str, Any], timeout_s: float | None):
        if not worker.ready:  # the first call also waits for the imports, outside its budget
            try:
                hello = worker.receive(self.start_timeout_s)
            except RewardTimeout:
                raise RewardRaised(
                    f"its worker process did not start within {self.start_timeout_s:g} s"
                ) from None
            if "error" in hello:
                raise RewardRaised(f"could not be loaded in its worker process: {hello['error']}")
            worker.ready = True
        try:
            worker.send(kwargs)
        except (BrokenPipeError, ConnectionResetError):
            raise EOFError from None
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            raise RewardRaised(
                f"its inputs cannot be sent to a process: {describe(error)}"
            ) from None
        return worker.receive(timeout_s)

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker that missed its deadline or died, and start the next one now, so its
        imports happen while the trainer does other work."""
        worker.kill()
        self.restarts += 1
        self._worker = None if self._closed else _start(self.name)

    def close(self) -> None:
        """End the worker (a busy one is killed); calls after this fail."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        _LIVE.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown, modules may be gone
            self.close()
