"""The distillation benchmark's curves, table and plot (``python -m rl.benchmarks.distill``):
held-out accuracy against the training minutes each run spent, read from its run folder."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {
    "evaluate": "the teacher run's checkpoints",
    "grpo": "GRPO alone (the main job)",
    "sft": "rejection-sampling SFT",
    "opd": "on-policy distillation",
    "opd_reward": "on-policy distillation + rule reward",
}


def rl_curve(run_dir: Path, more: dict[int, float] | None = None) -> list[dict]:
    """(CPU s, wall s, accuracy) at each held-out evaluation of an RL run, the seconds being
    its training steps' up to that evaluation: this benchmark's measurements (``bench/cpu_s``,
    ``bench/wall_s``), or for a run it did not train (the main job's ``aha train``) the steps'
    wall seconds (``timing_s/step``, the same clock) and no CPU seconds (None). ``more``: the
    accuracy of checkpoints evaluated afterwards, by step, for steps the run did not evaluate."""
    from rl.jsonl import read_jsonl

    cpu: float | None = 0.0
    wall = 0.0
    at_step: dict[int, tuple[float | None, float]] = {0: (0.0, 0.0)}
    points = []
    for line in read_jsonl(run_dir / "metrics.jsonl"):
        if "bench/wall_s" in line:
            cpu = None if cpu is None else cpu + line["bench/cpu_s"]
            wall += line["bench/wall_s"]
        elif "timing_s/step" in line:
            cpu, wall = None, wall + line["timing_s/step"]
        at_step[line["step"]] = (cpu, wall)
        if "eval/accuracy" in line:
            points.append(
                {
                    "step": line["step"],
                    "cpu_s": cpu,
                    "wall_s": wall,
                    "accuracy": line["eval/accuracy"],
                }
            )
    evaluated = {p["step"] for p in points}
    for step, accuracy in (more or {}).items():
        if step not in evaluated and step in at_step:
            cpu_s, wall_s = at_step[step]
            points.append({"step": step, "cpu_s": cpu_s, "wall_s": wall_s, "accuracy": accuracy})
    return sorted(points, key=lambda p: p["step"])


def first_reaching(points: list[dict], target: float, kind: str) -> float | None:
    """The seconds (``kind``: cpu or wall) of the first point at or above ``target``; None when
    no point reaches it, or the target is 0 (a teacher that scores 0 sets nothing to reach)."""
    if target <= 0:
        return None
    return next((p[f"{kind}_s"] for p in points if p["accuracy"] >= target), None)


def reached(points: list[dict], target: float, kind: str) -> str:
    """The table's cell: minutes to the target, "not reached", or "-" when the run reached it
    at a point whose ``kind`` seconds were not measured."""
    if target <= 0 or not any(p["accuracy"] >= target for p in points):
        return "not reached"
    return minutes(first_reaching(points, target, kind))


def sft_curve(run_dir: Path) -> list[dict[str, float]]:
    timeline = json.loads((run_dir / "timeline.json").read_text())
    return timeline["points"]


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def report(results: dict, kind: str) -> str:
    """The markdown tables: one line per run, then every point of the curves; and the issue's
    goal, the time on-policy distillation takes to 90% of the teacher against GRPO's."""
    teacher, target = results["teacher_accuracy"], results["target"]
    scale = results.get("budget_fraction", 1.0)
    share = "" if scale == 1.0 else f" ({scale:g} of what the GRPO run's steps took)"
    lines = [
        f"Teacher (the GRPO run's final evaluation): {teacher:.3f}; 90% of it: {target:.3f}"
        + (" (a teacher that scores 0 sets nothing to reach)" if target <= 0 else "")
        + f". Budget: {minutes(results['budget_s'])} {kind.upper()}-minutes of training "
        f"steps{share}.",
        "",
        "| run | held-out accuracy at the end | 90% of the teacher reached at (CPU-min) "
        "| (wall-min) | training CPU-min | training wall-min | process CPU-min (all) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, run in results["runs"].items():
        points = run["points"]
        end = points[-1] if points else {}
        lines.append(
            f"| {LABELS[method]} | {end.get('accuracy', float('nan')):.3f} "
            f"| {reached(points, target, 'cpu')} | {reached(points, target, 'wall')} "
            f"| {minutes(end.get('cpu_s'))} | {minutes(end.get('wall_s'))} "
            f"| {minutes(run.get('process_cpu_s'))} |"
        )
    lines += ["", goal(results, kind)]
    lines += [
        "",
        "| run | step | CPU-min | wall-min | held-out accuracy |",
        "|---|---|---|---|---|",
    ]
    for method, run in results["runs"].items():
        for p in run["points"]:
            lines.append(
                f"| {method} | {p['step']} | {minutes(p['cpu_s'])} | {minutes(p['wall_s'])} "
                f"| {p['accuracy']:.3f} |"
            )
    return "\n".join(lines)


def goal(results: dict, kind: str) -> str:
    """The issue's goal in one sentence: on-policy distillation reaches 90% of the teacher's
    accuracy in at most a third of the time GRPO alone needs (``kind`` minutes), or what it
    reached."""
    runs, target = results["runs"], results["target"]
    if "opd" not in runs or "grpo" not in runs or target <= 0:
        return (
            "Goal: not measured (it needs the GRPO and the on-policy distillation runs, and a "
            "teacher above 0)."
        )
    grpo = first_reaching(runs["grpo"]["points"], target, kind)
    opd = first_reaching(runs["opd"]["points"], target, kind)
    unit = f"{kind.upper()}-min"
    said = "Goal (90% of the teacher in a third of GRPO's time): "
    if grpo is None:
        return said + f"not measured: GRPO's time to 90% of the teacher is unknown in {unit}."
    grpo_said = f"GRPO alone reached it in {minutes(grpo)} {unit} (a third: {minutes(grpo / 3)})"
    if opd is None:
        best = max(runs["opd"]["points"], key=lambda p: p["accuracy"])
        return said + (
            f"not reached; {grpo_said}; on-policy distillation's best held-out accuracy was "
            f"{best['accuracy']:.3f} ({best['accuracy'] / results['teacher_accuracy']:.0%} of "
            f"the teacher's), at {minutes(best[f'{kind}_s'])} {unit}."
        )
    met = "met" if opd <= grpo / 3 else "not met"
    return said + (
        f"{met}; on-policy distillation reached it in {minutes(opd)} {unit}, {grpo_said}; "
        f"{opd / grpo:.2f} of GRPO's time."
    )


def plot(results: dict, kind: str, path: Path) -> None:
    """Held-out accuracy against the training minutes (``kind``), the teacher's and 90% of it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method, run in results["runs"].items():
        points = [p for p in run["points"] if p[f"{kind}_s"] is not None]
        x = [p[f"{kind}_s"] / 60 for p in points]
        axes.plot(x, [p["accuracy"] for p in points], marker="o", label=LABELS[method])
    axes.axhline(results["teacher_accuracy"], color="black", linewidth=1, label="teacher")
    axes.axhline(results["target"], color="gray", linestyle="--", linewidth=1, label="90% of it")
    axes.set_xlabel(f"training {'CPU' if kind == 'cpu' else 'wall-clock'} minutes")
    axes.set_ylabel("held-out accuracy (pass@1)")
    axes.set_title(f"{results['model']} student, its GRPO run as teacher")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
