"""Tools and environments as a config names them, resolved to callables with JSON schemas.

A tool is a plain typed Python function with a Google-style docstring (TRL's and transformers'
contract); its schema comes from transformers' ``get_json_schema``. ``rollout.tools`` names
built-ins (``calculator``, ``python``), ``path/to/file.py:function`` or ``package.module:function``.

An environment is TRL's ``environment_factory`` contract: a class built with no arguments, with
``reset(**row) -> str | None`` (a string is appended to the last prompt message), public methods
that are its tools, and an optional ``get_reward() -> float``. ``rollout.environment`` names
``path/to/file.py:Class``, ``package.module:Class`` or an installed package's entry point in the
group ``aha.environments``. One instance per trajectory.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENVIRONMENT_ENTRY_POINTS = "aha.environments"
# Methods of an environment that are not tools (TRL's rule: these two and names starting "_").
NOT_TOOLS = ("reset", "get_reward")


class ToolError(ValueError):
    """A tool or environment that cannot be used, said in one line naming it."""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", ...}}


def tool_schema(fn: Callable[..., Any], where: str) -> dict[str, Any]:
    """transformers' JSON schema of ``fn`` (from its type hints and docstring)."""
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as error:  # its own errors say what is missing (docstring, a type hint)
        raise ToolError(f"{where}: no tool schema for {_name(fn)!r}: {error}") from None
    if "function" not in schema:  # older transformers return the bare function object
        schema = {"type": "function", "function": schema}
    return schema


def as_tool(fn: Callable[..., Any], where: str) -> Tool:
    return Tool(_name(fn), fn, tool_schema(fn, where))


def resolve_tools(
    specs: list[str], builtin_deadline_s: float = 10.0, key: str = "rollout.tools"
) -> list[Tool]:
    """The tools a config names, in order; a bad name is a ToolError naming the list item.
    Built-ins are made to answer within ``builtin_deadline_s``."""
    from rollouts.agent.builtin_tools import BUILTIN_TOOLS

    tools: list[Tool] = []
    for index, spec in enumerate(specs):
        where = f"{key}.{index}"
        if spec in BUILTIN_TOOLS:
            try:
                fn = BUILTIN_TOOLS[spec](builtin_deadline_s)
            except Exception as error:  # e.g. `python` without bubblewrap: say so at load
                raise ToolError(
                    f"{where}: the built-in tool {spec!r} cannot run: {error}"
                ) from None
        elif ":" in spec:
            fn = load_object(spec, where)
        else:
            known = ", ".join(sorted(BUILTIN_TOOLS))
            raise ToolError(
                f"{where}: unknown tool {spec!r}; built-in tools: {known} (or give "
                "path/to/file.py:function or package.module:function)"
            )
        if not callable(fn) or inspect.isclass(fn):
            raise ToolError(f"{where}: {spec!r} is not a function")
        tool = as_tool(fn, where)
        if any(t.name == tool.name for t in tools):
            raise ToolError(f"{where}: a second tool named {tool.name!r}")
        tools.append(tool)
    return tools


def load_environment(spec: str, key: str = "rollout.environment") -> type:
    """The environment class ``spec`` names (a file's or module's class, or an entry point)."""
    entry_points = {
        ep.name: ep for ep in importlib.metadata.entry_points(group=ENVIRONMENT_ENTRY_POINTS)
    }
    if spec in entry_points:
        try:
            cls = entry_points[spec].load()
        except Exception as error:
            raise ToolError(f"{key}: entry point {spec!r} failed to load: {_said(error)}") from None
    elif ":" in spec:
        cls = load_object(spec, key)
    else:
        known = ", ".join(sorted(entry_points)) or "none installed"
        raise ToolError(
            f"{key}: {spec!r} is not path/to/file.py:Class, package.module:Class or an "
            f"{ENVIRONMENT_ENTRY_POINTS} entry point ({known})"
        )
    if not inspect.isclass(cls) and not callable(cls):
        raise ToolError(f"{key}: {spec!r} is not a class")
    if not callable(getattr(cls, "reset", None)):
        raise ToolError(f"{key}: {spec!r} has no reset method (TRL's environment contract)")
    return cls


def environment_methods(instance: Any) -> list[Callable[..., Any]]:
    """The tools of an environment instance: its public methods but reset and get_reward,
    listed on the class (as TRL does, so that properties are not evaluated), bound."""
    return [
        getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if name not in NOT_TOOLS and not name.startswith("_")
    ]


def has_reward(environment_class: type) -> bool:
    return callable(getattr(environment_class, "get_reward", None))


def load_object(spec: str, where: str) -> Any:
    """``path/to/file.py:name`` (the file run as a module) or ``package.module:name``."""
    source, _, attribute = spec.rpartition(":")
    if not source or not attribute:
        raise ToolError(f"{where}: {spec!r} is not SOURCE:NAME")
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ToolError(f"{where}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"aha_user_tools_{path.stem}", path)
        assert module_spec and module_spec.loader
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise ToolError(f"{where}: importing {path} raised {_said(error)}") from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as error:
            raise ToolError(f"{where}: cannot import {source!r}: {_said(error)}") from None
    if not hasattr(module, attribute):
        raise ToolError(f"{where}: {source} has no {attribute!r}")
    return getattr(module, attribute)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _said(error: BaseException) -> str:
    return " ".join("".join(traceback.format_exception_only(error)).split())
