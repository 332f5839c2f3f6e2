"""The code reward's pure parts (extraction, test parsing, judging) and its three test forms."""

from __future__ import annotations

import json
import shutil

import pytest

from rewards import get_reward
from rewards.code import reward as code
from rewards.code.sandbox import RunResult, SandboxUnavailableError
from rewards.code.wire import decode, encode

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap",
)


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("```python\na = 1\n```", "python", "a = 1\n"),
        ("```py\na = 1\n```", "python", "a = 1\n"),
        ("```\na = 1\n```", "python", "a = 1\n"),  # untagged counts
        ("```python\nfirst\n```\ntext\n```python\nlast\n```", "python", "last\n"),
        ("```python\npy\n```\n```cpp\nint x;\n```", "python", "py\n"),  # wrong language skipped
        ("```cpp\nint x;\n```", "cpp", "int x;\n"),
        ("```cpp\nint x;\n```", None, "int x;\n"),
        ("no block at all", "python", None),
        ("```python\ntruncated", "python", None),  # unclosed fence: not a block
        ("~~~python\na\n~~~", "python", "a\n"),
    ],
)
def test_extract_code(text, language, expected):
    assert code.extract_code(text, language) == expected


@pytest.mark.parametrize(
    ("spec", "valid"),
    [
        ({"type": "stdio", "cases": [{"input": "1", "output": "1"}]}, True),
        (json.dumps({"type": "stdio", "cases": [{"input": "1", "output": "1"}]}), True),
        ({"type": "stdio", "cases": []}, False),
        ({"type": "function", "entry_point": "f", "cases": [{"args": [1], "expected": 1}]}, True),
        ({"type": "function", "cases": [{"args": [1], "expected": 1}]}, False),
        ({"type": "assert", "entry_point": "f", "code": "def check(c): pass"}, True),
        ({"type": "assert", "entry_point": "f"}, False),
        ({"type": "other"}, False),
        ("not json", False),
        (None, False),
    ],
)
def test_parse_tests(spec, valid):
    assert (code.parse_tests(spec) is not None) == valid


@pytest.mark.parametrize(
    ("actual", "expected", "mode", "equal"),
    [
        ("1 2\n3\n", "1 2\n3\n", "trailing", True),
        ("1 2  \n3", "1 2\n3\n", "trailing", True),  # trailing spaces and final newline
        ("1 2\n3\n\n", "1 2\n3\n", "trailing", False),  # an extra line fails
        ("1 2\n", "1 2\n3\n", "trailing", False),  # a missing line fails
        (" 1 2\n", "1 2\n", "trailing", False),  # leading whitespace matters
        ("1\r\n2\r\n", "1\n2\n", "trailing", True),
        ("1 2\n", "1 2", "exact", False),
        ("1   2\n\n3", "1 2 3", "tokens", True),
    ],
)
def test_compare_stdout(actual, expected, mode, equal):
    assert code.compare_stdout(actual, expected, mode) == equal


@pytest.mark.parametrize(
    ("actual", "expected", "equal"),
    [
        (3, 3, True),
        (3, 3.0, True),
        (0.1 + 0.2, 0.3, True),
        (True, 1, False),  # bools are not numbers
        (1, True, False),
        ([1, [2, 3]], [1, [2, 3]], True),
        ([1, 2], [1, 2, 3], False),
        ({"a": 1}, {"a": 1}, True),
        ({"1": "x"}, {1: "x"}, True),  # JSON object keys are strings
        ("1", 1, False),
        (None, None, True),
        (None, 0, False),
    ],
)
def test_json_equal(actual, expected, equal):
    assert code.json_equal(actual, expected) == equal


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        -2.5,
        "s",
        [1, (2, 3)],
        {(1, 2): {"a": {1, 2}}},
        b"\x00",
        1 + 2j,
        frozenset({1}),
    ],
)
def test_tagged_json_round_trip(value):
    assert decode(json.loads(json.dumps(encode(value)))) == value


def test_tagged_json_refuses_foreign_objects():
    class Sneaky(int):
        def __eq__(self, other):
            return True

    with pytest.raises(TypeError):
        encode(Sneaky(1))
    with pytest.raises(ValueError):
        decode({"__class__": "anything"})


