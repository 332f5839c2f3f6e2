"""A run's speed and memory in one table, from its metrics.jsonl: the median of each timing and
throughput over the steps after the first (which warms up caches and kernels), and the peak memory.

    python -m rl.benchmarks.run_figures runs/default-20261201-120000
    python -m rl.benchmarks.run_figures runs/r1 --skip 3 --json

What a GPU figure for the README needs: `perf/throughput` (completion tokens/s over the whole
step), `perf/update_throughput` and `perf/mfu` (the update phase's), `perf/peak_memory_gib`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rl.jsonl import read_jsonl

MEDIAN = (
    "timing_s/step",
    "timing_s/gen",
    "timing_s/reward",
    "timing_s/old_logp",
    "timing_s/ref",
    "timing_s/update",
    "timing_s/sync",
    "tokens",
    "update_tokens",
    "perf/throughput",
    "perf/update_throughput",
    "perf/mfu",
)
PEAK = ("perf/peak_memory_gib", "perf/peak_rss_gib")


def step_lines(metrics_file: Path) -> list[dict[str, float]]:
    """The per-step lines of a metrics.jsonl (evaluation lines have no loss), in step order."""
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: no such file (is this a run folder?)")
    lines = [
        line for line in read_jsonl(metrics_file) if "loss" in line
    ]  # JsonlError: a ValueError
    return sorted(lines, key=lambda line: line["step"])


def figures(lines: list[dict[str, float]], skip: int = 1) -> dict[str, float]:
    """Medians over ``lines[skip:]`` (all lines when there are no more), peaks over all."""
    timed = lines[skip:] or lines
    out: dict[str, float] = {"steps": float(len(timed))}
    for name in MEDIAN:
        values = [line[name] for line in timed if name in line]
        if values:
            out[name] = statistics.median(values)
    for name in PEAK:
        values = [line[name] for line in lines if name in line]
        if values:
            out[name] = max(values)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip", type=int, default=1, help="warm-up steps left out of medians")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        lines = step_lines(args.run_dir / "metrics.jsonl")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not lines:
        print(f"error: {args.run_dir / 'metrics.jsonl'} has no step lines yet", file=sys.stderr)
        return 2
    result = figures(lines, args.skip)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.run_dir}: medians over {int(result.pop('steps'))} steps, peaks over all")
    for name, value in result.items():
        shown = f"{value:.4f}" if name == "perf/mfu" else f"{value:,.2f}"
        print(f"  {name:<24} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
