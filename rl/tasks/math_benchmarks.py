"""Math benchmarks vendored in ``rl/tasks/data`` (each folder keeps its LICENSE): GSM8K
(Cobbe et al. 2021), MATH-500 (Lightman et al. 2023, the PRM800K test subset of MATH),
AIME 2024 and AMC 2023 (as in QwenLM/Qwen2.5-Math's evaluation data).

Every row has ``prompt`` (the problem text) and ``answer`` (a string the ``math`` reward
compares against), plus the source's useful columns. Files are read on each load, so
importing this module costs nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from rl.tasks import register_task

DATA = Path(__file__).resolve().parent / "data"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_split(task: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise ValueError(f"task {task!r} has splits {', '.join(splits)}, not {split!r}")


def _subset(rows: list[dict[str, Any]], size: int | None, seed: int) -> list[dict[str, Any]]:
    """The first ``size`` rows of a seeded shuffle (all rows, in file order, when size is None)."""
    if size is None or size >= len(rows):
        return rows
    return random.Random(seed).sample(rows, size)


def gsm8k_final_answer(solution: str) -> str:
    """The number after GSM8K's ``####`` marker, without thousands separators."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def _number_text(value: Any) -> str:
    """27.0 -> "27"; other values as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@register_task("gsm8k", splits=("train", "test"), rewards=("math", "format"))
def load_gsm8k(split: str, seed: int = 0, size: int | None = None) -> list[dict[str, Any]]:
    """GSM8K grade-school word problems (7,473 train / 1,319 test); answer = the number after ####."""
    _check_split("gsm8k", split, ("train", "test"))
    rows = [
        {
            "prompt": r["question"],
            "answer": gsm8k_final_answer(r["answer"]),
            "solution": r["answer"],
        }
        for r in _jsonl(DATA / "gsm8k" / f"{split}.jsonl")
    ]
    return _subset(rows, size, seed)


@register_task("math500", splits=("test",), rewards=("math", "format"))
def load_math500(
    split: str = "test", seed: int = 0, size: int | None = None
) -> list[dict[str, Any]]:
    """MATH-500: 500 competition problems, LaTeX answers, subject and level 1-5."""
    _check_split("math500", split, ("test",))
    rows = [
        {
            "prompt": r["problem"],
            "answer": str(r["answer"]),
            "solution": r["solution"],
            "subject": r["subject"],
            "level": int(r["level"]),
            "unique_id": r["unique_id"],
        }
        for r in json.loads((DATA / "math500" / "test.json").read_text())
    ]
    return _subset(rows, size, seed)


@register_task("aime24", splits=("test",), rewards=("math", "format"))
def load_aime24(
    split: str = "test", seed: int = 0, size: int | None = None
) -> list[dict[str, Any]]:
    """AIME 2024: 30 problems, integer answers 0-999."""
    _check_split("aime24", split, ("test",))
    rows = [
        {
            "prompt": r["problem"],
            "answer": _number_text(r["answer"]),
            "solution": r.get("solution", ""),
            "id": r["id"],
            "url": r.get("url", ""),
        }
        for r in _jsonl(DATA / "aime24" / "test.jsonl")
    ]
    return _subset(rows, size, seed)


@register_task("amc23", splits=("test",), rewards=("math", "format"))
def load_amc23(split: str = "test", seed: int = 0, size: int | None = None) -> list[dict[str, Any]]:
    """AMC 2023: 40 problems with numeric answers (27.0 in the source is "27" here)."""
    _check_split("amc23", split, ("test",))
    rows = [
        {
            "prompt": r["problem"],
            "answer": _number_text(r["answer"]),
            "id": r["id"],
            "url": r.get("url", ""),
        }
        for r in _jsonl(DATA / "amc23" / "test.jsonl")
    ]
    return _subset(rows, size, seed)
