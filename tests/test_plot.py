"""aha plot: PNGs from metrics.jsonl files written by hand (no training), runs overlaid."""

import json
import subprocess

import pytest
from conftest import aha_command

from rl.plot import PANELS, load_metrics, panel_keys, plot_runs, series


def write_run(run_dir, reward_slope):
    run_dir.mkdir(parents=True)
    lines = [{"step": 0, "eval/accuracy": 0.1}]
    for step in range(1, 6):
        lines.append(
            {
                "step": step,
                "reward/mean": reward_slope * step,
                "reward/std": 0.1,
                "reward/math/mean": reward_slope * step,
                "reward/format/mean": 0.5,
                "reward/math/errors": 0.0,
                "response_length/mean": 40 + step,
                "response_length/max": 64,
                "response_length/clip_ratio": 0.25,
                "kl": 0.01 * step,
                "entropy": 1.0 - 0.1 * step,
                "clip_ratio/low": 0.0,
                "clip_ratio/high": 0.02,
                "timing_s/step": 2.0,
                "timing_s/gen": 1.5,
                "timing_s/update": 0.4,
                "moe/router_mismatch": 0.01,
                "moe/load_entropy/layer01": 0.9,
                "moe/expert_share/layer01/e00": 0.5,
                "moe/expert_share/layer01/e01": 0.5,
            }
        )
    lines.append({"step": 5, "eval/accuracy": 0.3})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def test_series_skips_other_lines_and_nan():
    records = [
        {"step": 1, "kl": 0.5},
        {"step": 2, "eval/accuracy": 1.0},
        {"step": 3, "kl": float("nan")},
    ]
    assert series(records, "kl") == ([1], [0.5])


def test_reward_per_function_takes_the_function_means_only():
    (panel,) = [p for p in PANELS if p.file == "reward_functions.png"]
    records = [
        {
            "step": 1,
            "reward/mean": 1,
            "reward/std": 0,
            "reward/math/mean": 1,
            "reward/math/errors": 0,
        }
    ]
    assert panel_keys(panel, records) == ["reward/math/mean"]


def test_every_panel_is_written_for_two_runs_overlaid(tmp_path):
    runs = [write_run(tmp_path / "a", 0.1), write_run(tmp_path / "b", 0.2)]
    written = plot_runs(runs, tmp_path / "out")
    assert {p.name for p in written} == {p.file for p in PANELS} | {"overview.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_panels_without_data_are_left_out_and_the_default_folder_is_the_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    assert [p.name for p in plot_runs([run])] == ["reward.png", "overview.png"]
    assert (run / "plots" / "reward.png").is_file()
    assert load_metrics(run) == [{"step": 1, "reward/mean": 0.5}]


def test_cli_plots_and_names_a_folder_without_metrics(tmp_path):
    run = write_run(tmp_path / "run", 0.1)
    done = subprocess.run([*aha_command(), "plot", str(run)], capture_output=True, text=True)
    assert done.returncode == 0 and "overview.png" in done.stdout
    bad = subprocess.run([*aha_command(), "plot", str(tmp_path)], capture_output=True, text=True)
    assert (
        bad.returncode == 2 and "no metrics.jsonl" in bad.stderr and "Traceback" not in bad.stderr
    )


@pytest.mark.parametrize("command", ["plot", "view"])
def test_help(command):
    done = subprocess.run([*aha_command(), command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "RUN_DIR" in done.stdout
