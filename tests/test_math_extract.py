"""Answer extraction and the no-sympy fast path, table-driven (pure functions, no workers)."""

from __future__ import annotations

import pytest

from rewards.math.extract import extract_answer, last_boxed, strip_math_delimiters
from rewards.math.reward import decide_fast, gold_answer

ALL = ("answer_tag", "boxed", "answer_is", "gsm8k", "last_latex", "last_number")


@pytest.mark.parametrize(
    ("text", "order", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", None, "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", None, "2"),  # several boxed: the last counts
        ("\\boxed{\\sqrt{\\frac{a}{b}}} end", None, "\\sqrt{\\frac{a}{b}}"),  # nested braces
        ("\\boxed{3} and a truncated \\boxed{4", None, "3"),
        ("<think>\\boxed{7}</think><answer>12</answer>", None, "12"),  # the tag wins over think
        ("<think>x</think><answer>so \\boxed{5}</answer>", None, "5"),
        ("<think>x</think><answer> The answer is 6. </answer>", None, "6"),
        ("The final answer is $x^2$.\nDone", None, "$x^2$"),
        ("the answer is: 3.5", None, "3.5"),
        ("so the answer is \\boxed{8}. Yes", None, "8"),
        ("work\n#### 1,234", None, "1,234"),
        ("it is 42 I think", None, None),  # no marker: no answer by default
        ("it is 42 I think", ALL, "42"),
        ("we get $x = 3$ and so", ALL, "x = 3"),
        ("<answer></answer>", None, None),
        ("", None, None),
    ],
)
def test_extract_answer(text: str, order: tuple[str, ...] | None, expected: str | None) -> None:
    got = extract_answer(text) if order is None else extract_answer(text, order)
    assert got == expected


def test_extract_order_is_an_option() -> None:
    text = "\\boxed{1} #### 2"
    assert extract_answer(text) == "1"
    assert extract_answer(text, ("gsm8k", "boxed")) == "2"
    with pytest.raises(ValueError, match="unknown extraction"):
        extract_answer(text, ("nope",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$\\frac12$", "\\frac12"),
        ("\\(x\\)", "x"),
        ("\\boxed{3}", "3"),
        ("5.", "5"),
        ("$$7$$", "7"),
    ],
)
def test_strip_math_delimiters(text: str, expected: str) -> None:
    assert strip_math_delimiters(text) == expected


def test_last_boxed_none() -> None:
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("gold", "expected"),
    [(27.0, "27"), ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"), (" 18 ", "18")],
)
def test_gold_answer(gold: object, expected: str) -> None:
    assert gold_answer(gold) == expected


@pytest.mark.parametrize(
    ("gold", "pred", "kwargs", "expected"),
    [
        ("1000", "1,000", {}, True),
        ("1000", "1000.0", {}, True),
        ("0.5", "\\frac{1}{2}", {}, True),
        ("0.5", "1/2", {}, True),
        ("1/3", "0.333333", {}, True),  # a decimal may round a fraction
        ("1/3", "0.33", {}, False),
        ("1500", "1.5e3", {}, True),
        ("1500", "1.5\\times10^{3}", {}, True),
        ("-4", "-4", {}, True),
        ("12", "\\$12", {}, True),
        ("12", "12 dollars", {}, True),
        ("50\\%", "0.5", {}, True),
        ("50\\%", "50", {}, True),
        ("50\\%", "50", {"percent": "value"}, False),
        ("50\\%", "0.5", {"percent": "number"}, False),
        ("32349", "32, 349", {}, None),  # a list, not a thousands separator: goes to sympy
        ("C", "(C)", {}, True),
        ("C", "\\text{(C) } 12", {}, True),
        ("(B)", "C", {}, False),
        ("\\dfrac{3}{4}", "\\frac{3}{4}", {}, True),
        ("x+1", "x + 1", {}, True),
        ("4", "4\\sqrt{2}", {}, None),
    ],
)
def test_decide_fast(gold: str, pred: str, kwargs: dict, expected: bool | None) -> None:
    assert decide_fast(gold, pred, **kwargs) is expected
