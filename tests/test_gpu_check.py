"""The GPU check's own logic on the CPU: its table, pytest's summary line, the Qwen2.5-0.5B
shape, and one stage end to end on the tiny model (the figures come from the run's files)."""

import sys

import pytest
from conftest import FIXTURES, ROOT

from rl.benchmarks import gpu_check


def test_pytest_counts_reads_the_summary_line(tmp_path):
    log = tmp_path / "log"
    log.write_text("....s\n=========== 4 passed, 1 skipped in 12.3s ===========\n")
    assert gpu_check.pytest_counts(log) == "4 passed, 1 skipped in 12.3s"
    log.write_text("Traceback\nImportError: no module\n")
    assert gpu_check.pytest_counts(log) == "ImportError: no module"


def test_table_has_a_row_per_stage_with_its_figures():
    stages = [
        gpu_check.Stage("main_job", "passed", 61.2, {"perf/mfu": 0.1234, "timing_s/step": 2.5}),
        gpu_check.Stage("cuda_tests", "failed", 30, {"pytest -m 'not vllm'": "1 failed"}, "x"),
    ]
    lines = gpu_check.table(stages).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| stage | status | seconds |")
    assert "| main_job | passed | 61 | 2.50 |" in lines[2] and "| 0.123 |" in lines[2]
    assert lines[3].endswith("pytest -m 'not vllm': 1 failed; x |")


def test_the_qwen_shape_is_qwen25_05b():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(Qwen2Config(**gpu_check.QWEN25_05B))
    unique = {id(p): p.numel() for p in model.parameters()}  # the tied embedding once
    assert sum(unique.values()) == 494_032_768  # Qwen2.5-0.5B's published parameter count


@pytest.mark.slow
def test_a_training_stage_reads_its_figures_from_the_run(tmp_path, monkeypatch):
    reward = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"
    stage = gpu_check.train_stage(
        "tiny", tmp_path, [str(ROOT / "configs" / "tiny.yaml"), reward], timeout_s=600
    )
    assert stage.status == "passed", (tmp_path / "tiny.log").read_text()[-2000:]
    assert stage.figures["steps"] == 1 and stage.figures["perf/throughput"] > 0
    assert 0 <= stage.figures["held-out pass@1 after"] <= 1
    assert "engine transformers" in stage.note and "bf16 autocast False" in stage.note


def test_help_runs():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "rl.benchmarks.gpu_check", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--only" in done.stdout
