"""Shaping rewards, table-driven against hand-computed values."""

from __future__ import annotations

import math

import pytest

from rewards import get_reward

THINK = "<think>\nreason\n</think>\n<answer>\n4\n</answer>"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("format", "<think>r</think><answer>4</answer>", 1.0),
        ("format", " <think>r</think>\n<answer>4</answer>\n", 1.0),
        ("format", "<think>r</think><answer>4</answer> extra", 0.0),
        ("format", "<think>r</think><think>s</think><answer>4</answer>", 0.0),
        ("format", "<answer>4</answer>", 0.0),
        ("format", "", 0.0),
        ("format_lenient", "hi <think>r</think> so <answer>4</answer> bye", 1.0),
        ("format_lenient", "<think>r</think>", 0.0),
        ("format_lenient", "<answer>4</answer><think>r</think>", 0.0),
        ("tag_count", THINK, 1.0),
        ("tag_count", "<think>\nreason\n</think>\n", 0.5),
        ("tag_count", "<think>\n<think>\n", 0.0),
        ("tag_count", "plain text", 0.0),
        ("repetition", "the cat sat on the mat", 0.0),
        ("repetition", "a b c a b c", -0.25),  # 4 trigrams, 3 unique
        ("repetition", "go go go go go", -2 / 3),  # 3 trigrams, 1 unique
        ("repetition", "too short", 0.0),
    ],
)
def test_text_rewards(name: str, text: str, expected: float) -> None:
    assert get_reward(name)(["p"], [text]) == pytest.approx([expected])


def test_chat_messages_are_read() -> None:
    assert get_reward("tag_count")(["p"], [[{"role": "assistant", "content": THINK}]]) == [1.0]


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [(0, 0.0), (768, 0.0), (769, -1 / 256), (896, -0.5), (1024, -1.0), (5000, -1.0)],
)
def test_overlong_dapo(tokens: int, expected: float) -> None:
    reward = get_reward("overlong")
    got = reward(
        ["p"], ["x"], completion_ids=[[0] * tokens], max_completion_length=1024, overlong_buffer=256
    )
    assert got == pytest.approx([expected])


def test_overlong_without_limit_does_not_apply() -> None:
    assert get_reward("overlong")(["p"], ["x"], completion_ids=[[1]]) == [None]


@pytest.mark.parametrize(
    ("text", "tokens", "expected"),
    [
        ("\\boxed{4}", 0, 1.0),  # correct and short: max_value_correct
        ("\\boxed{4}", 1000, 0.5),  # correct at the limit: min_value_correct
        ("\\boxed{4}", 500, 0.75),
        ("\\boxed{5}", 0, -1.0),  # wrong and short: the full punishment
        ("\\boxed{5}", 1000, -0.5),  # wrong but long
        ("no answer", 500, -0.75),
    ],
)
def test_cosine(text: str, tokens: int, expected: float) -> None:
    got = get_reward("cosine")(
        ["p"], [text], answer=["4"], completion_ids=[[0] * tokens], max_length=1000
    )
    assert got == pytest.approx([expected])
    assert math.isfinite(got[0])


def test_cosine_without_answer_does_not_apply() -> None:
    assert get_reward("cosine")(["p"], ["\\boxed{4}"], completion_ids=[[0]]) == [None]
