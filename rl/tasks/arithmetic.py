"""Arithmetic word problems in graded difficulty, generated from a seed.

Small enough that SmolLM2-135M solves some of them (it is fluent but unreliable at sums),
so a few dozen GRPO steps on a CPU show the reward move. The test split is generated from a
different seed stream and every train problem that also appears in it is removed, so the
held-out accuracy measures the skill, not memory.
"""

from __future__ import annotations

import random
from typing import Any

from rl.tasks import register_task

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jia", "Kofi", "Lena"]
_THINGS = ["apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards"]


def _problem(rng: random.Random, level: int) -> tuple[str, int]:
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    if level == 1:  # one-digit addition
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return (
            f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
            a + b,
        )
    if level == 2:  # subtraction within 20
        a = rng.randint(5, 20)
        b = rng.randint(1, a - 1)
        return (
            f"{name} had {a} {thing} and gave {b} to {other}. How many {thing} does {name} have left?",
            a - b,
        )
    if level == 3:  # two-digit addition
        a, b = rng.randint(10, 60), rng.randint(10, 39)
        return (
            f"{name} has {a} {thing}. {other} has {b} {thing}. How many {thing} do they have together?",
            a + b,
        )
    if level == 4:  # one-digit multiplication
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (
            f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} does {name} have?",
            a * b,
        )
    # level 5: two operations
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    return (
        f"{name} buys {a} boxes of {b} {thing} and then finds {c} more. "
        f"How many {thing} does {name} have?",
        a * b + c,
    )


def generate(count: int, seed: int, levels: tuple[int, ...]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        level = rng.choice(levels)
        question, answer = _problem(rng, level)
        rows.append({"prompt": question, "answer": str(answer), "level": level})
    return rows


@register_task("arithmetic", rewards=("math", "format"))
def load_arithmetic(
    split: str,
    seed: int = 0,
    size: int | None = None,
    levels: tuple[int, ...] | list[int] = (1, 2, 3, 4, 5),
) -> list[dict[str, Any]]:
    """Arithmetic word problems, levels 1-5 (one-digit sums to two-step problems), from a seed."""
    levels = tuple(levels)
    if split == "test":
        # A fixed stream, independent of the training seed, so every run is scored on the same set.
        return generate(size or 200, seed=10_000_019, levels=levels)
    if split != "train":
        raise ValueError(f"task 'arithmetic' has splits train and test, not {split!r}")
    held_out = {row["prompt"] for row in generate(200, seed=10_000_019, levels=levels)}
    rows = [
        r
        for r in generate((size or 5000) + 200, seed=seed, levels=levels)
        if r["prompt"] not in held_out
    ]
    return rows[: size or 5000]
