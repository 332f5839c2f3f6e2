"""Built-in math tasks: vendored benchmarks (with licences) and reasoning-gym tasks."""

from __future__ import annotations

import json

import pytest

from rewards import get_reward
from rl.tasks import get_task
from rl.tasks.math_benchmarks import DATA

pytest.importorskip("reasoning_gym")


@pytest.mark.parametrize(
    ("name", "split", "count"),
    [
        ("gsm8k", "train", 7473),
        ("gsm8k", "test", 1319),
        ("math500", "test", 500),
        ("aime24", "test", 30),
        ("amc23", "test", 40),
    ],
)
def test_benchmark_rows(name: str, split: str, count: int) -> None:
    task = get_task(name)
    assert task is not None and "math" in task.rewards
    rows = task.load(split)
    assert len(rows) == count
    assert all(
        isinstance(r["prompt"], str)
        and r["prompt"]
        and isinstance(r["answer"], str)
        and r["answer"]
        for r in rows
    )
    assert (DATA / name / "LICENSE").is_file()


def test_answers_are_clean() -> None:
    gsm8k = get_task("gsm8k").load("test")
    assert gsm8k[0]["answer"] == "18" and "####" not in "".join(r["answer"] for r in gsm8k)
    amc = get_task("amc23").load("test")
    assert amc[0]["answer"] == "27" and not any(r["answer"].endswith(".0") for r in amc)
    assert len(get_task("math500").load("test", size=10, seed=1)) == 10


def test_unknown_split_fails() -> None:
    with pytest.raises(ValueError, match="splits"):
        get_task("math500").load("train")


@pytest.mark.parametrize("name", ["countdown", "basic_arithmetic"])
def test_reasoning_gym_tasks_seeded_and_scored(name: str) -> None:
    task = get_task(name)
    rows = task.load("train", seed=3, size=20, test_size=20)
    assert rows == task.load("train", seed=3, size=20, test_size=20) and len(rows) == 20
    test_prompts = {r["prompt"] for r in task.load("test", test_size=20)}
    assert not test_prompts & {r["prompt"] for r in rows}
    reward = get_reward("reasoning_gym")
    completions = [f"<think>x</think><answer>{r['answer']}</answer>" for r in rows[:5]] + [
        "<answer>nonsense</answer>"
    ]
    columns = {
        "metadata": [r["metadata"] for r in rows[:6]],
        "answer": [r["answer"] for r in rows[:6]],
    }
    scores = reward([r["prompt"] for r in rows[:6]], completions, **columns)
    assert (
        scores[:5] == [1.0] * 5 and scores[5] < 0.1
    )  # countdown gives 0.01 for a malformed answer
    json.loads(rows[0]["metadata"])


def test_reasoning_gym_reward_skips_other_rows() -> None:
    assert get_reward("reasoning_gym")(["p"], ["<answer>1</answer>"], metadata=[None]) == [None]
    assert get_reward("reasoning_gym")(["p"], ["<answer>1</answer>"]) == [None]


def test_benchmark_help() -> None:
    from rl.benchmarks.math_checker import main, perturb

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert perturb("5") == "6" and perturb("\\frac{1}{2}") == "(\\frac{1}{2})+1"
