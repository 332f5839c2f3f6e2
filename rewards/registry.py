"""The reward registry.

Every reward has TRL's signature, so TRL / open-r1 rewards plug in here and ours plug into TRL:

    fn(prompts: list, completions: list, **columns) -> list[float | None]

``completions`` are strings, or chat messages (``[{"role": "assistant", "content": ...}]``).
``columns`` are the dataset row's columns (one list per column, aligned with completions)
plus ``completion_ids`` (token ids per completion, from the rollout record). ``None`` means
"does not apply to this sample" and is left out of that reward's mean.

Names resolve in this order: built-ins registered with :func:`register_reward`, rewards from
installed packages' entry-point group ``aha.rewards``, and ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

RewardFn = Callable[..., list[float | None]]

ENTRY_POINT_GROUP = "aha.rewards"

_BUILTINS: dict[str, RewardFn] = {}


class UnknownRewardError(ValueError):
    pass


def register_reward(name: str, columns: tuple[str, ...] = ()) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available to configs as ``name``. ``columns`` are the dataset
    columns it reads; the trainer checks them before any work."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _BUILTINS and _BUILTINS[name] is not fn:
            raise ValueError(f"reward {name!r} is registered twice")
        _BUILTINS[name] = fn
        fn.__reward_name__ = name  # type: ignore[attr-defined]
        fn.required_columns = tuple(columns)  # type: ignore[attr-defined]
        return fn

    return decorate


def _load_builtins() -> None:
    # Importing the modules runs their @register_reward decorators.
    from rewards import builtin  # noqa: F401


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_from_file(spec: str) -> RewardFn:
    path_text, _, attr = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise UnknownRewardError(f"reward {spec!r}: file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"aha_user_reward_{path.stem}", path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UnknownRewardError(f"reward {spec!r}: {path} has no function {attr!r}")
    return fn


def get_reward(name: str) -> RewardFn:
    """The reward function called ``name``; an unknown name fails listing the known ones."""
    _load_builtins()
    if name in _BUILTINS:
        return _BUILTINS[name]
    entry_points = _entry_points()
    if name in entry_points:
        return entry_points[name].load()
    if ".py:" in name:
        return _load_from_file(name)
    known = ", ".join(sorted(set(_BUILTINS) | set(entry_points)))
    raise UnknownRewardError(
        f"unknown reward {name!r}; known rewards: {known} (or give path/to/file.py:function)"
    )


def list_rewards() -> dict[str, str]:
    """Every built-in and installed reward, with the first line of its docstring."""
    _load_builtins()
    found: dict[str, Any] = dict(_BUILTINS)
    for name, ep in _entry_points().items():
        try:
            found.setdefault(name, ep.load())
        except Exception as error:  # a broken plugin must not hide the others
            found.setdefault(name, f"(failed to load: {error})")
    return {
        name: fn if isinstance(fn, str) else (fn.__doc__ or "").strip().split("\n")[0]
        for name, fn in sorted(found.items())
    }
