"""Format rewards: did the completion reason in <think>...</think> and then answer?

The think-then-answer layout is DeepSeek-R1-Zero's training template (DeepSeek-AI 2025, Table 1):
reasoning inside ``<think>``, the final answer inside ``<answer>``.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import register_reward
from rewards.text import completion_text

# Strict: nothing but one think block then one answer block (whitespace allowed between).
_STRICT = re.compile(
    r"^\s*<think>(?:(?!<think>|</think>).)+</think>\s*<answer>(?:(?!<answer>|</answer>).)+</answer>\s*$",
    re.DOTALL,
)
# Lenient: a closed think block followed, anywhere later, by a closed answer block.
_LENIENT = re.compile(r"<think>.+?</think>.*?<answer>.+?</answer>", re.DOTALL)


@register_reward("format")
def format_reward(
    prompts: list, completions: list, strict: bool = True, **_: Any
) -> list[float | None]:
    """1 if the completion is <think>reasoning</think> then <answer>answer</answer>, else 0."""
    pattern = _STRICT if strict else _LENIENT
    return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]


@register_reward("format_lenient")
def format_lenient_reward(prompts: list, completions: list, **_: Any) -> list[float | None]:
    """1 if a closed <think> block is followed somewhere by a closed <answer> block, else 0."""
    return format_reward(prompts, completions, strict=False)
