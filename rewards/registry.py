"""The reward registry.

Every reward has TRL's signature, so TRL / open-r1 rewards plug in here and ours plug into TRL:

    fn(prompts: list, completions: list, **columns) -> list[float | None]

``completions`` are strings, or chat messages (``[{"role": "assistant", "content": ...}]``).
``columns`` are the dataset row's columns (one list per column, aligned with completions)
plus ``completion_ids`` (token ids per completion, from the rollout record). ``None`` means
"does not apply to this sample" and is left out of that reward's mean; NaN means the same (TRL
turns ``None`` into NaN). ``inf``, ``-inf`` and anything that is not a number is an error of
that call (rl/scoring.py). A correctness reward that extracts an answer reports it with
``log_extra(ANSWER_COLUMN, answers)`` (one canonical string or None per completion), and the
evaluation's majority vote counts those answers.

Names resolve in this order: built-ins registered with :func:`register_reward`, rewards from
installed packages' entry-point group ``aha.rewards``, and ``path/to/file.py:function``. The
last two are user code and run in a worker process of their own (rewards/isolation.py); a
function registered in this process can only run in it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

RewardFn = Callable[..., list[float | None]]

ENTRY_POINT_GROUP = "aha.rewards"
# The log_extra column where a correctness reward puts the answers it extracted, compared as
# strings by the evaluation's majority vote (maj@k), so the vote and the grader agree.
ANSWER_COLUMN = "extracted_answer"

_BUILTINS: dict[str, RewardFn] = {}
# Functions loaded from files, by (path, function, content): a config is checked and then built,
# and the module should not run twice for it; an edited file is loaded afresh.
_FROM_FILES: dict[tuple[str, str, str], RewardFn] = {}


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
    key = (str(path.resolve()), attr, hashlib.sha256(path.read_bytes()).hexdigest())
    if key not in _FROM_FILES:
        _FROM_FILES[key] = _import_from_file(spec, path, attr)
    return _FROM_FILES[key]


def _import_from_file(spec: str, path: Path, attr: str) -> RewardFn:
    module_spec = importlib.util.spec_from_file_location(f"aha_user_reward_{path.stem}", path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's file: one line naming it, not a traceback
        detail = " ".join("".join(traceback.format_exception_only(error)).split())
        raise UnknownRewardError(f"reward {spec!r}: importing {path} raised {detail}") from None
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


def reward_origin(name: str) -> Literal["registered", "entry_point", "file"]:
    """Where ``name`` comes from, as :func:`get_reward` resolves it: "registered" in this process
    (aha's built-ins, or a function a notebook registered), an installed package's entry point,
    or a file. The last two can be loaded again in another process; the first may not be."""
    _load_builtins()
    if name in _BUILTINS:
        return "registered"
    if name in _entry_points():
        return "entry_point"
    if ".py:" in name:
        return "file"
    raise UnknownRewardError(f"unknown reward {name!r}")


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
