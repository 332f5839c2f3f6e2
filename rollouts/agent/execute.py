"""Running tool calls: each trajectory's calls in order, different trajectories at once, every
call with a deadline, every failure a result text.

A trajectory's calls of one turn run in order in one daemon thread (an environment's state
changes call by call, as in TRL), the trajectories' threads all at once. A call that misses
``rollout.tool_timeout_s`` is answered "timed out" and the rest of that turn's calls "not run";
its thread cannot be killed and is left to finish alone (a daemon: it never keeps the process
alive), and its environment answers every later call with an error, since its state is in the
hands of that thread. The built-in tools bound their own time (a killed worker, a killed
sandbox), so only user code can leave a thread behind.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollouts.agent.parsing import Call

_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@dataclass
class Result:
    name: str
    content: str
    error: bool = False


@dataclass
class Toolset:
    """The tools one trajectory may call: name -> (function, its JSON schema)."""

    functions: dict[str, Callable[..., Any]]
    schemas: dict[str, dict[str, Any]]
    busy: threading.Thread | None = field(default=None)  # a timed-out call still running


def call_one(toolset: Toolset, call: Call) -> Result:
    """One call, whatever happens: a malformed call, an unknown tool, wrong arguments or an
    exception are the result's text."""
    if call.error is not None:
        return Result(call.name, f"error: {call.error}", True)
    function = toolset.functions.get(call.name)
    if function is None:
        known = ", ".join(sorted(toolset.functions)) or "none"
        return Result(call.name, f"error: unknown tool {call.name!r}; the tools are: {known}", True)
    problem = argument_problem(function, toolset.schemas.get(call.name), call.arguments)
    if problem is not None:
        return Result(call.name, f"error: wrong arguments for {call.name}: {problem}", True)
    try:
        value = function(**call.arguments)
        if inspect.isawaitable(value):  # TRL allows async tools
            value = asyncio.run(_awaited(value))
    except BaseException as error:  # noqa: BLE001 - SystemExit in a tool is its error too
        said = " ".join("".join(traceback.format_exception_only(error)).split())
        return Result(call.name, f"error: {call.name} raised {said}", True)
    return Result(call.name, value if isinstance(value, str) else str(value))


def argument_problem(
    function: Callable[..., Any], schema: dict[str, Any] | None, arguments: dict[str, Any]
) -> str | None:
    """What is wrong with ``arguments`` for ``function`` (missing, unknown, or of a JSON type
    its schema does not allow), or None."""
    try:
        inspect.signature(function).bind(**arguments)
    except TypeError as error:
        return str(error)
    except ValueError:  # no signature to check (a builtin): the call itself will say
        return None
    properties = ((schema or {}).get("function") or {}).get("parameters", {}).get("properties", {})
    for name, value in arguments.items():
        expected = properties.get(name, {}).get("type")
        allowed = _JSON_TYPES.get(expected) if isinstance(expected, str) else None
        if allowed is None:
            continue
        if isinstance(value, bool) and bool not in allowed:  # JSON true is not a number
            return f"{name} must be {expected}, got {json_type(value)}"
        if not isinstance(value, allowed):
            return f"{name} must be {expected}, got {json_type(value)}"
    return None


def json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return "null" if value is None else type(value).__name__


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class _Runner:
    """One trajectory's calls of one turn, in order, in a daemon thread."""

    def __init__(self, toolset: Toolset, calls: list[Call], changed: threading.Condition):
        self.toolset, self.calls, self.changed = toolset, calls, changed
        self.results: list[Result | None] = [None] * len(calls)
        self.current = 0
        self.started = time.monotonic()  # when the current call started
        self.abandoned = False
        self.thread = threading.Thread(target=self._run, name="aha-tool", daemon=True)

    def _run(self) -> None:
        for index, call in enumerate(self.calls):
            with self.changed:
                if self.abandoned:
                    return
                self.current, self.started = index, time.monotonic()
            result = call_one(self.toolset, call)
            with self.changed:
                if self.abandoned:
                    return
                self.results[index] = result
                self.changed.notify_all()

    @property
    def done(self) -> bool:
        return self.results[-1] is not None if self.results else True


def run_calls(batches: list[tuple[Toolset, list[Call]]], timeout_s: float) -> list[list[Result]]:
    """Every trajectory's calls (one list per trajectory, in order), its results in order."""
    changed = threading.Condition()
    runners = []
    for toolset, calls in batches:
        runner = _Runner(toolset, calls, changed)
        if toolset.busy is not None and toolset.busy.is_alive():
            runner.results = [
                Result(
                    c.name, "error: the environment is still busy with a call that timed out", True
                )
                for c in calls
            ]
        runners.append(runner)
    for runner in runners:
        if not runner.done:
            runner.thread.start()
    with changed:
        while True:
            waiting = [r for r in runners if not r.done]
            if not waiting:
                break
            now = time.monotonic()
            for runner in waiting:
                if now - runner.started >= timeout_s:
                    _abandon(runner, timeout_s)
            waiting = [r for r in runners if not r.done]
            if waiting:
                nearest = min(r.started + timeout_s for r in waiting) - time.monotonic()
                changed.wait(timeout=max(nearest, 0.001))
    return [[r for r in runner.results if r is not None] for runner in runners]


def _abandon(runner: _Runner, timeout_s: float) -> None:
    """The current call missed its deadline: it and the turn's later calls get error texts."""
    runner.abandoned = True
    runner.toolset.busy = runner.thread
    for index in range(runner.current, len(runner.calls)):
        name = runner.calls[index].name
        text = (
            f"error: {name} timed out after {timeout_s:g} s"
            if index == runner.current
            else "error: not run, an earlier call of this turn timed out"
        )
        runner.results[index] = Result(name, text, True)


def call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> tuple[Any, str | None]:
    """(fn(), None), or (None, what went wrong): it raised, or took longer than ``timeout_s``
    (then its daemon thread is left to finish alone). For an environment's reset and
    get_reward."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            value = fn()
            box["value"] = asyncio.run(_awaited(value)) if inspect.isawaitable(value) else value
        except BaseException as error:  # noqa: BLE001
            box["error"] = " ".join("".join(traceback.format_exception_only(error)).split())
        finally:
            done.set()

    threading.Thread(target=run, name="aha-environment", daemon=True).start()
    if not done.wait(timeout_s):
        return None, f"took longer than {timeout_s:g} s"
    if "error" in box:
        return None, f"raised {box['error']}"
    return box.get("value"), None
