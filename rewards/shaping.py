"""Shaping rewards: small signals about the form and length of a completion, added to the
correctness reward. Each is a pure function with TRL's signature; None = does not apply.
"""

from __future__ import annotations

import math
from typing import Any

from rewards.registry import register_reward
from rewards.text import completion_text


def _lengths(completions: list, completion_ids: list | None) -> list[int]:
    """Token counts from the trainer's ``completion_ids``; characters when it passes none."""
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


def tag_count_score(text: str) -> float:
    """0.25 for each R1 tag written exactly once with its newlines (open-r1 ``tag_count_reward``,
    github.com/huggingface/open-r1, src/open_r1/rewards.py): partial credit that a small model
    can climb before it gets the whole format right."""
    score = 0.0
    for tag in ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>"):
        if text.count(tag) == 1:
            score += 0.25
    return score


@register_reward("tag_count")
def tag_count_reward(prompts: list, completions: list, **_: Any) -> list[float | None]:
    """0 to 1: a quarter for each of <think>, </think>, <answer>, </answer> written once."""
    return [tag_count_score(completion_text(c)) for c in completions]


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13):
    0 up to ``max_length - buffer`` tokens, then falling linearly to -1 at ``max_length``,
    and -1 beyond. A truncated answer is punished, gently near the limit."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0


@register_reward("overlong")
def overlong_reward(
    prompts: list,
    completions: list,
    completion_ids: list | None = None,
    max_completion_length: int | None = None,
    overlong_buffer: int = 256,
    **_: Any,
) -> list[float | None]:
    """DAPO soft overlong penalty in [-1, 0]; needs ``max_completion_length`` (and token ids)."""
    if max_completion_length is None or completion_ids is None:
        return [None] * len(completions)
    buffer = max(1, min(overlong_buffer, max_completion_length))
    return [
        overlong_penalty(n, max_completion_length, buffer)
        for n in _lengths(completions, completion_ids)
    ]


def cosine_scaled(
    length: int,
    correct: bool,
    max_length: int,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
) -> float:
    """Cosine length scaling (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning",
    arXiv:2502.03373, eq. 1; as in open-r1 ``get_cosine_scaled_reward``): a correct answer
    earns more when short, a wrong one is punished less when long (it may have been thinking).

        r = lo + (hi - lo) * (1 + cos(pi * L / L_max)) / 2
    with (lo, hi) = (min_correct, max_correct) if correct else (max_wrong, min_wrong).
    """
    cosine = math.cos(math.pi * min(length, max_length) / max_length)
    if correct:
        low, high = min_value_correct, max_value_correct
    else:
        low, high = max_value_wrong, min_value_wrong
    return low + 0.5 * (high - low) * (1.0 + cosine)


@register_reward("cosine")
def cosine_reward(
    prompts: list,
    completions: list,
    completion_ids: list | None = None,
    max_length: int | None = None,
    max_completion_length: int | None = None,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    **columns: Any,
) -> list[float | None]:
    """Correctness (the ``math`` reward) scaled by length with a cosine; None where math is None."""
    from rewards.math import math_reward

    limit = max_length or max_completion_length or 1000
    correct = math_reward(prompts, completions, **columns)
    lengths = _lengths(completions, completion_ids)
    return [
        None
        if ok is None
        else cosine_scaled(
            n, ok > 0, limit, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct
        )
        for ok, n in zip(correct, lengths, strict=True)
    ]


def repetition_penalty(text: str, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """``max_penalty`` times the share of repeated word n-grams (Yeo et al. 2025, sec. 4;
    open-r1 ``get_repetition_penalty_reward``): 0 for text with no repeated n-gram, towards
    ``max_penalty`` for a loop."""
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty


@register_reward("repetition")
def repetition_reward(
    prompts: list, completions: list, ngram_size: int = 3, max_penalty: float = -1.0, **_: Any
) -> list[float | None]:
    """Word n-gram repetition penalty in [max_penalty, 0]."""
    if max_penalty > 0:
        max_penalty = -max_penalty  # a penalty: a positive value in a config means its size
    return [repetition_penalty(completion_text(c), ngram_size, max_penalty) for c in completions]
