"""`aha distill generate` with a colocated vLLM teacher: a run folder's model at its checkpoint,
sampled by vLLM. Run in its own pytest process: ``pytest -m vllm`` (vLLM changes the process)."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, ROOT

from rl.config import load_config
from rl.distill.generate import generate
from rl.distill.traces import read_dataset
from rl.run import train

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TINY = ROOT / "configs" / "tiny.yaml"
DIGITS = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"


def test_a_run_folder_teacher_on_colocated_vllm(tmp_path):
    run = tmp_path / "teacher"
    train(load_config(TINY, [f"run_dir={run}", DIGITS, "train.steps=1"]), progress=False)
    config = load_config(
        TINY,
        [
            DIGITS,
            "rollout.engine=vllm",
            "rollout.kv_cache_gb=1",
            "distill.max_prompts=3",
            "distill.samples=2",
            "distill.keep_truncated=true",
        ],
    )
    summary = generate(config, str(run), tmp_path / "traces", progress=False)
    assert summary["teacher_checkpoint"] == str(run / "checkpoints" / "step-1")
    assert summary["traces"] == 6
    rows = read_dataset(tmp_path / "traces").to_list()
    assert len(rows) == summary["kept"] > 0 and all(row["reward"] >= 1 for row in rows)
    assert json.loads((tmp_path / "traces" / "summary.json").read_text())["kept"] == len(rows)
