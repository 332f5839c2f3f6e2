"""Procedurally generated tasks from reasoning-gym (Stojanovski et al. 2025,
github.com/open-thought/reasoning-gym, Apache-2.0), generated from a seed, scored by the
generator's own verifier through the ``reasoning_gym`` reward (rewards/reasoning_gym_reward.py).

The row's ``metadata`` column is JSON text (reasoning-gym's metadata holds tuples and nested
dicts that Arrow tables do not take), which the reward passes back to the verifier.
"""

from __future__ import annotations

import json
from typing import Any

from rl.tasks import register_task

_TEST_SEED = 10_000_019  # a fixed stream, as in rl/tasks/arithmetic.py, so every run tests alike


def generate(name: str, size: int, seed: int, **config: Any) -> list[dict[str, Any]]:
    """``size`` rows of the reasoning-gym dataset ``name``; imported lazily (it pulls matplotlib)."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    return [
        {
            "prompt": entry["question"],
            "answer": str(entry["answer"]),
            "metadata": json.dumps(entry["metadata"], default=list),
        }
        for entry in dataset
    ]


def _split_rows(
    name: str, split: str, seed: int, size: int | None, test_size: int, **config: Any
) -> list[dict[str, Any]]:
    if split == "test":
        return generate(name, size or test_size, _TEST_SEED, **config)
    if split != "train":
        raise ValueError(f"task {name!r} has splits train and test, not {split!r}")
    held_out = {row["prompt"] for row in generate(name, test_size, _TEST_SEED, **config)}
    rows = [
        r
        for r in generate(name, (size or 5000) + test_size, seed, **config)
        if r["prompt"] not in held_out
    ]
    return rows[: size or 5000]


@register_task("countdown", rewards=("reasoning_gym", "format"))
def load_countdown(
    split: str, seed: int = 0, size: int | None = None, test_size: int = 200, **config: Any
) -> list[dict[str, Any]]:
    """Countdown (reasoning-gym): reach a target with +-*/ over given numbers (TinyZero's task)."""
    return _split_rows("countdown", split, seed, size, test_size, **config)


@register_task("basic_arithmetic", rewards=("reasoning_gym", "format"))
def load_basic_arithmetic(
    split: str, seed: int = 0, size: int | None = None, test_size: int = 200, **config: Any
) -> list[dict[str, Any]]:
    """Basic arithmetic expressions (reasoning-gym), e.g. "Calculate 5 - 3 - 6."."""
    return _split_rows("basic_arithmetic", split, seed, size, test_size, **config)
