"""Throughput of the math checker against Math-Verify on MATH-500's answers.

Each gold answer is checked against itself and against a perturbed answer (a number plus one,
or the expression plus one), 1,000 verdicts. Ours runs with its worker pool warmed up and its
verdict cache cleared; Math-Verify is called directly in this process (parse + verify).

    python -m rl.benchmarks.math_checker [--size N] [--workers W]
"""

from __future__ import annotations

import argparse
import os
import re
import time

from rl.tasks.math_benchmarks import load_math500


def perturb(answer: str) -> str:
    """A wrong answer of the same shape: 5 -> 6, otherwise (expr)+1."""
    if re.fullmatch(r"-?\d+", answer.strip()):
        return str(int(answer) + 1)
    return f"({answer})+1"


def pairs(size: int | None) -> list[tuple[str, str, bool]]:
    golds = [row["answer"] for row in load_math500("test", size=size)]
    return [(g, g, True) for g in golds] + [(g, perturb(g), False) for g in golds]


def bench_ours(items: list[tuple[str, str, bool]]) -> tuple[float, int]:
    from rewards.math import check_many, get_pool
    from rewards.math import reward as reward_module

    check_many([("1", "\\frac{2}{2}")])  # start the pool outside the timing
    get_pool().check_many([("x", "x")] * get_pool().size, {}, 30)
    reward_module._CACHE.clear()
    start = time.perf_counter()
    verdicts = check_many([(g, p) for g, p, _ in items])
    elapsed = time.perf_counter() - start
    return len(items) / elapsed, sum(
        v.equal == e for v, (_, _, e) in zip(verdicts, items, strict=True)
    )


def bench_math_verify(items: list[tuple[str, str, bool]]) -> tuple[float, int]:
    from math_verify import parse, verify

    start = time.perf_counter()
    right = 0
    for gold, pred, expected in items:
        right += verify(parse(f"${gold}$"), parse(f"${pred}$")) == expected
    elapsed = time.perf_counter() - start
    return len(items) / elapsed, right


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=int, default=None, help="MATH-500 problems to use (default all)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="checker processes (default min(4, cores))"
    )
    args = parser.parse_args(argv)
    if args.workers:
        os.environ["AHA_MATH_WORKERS"] = str(args.workers)
    items = pairs(args.size)
    ours, ours_right = bench_ours(items)
    theirs, theirs_right = bench_math_verify(items)
    n = len(items)
    print(f"verdicts: {n} (MATH-500 gold vs itself and vs a perturbed answer)")
    print(f"aha math checker : {ours:8.1f} verdicts/s, {ours_right}/{n} as expected")
    print(f"math_verify.verify: {theirs:8.1f} verdicts/s, {theirs_right}/{n} as expected")
    print(f"ratio (ours / math_verify): {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
