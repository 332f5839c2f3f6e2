"""The math reward: is the completion's final answer equal to the row's ``answer``?

Numeric equality only for now (integers, decimals, simple fractions, thousands separators);
symbolic equivalence with sympy is its own piece of work.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from rewards.registry import register_reward
from rewards.text import completion_text

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces handled."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(text: str, last_number_fallback: bool = False) -> str | None:
    """The final answer a completion states, or None.

    Order: the last <answer>...</answer>, the last \\boxed{...}, "the answer is ...",
    the GSM8K marker "#### N", then (opt-in) the last number in the text.
    """
    answers = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if answers:
        return answers[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    said = re.findall(r"answer is[:\s]*([^\n]+)", text, re.IGNORECASE)
    if said:
        return said[-1].strip().rstrip(".")
    marked = re.findall(r"####\s*([^\n]+)", text)
    if marked:
        return marked[-1].strip()
    if last_number_fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


def parse_number(text: str) -> Fraction | None:
    """A number written as 12, -3.5, 1,234, 3/4, $12 or 12%; None if it is not one number."""
    cleaned = text.strip().strip("$").replace("\\$", "").replace(",", "").replace(" ", "")
    cleaned = cleaned.rstrip(".").removesuffix("%")
    match = re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+", cleaned)
    if not match:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: str, gold: str) -> bool:
    predicted_number, gold_number = parse_number(predicted), parse_number(gold)
    if predicted_number is not None and gold_number is not None:
        return predicted_number == gold_number
    return predicted.strip() == gold.strip()


@register_reward("math")
def math_reward(
    prompts: list,
    completions: list,
    answer: list | None = None,
    last_number_fallback: bool = False,
    **_: Any,
) -> list[float | None]:
    """1 if the completion's final answer equals the row's `answer` column, else 0."""
    if answer is None:
        return [None] * len(completions)
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if gold is None:
            scores.append(None)
            continue
        stated = extract_answer(completion_text(completion), last_number_fallback)
        scores.append(1.0 if stated is not None and answers_equal(stated, str(gold)) else 0.0)
    return scores
