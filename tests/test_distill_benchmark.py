"""rl/benchmarks/distill.py: the curves it reads from a run's metrics.jsonl, the budget, and a
--quick run of all four methods on the tiny model."""

from __future__ import annotations

import json

import pytest

from rl.benchmarks import distill


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
    points = distill.rl_curve(tmp_path)
    assert points == [
        {"step": 0, "cpu_s": 0.0, "wall_s": 0.0, "accuracy": 0.25},
        {"step": 2, "cpu_s": 90.0, "wall_s": 150.0, "accuracy": 0.5},
        {"step": 3, "cpu_s": 120.0, "wall_s": 180.0, "accuracy": 0.75},
    ]
    assert distill.first_reaching(points, 0.5, "cpu") == 90.0
    assert distill.first_reaching(points, 0.6, "wall") == 180.0
    assert distill.first_reaching(points, 0.9, "cpu") is None


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
