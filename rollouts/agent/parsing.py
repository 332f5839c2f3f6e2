"""Tool calls read from an assistant turn's text, in its chat template's format.

- ``hermes`` (Hermes, Qwen 2/2.5/3, and what aha teaches templates without tools): each call
  is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; the text around the calls is
  the turn's content.
- ``llama3`` (Llama 3.1+ JSON tool calling): the turn is one JSON object
  ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), possibly after
  ``<|python_tag|>``; several may be separated by ``;``.

A call that is attempted but cannot be read (bad JSON, no name, arguments that are not an
object, an unclosed tag) is kept as a :class:`Call` with an ``error``: the turn loop answers it
with that error as the tool's result, so the model learns from it.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

CallFormat = Literal["hermes", "llama3"]

_HERMES_CALL = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


@dataclass
class Call:
    name: str  # "" when it could not be read
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the call could not be read

    def as_trl(self) -> dict[str, Any]:
        """TRL's (and chat templates') form of a call."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: str  # the turn's text without its calls
    calls: list[Call]  # every call it attempted, readable or not, in order


def parse_calls(text: str, call_format: CallFormat) -> Parsed:
    if call_format == "hermes":
        return parse_hermes(text)
    if call_format == "llama3":
        return parse_llama3(text)
    raise ValueError(f"unknown tool call format {call_format!r}")


def parse_hermes(text: str) -> Parsed:
    calls = []
    for match in _HERMES_CALL.finditer(text):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(Call("", error="malformed tool call: <tool_call> is never closed"))
            continue
        calls.append(_call_from_json(body, "arguments"))
    content = _HERMES_CALL.sub("", text).strip()
    return Parsed(content, calls)


def parse_llama3(text: str) -> Parsed:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return Parsed(text.strip(), [])
    calls, decoder, position = [], json.JSONDecoder(), 0
    while position < len(body):
        try:
            value, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError as error:
            calls.append(Call("", error=f"malformed tool call: not JSON ({error.msg})"))
            break
        calls.append(_call_from_value(value, "parameters"))
        position = end
        while position < len(body) and body[position] in " \t\r\n;":
            position += 1
    return Parsed("", calls)


def _call_from_json(body: str, arguments_key: str) -> Call:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return Call("", error=f"malformed tool call: not JSON ({error.msg})")
    return _call_from_value(value, arguments_key)


def _call_from_value(value: Any, arguments_key: str) -> Call:
    """A call from a decoded JSON value: {"name": str, "arguments"/"parameters": object}."""
    if not isinstance(value, dict):
        return Call("", error="malformed tool call: expected a JSON object with a name")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return Call("", error='malformed tool call: no "name"')
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        return Call(name, error=f"malformed tool call to {name}: arguments must be a JSON object")
    return Call(name, arguments)


def detect_format(chat_template: str | None) -> CallFormat:
    """The call format a chat template teaches: Llama 3's when it speaks of ``ipython`` or
    ``<|python_tag|>``, otherwise Hermes (the one aha describes to templates that ignore tools)."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "hermes"