@pytest.mark.parametrize(
    ("messages", "timed_out", "marks"),
    [
        (
            [{"case": 0, "stdout": "2\n", "exit": 0}, {"case": 1, "stdout": "5\n", "exit": 0}],
            False,
            "PF",
        ),
        ([{"case": 0, "stdout": "2\n", "exit": 1}], False, "FE"),  # right output, crashed
        ([{"case": 0, "stdout": "", "exit": None, "timed_out": True}], True, "TT"),
    ],
)
def test_judge_stdio(messages, timed_out, marks):
    tests = {
        "type": "stdio",
        "cases": [{"input": "1", "output": "2"}, {"input": "2", "output": "4"}],
    }
    assert "".join(code.judge(tests, RunResult(messages, timed_out))) == marks


@pytest.mark.parametrize(
    ("marks", "binary", "expected"),
    [("PPF", False, 2 / 3), ("PPF", True, 0.0), ("PP", True, 1.0), ("", False, 0.0)],
)
def test_score(marks, binary, expected):
    assert code.score(list(marks), binary) == pytest.approx(expected)


def test_rows_without_tests_are_not_scored():
    reward = get_reward("code")
    assert reward(["p"], ["```python\nx=1\n```"]) == [None]
    assert reward(["p"], ["```python\nx=1\n```"], tests=["garbage"], sandbox="unsafe-local") == [
        None
    ]


def test_without_bwrap_the_reward_refuses_with_install_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    tests = {"type": "function", "entry_point": "f", "cases": [{"args": [], "expected": 1}]}
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        get_reward("code")(["p"], ["```python\ndef f(): return 1\n```"], tests=[tests])


def test_unsafe_local_mode_is_marked_in_the_logs():
    tests = {"type": "function", "entry_point": "f", "cases": [{"args": [], "expected": 1}]}
    logged = {}
    scores = get_reward("code")(
        ["p"],
        ["```python\ndef f(): return 1\n```"],
        tests=[tests],
        sandbox="unsafe-local",
        log_extra=logged.__setitem__,
    )
    assert scores == [1.0]
    assert logged["code_tests"][0].startswith("[UNSANDBOXED]")


SOLUTIONS = {
    "stdio": (
        {
            "type": "stdio",
            "cases": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}],
        },
        "a, b = map(int, input().split())\nprint(a + b)",
        "a, b = map(int, input().split())\nprint(a * b)",  # right on neither? 2 and 25
    ),
    "function": (
        {
            "type": "function",
            "entry_point": "pair",
            "cases": [{"args": [1, 2], "expected": [2, 1]}, {"args": [3, 3], "expected": [3, 3]}],
        },
        "def pair(a, b):\n    return (b, a)",  # a tuple is compared as its JSON list
        "def pair(a, b):\n    return (a, b)",  # right on the second case only
    ),
    "assert": (
        {
            "type": "assert",
            "entry_point": "inc",
            "prelude": "import math\n",
            "code": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(x=-1) == 0\n",
        },
        "def inc(x):\n    return x + math.floor(1.2)",  # uses the prelude's import
        "def inc(x):\n    return x",
    ),
}


@needs_bwrap
@pytest.mark.parametrize("form", sorted(SOLUTIONS))
def test_forms_end_to_end(form):
    tests, right, wrong = SOLUTIONS[form]
    logged = {}
    completions = [f"```python\n{right}\n```", f"Here:\n```python\n{wrong}\n```", "no code"]
    scores = get_reward("code")(
        ["p"] * 3, completions, tests=[json.dumps(tests)] * 3, log_extra=logged.__setitem__
    )
    expected_wrong = {"stdio": 0.0, "function": 0.5, "assert": 0.0}[form]
    assert scores == [1.0, expected_wrong, 0.0]
    assert logged["code_tests"][2] == "no code block"
    binary = get_reward("code")(["p"] * 2, completions[:2], tests=[tests] * 2, binary=True)
    assert binary == [1.0, 0.0]


@needs_bwrap
def test_chat_message_completions_and_ld_preload(monkeypatch):
    # vLLM may leave LD_PRELOAD set in the trainer; it must not reach the sandbox.
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libnothing.so")
    tests = {"type": "function", "entry_point": "env", "cases": [{"args": [], "expected": None}]}
    completion = [
        {
            "role": "assistant",
            "content": "```python\nimport os\ndef env():\n    return os.environ.get('LD_PRELOAD')\n```",
        }
    ]
    assert get_reward("code")(["p"], [completion], tests=[tests]) == [1.0]


def test_uid_pairs_are_never_shared_at_once():
    from rewards.code.sandbox import UidPairs

    pairs = UidPairs(2_000_000_000)
    first, second = pairs.acquire(), pairs.acquire()
    assert second == first + 2  # each run holds two uids: checker and candidate
    pairs.release(first)
    assert pairs.acquire() == first
