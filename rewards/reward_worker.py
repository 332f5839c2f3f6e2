"""A reward worker: ``python -m rewards.reward_worker NAME PARENT_PID`` (rewards/isolation.py).

It loads the reward called NAME through the registry (a ``path.py:function`` or an
``aha.rewards`` entry point), says it is ready, then answers one call at a time: a pickled dict
of TRL's keyword arguments in, a pickled reply out (length-prefixed, on a private copy of
stdout, so anything the reward prints goes to stderr). The reply holds only plain values, so
the trainer never unpickles an object of the reward's own classes:

    {"scores": [float | None, ...], "extra": [(column, values)], "metrics": [(name, value)]}
    {"raised": "ValueError: ..."}          the reward raised
    {"bad": "returned inf for ...", "row": 3}   it returned something that is not a score

It is a plain subprocess, not a ``multiprocessing`` child, so it does not depend on the start
method vLLM sets (spawn re-imports the trainer's ``__main__``, and torch with it). It ends when
its stdin closes, and by itself if the trainer that started it is gone.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

from rewards.isolation import (
    _HEADER,
    BadScores,
    RewardOutput,
    _awaited,
    checked_scores,
    describe,
    write_message,
)


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as None, bool, int, float, str, list or dict (numpy scalars as numbers,
    anything else as its str)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth > 20:
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy, torch scalars
        return plain(value.item(), depth + 1)
    if hasattr(value, "tolist"):
        return plain(value.tolist(), depth + 1)
    return str(value)


def _read_exactly(stream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _exit_with_parent(parent: int) -> None:
    """The trainer died without closing our stdin (kill -9, a crash): end this process group,
    the reward's own children with it. A hung reward keeps the main thread busy, so this
    watches from a thread."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


def answer(fn: Any, kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    output = RewardOutput([])
    try:
        value = fn(**kwargs, log_extra=output.log_extra, log_metric=output.log_metric)
        if inspect.isawaitable(value):
            value = loop.run_until_complete(_awaited(value))
        scores = checked_scores(value, len(kwargs["completions"]))
    except BadScores as error:
        return {"bad": str(error), "row": error.row}
    except BaseException as error:  # noqa: BLE001 - SystemExit in a reward is its error too
        return {"raised": describe(error)}
    return {"scores": scores, "extra": plain(output.extra), "metrics": plain(output.metrics)}


def main() -> None:
    protocol = os.dup(1)
    os.dup2(2, 1)  # print() in the reward goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    # The parent's pid as it was told, not os.getppid(): the trainer may already be gone.
    parent = int(sys.argv[2])
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        from rewards.registry import get_reward

        fn = get_reward(sys.argv[1])
    except BaseException as error:  # noqa: BLE001 - told to the trainer, which reports it
        write_message(protocol, {"error": describe(error)})
        return
    write_message(protocol, {"ready": True})
    loop = asyncio.new_event_loop()  # one loop for every call: a client made on it stays usable
    asyncio.set_event_loop(loop)
    stdin = sys.stdin.buffer
    while (header := _read_exactly(stdin, _HEADER.size)) is not None:
        data = _read_exactly(stdin, _HEADER.unpack(header)[0])
        if data is None:
            break
        write_message(protocol, answer(fn, pickle.loads(data), loop))


if __name__ == "__main__":
    main()
