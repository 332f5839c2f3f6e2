"""rl/benchmarks/distill.py: the curves it reads from a run's metrics.jsonl, the budget, and a
--quick run of all four methods on the tiny model."""

from __future__ import annotations

import json

import pytest

from rl.benchmarks import distill, distill_report


def test_an_rl_curve_counts_the_measured_steps_before_each_evaluation(tmp_path):
    lines = [
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 1, "loss": 0.1, "bench/cpu_s": 60.0, "bench/wall_s": 90.0},
        {"step": 2, "loss": 0.1, "bench/cpu_s": 30.0, "bench/wall_s": 60.0},
        {"step": 2, "eval/accuracy": 0.5},
        {"step": 3, "loss": 0.1, "bench/cpu_s": 30.0, "bench/wall_s": 30.0},
        {"step": 3, "eval/accuracy": 0.75},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    points = distill_report.rl_curve(tmp_path)
    assert points == [
        {"step": 0, "cpu_s": 0.0, "wall_s": 0.0, "accuracy": 0.25},
        {"step": 2, "cpu_s": 90.0, "wall_s": 150.0, "accuracy": 0.5},
        {"step": 3, "cpu_s": 120.0, "wall_s": 180.0, "accuracy": 0.75},
    ]
    assert distill_report.first_reaching(points, 0.5, "cpu") == 90.0
    assert distill_report.first_reaching(points, 0.6, "wall") == 180.0
    assert distill_report.first_reaching(points, 0.9, "cpu") is None


def test_a_run_aha_train_made_has_wall_seconds_only_and_later_checkpoints_join_its_curve(tmp_path):
    # the main job's metrics: no bench/* (this benchmark did not train it), timing_s/step per step
    lines = [
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 1, "loss": 0.1, "timing_s/step": 40.0},
        {"step": 2, "loss": 0.1, "timing_s/step": 20.0},
        {"step": 3, "loss": 0.1, "timing_s/step": 60.0},
        {"step": 3, "eval/accuracy": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    checkpoints = {2: 0.375, 3: 0.0}  # step 3 was evaluated by the run: its own figure stands
    assert distill_report.rl_curve(tmp_path, checkpoints) == [
        {"step": 0, "cpu_s": 0.0, "wall_s": 0.0, "accuracy": 0.25},
        {"step": 2, "cpu_s": None, "wall_s": 60.0, "accuracy": 0.375},
        {"step": 3, "cpu_s": None, "wall_s": 120.0, "accuracy": 0.5},
    ]


def _results(teacher: float, opd: list[tuple[float, float]]) -> dict:
    """Two runs: GRPO reaching ``teacher`` at 60 wall-min, and opd's (wall-min, accuracy)."""
    grpo = [(0.0, 0.1), (30.0, 0.2), (60.0, teacher)]
    as_points = lambda xs: [  # noqa: E731
        {"step": i, "cpu_s": None, "wall_s": m * 60, "accuracy": a} for i, (m, a) in enumerate(xs)
    ]
    return {
        "teacher_accuracy": teacher,
        "target": 0.9 * teacher,
        "budget_s": 1200.0,
        "budget_fraction": 1 / 3,
        "runs": {"grpo": {"points": as_points(grpo)}, "opd": {"points": as_points(opd)}},
    }


@pytest.mark.parametrize(
    ("teacher", "opd", "opd_cells", "goal"),
    [
        # the teacher's 0.5: 90% is 0.45; opd reaches it at 15 wall-min, a quarter of GRPO's 60
        (
            0.5,
            [(0.0, 0.1), (15.0, 0.46)],
            "| - | 15.0 |",  # reached, at a point whose CPU time was not measured
            "met; on-policy distillation reached it in 15.0 WALL-min, GRPO alone reached it in "
            "60.0 WALL-min (a third: 20.0); 0.25 of GRPO's time.",
        ),
        (0.5, [(0.0, 0.1), (30.0, 0.5)], "| - | 30.0 |", "not met;"),
        # never reaching 90%: not 0.0 minutes, and what it reached
        (
            0.5,
            [(0.0, 0.1), (20.0, 0.3)],
            "| not reached | not reached |",
            "not reached; GRPO alone reached it in 60.0 WALL-min (a third: 20.0); on-policy "
            "distillation's best held-out accuracy was 0.300 (60% of the teacher's), at 20.0 "
            "WALL-min.",
        ),
        # a teacher that scores 0 sets no target: nobody "reaches" it at 0.0 minutes
        (0.0, [(0.0, 0.0), (20.0, 0.0)], "| not reached | not reached |", "not measured"),
    ],
)
def test_the_table_says_not_reached_rather_than_zero_minutes(teacher, opd, opd_cells, goal):
    table = distill_report.report(_results(teacher, opd), "wall")
    lines = table.splitlines()
    row = next(line for line in lines if line.startswith("| on-policy distillation |"))
    assert opd_cells in row
    assert goal in table
    grpo = next(line for line in lines if line.startswith("| GRPO alone"))
    assert ("| not reached | not reached |" in grpo) == (teacher == 0.0)
    assert row.split("|")[4].strip() != "0.0"  # the wall-minutes to 90% of the teacher


def test_a_budget_is_spent_in_the_kind_it_counts():
    budget = distill.Budget("cpu", 10.0)
    budget.add(6.0, 100.0)
    assert not budget.spent  # 100 wall seconds do not count against a CPU budget
    budget.add(4.0, 1.0)
    assert budget.spent
    assert distill.Budget("wall", None).spent is False  # no limit
    with distill.Budget("wall", 0.0).measure() as _:
        pass


@pytest.mark.slow
def test_quick_runs_every_method_and_writes_the_table_and_the_plot(tmp_path):
    results = distill.main(["--quick", "--run-root", str(tmp_path)])
    assert set(results["runs"]) == set(distill.METHODS)
    for method, run in results["runs"].items():
        assert run["points"] and run["points"][0]["cpu_s"] == 0.0, method
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in run["points"])
        if method != "grpo":
            assert run["process_cpu_s"] > 0 and run["points"][-1]["cpu_s"] > 0
    opd = [
        json.loads(line) for line in (tmp_path / "opd" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("distill/reverse_kl" in line for line in opd)
    table = (tmp_path / "distill.md").read_text()
    assert "on-policy distillation + rule reward" in table and "| sft |" in table
    assert (tmp_path / "distill.png").stat().st_size > 0
