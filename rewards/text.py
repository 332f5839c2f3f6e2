"""Small helpers every reward uses to read completions."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as chat messages. Of several messages (a
    multi-turn trajectory: assistant turns and tool results), the last assistant message: the
    final answer, which is what correctness and format rewards judge."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):  # [{"role": "assistant", "content": "..."}, ...]
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        if assistant:
            return str(assistant[-1].get("content", ""))
        return "".join(str(m.get("content", "")) for m in messages)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)
