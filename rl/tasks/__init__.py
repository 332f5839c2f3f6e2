"""Built-in tasks: named datasets that need no download.

A task is a function ``load(split: str, seed: int, **options) -> list[dict]`` registered
under a name. Every row has a ``prompt`` column (the user's message, plain text) and the
columns its rewards read (``answer`` for math, ``tests`` for code). A task may name the
system prompt and rewards it is meant to be trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TaskLoader = Callable[..., list[dict[str, Any]]]


@dataclass(frozen=True)
class Task:
    name: str
    load: TaskLoader
    description: str
    splits: tuple[str, ...] = ("train", "test")
    system_prompt: str | None = None  # None: the config's system prompt
    rewards: tuple[str, ...] = field(default_factory=tuple)  # what it is scored with


_TASKS: dict[str, Task] = {}


def register_task(
    name: str,
    splits: tuple[str, ...] = ("train", "test"),
    system_prompt: str | None = None,
    rewards: tuple[str, ...] = (),
) -> Callable[[TaskLoader], TaskLoader]:
    def decorate(load: TaskLoader) -> TaskLoader:
        description = (load.__doc__ or "").strip().split("\n")[0]
        _TASKS[name] = Task(name, load, description, splits, system_prompt, rewards)
        return load

    return decorate


def _load_builtins() -> None:
    from rl.tasks import builtin  # noqa: F401


def get_task(name: str) -> Task | None:
    _load_builtins()
    return _TASKS.get(name)


def list_tasks() -> dict[str, Task]:
    _load_builtins()
    return dict(sorted(_TASKS.items()))
