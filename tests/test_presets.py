"""Each algorithm preset (configs/{grpo,dr_grpo,dapo,gspo,cispo}.yaml) runs 2 steps on the tiny
random model, with small sizes, and its algorithm's machinery shows in the metrics."""

import json
from pathlib import Path

import pytest
import yaml

from rl.config import load_config
from rl.run import train

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["grpo", "dr_grpo", "dapo", "gspo", "cispo"]


def length_reward(completions, **_):
    """Varies within a group even on a random model, so no group is all-equal."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10 for c in completions]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_two_steps_on_the_tiny_model(preset, tmp_path):
    path = ROOT / "configs" / f"{preset}.yaml"
    splits = bool(yaml.safe_load(path.read_text())["train"]["mini_batch_size"])
    overrides = [
        "model.name=tiny-random",
        "rollout.engine=transformers",  # vLLM runs only in the vllm-marked pytest process
        f"run_dir={tmp_path}",
        "rollout.group_size=4",
        "rollout.max_tokens=4",
        "train.prompts_per_step=2",
        "train.micro_batch_size=4",
        f"train.mini_batch_size={4 if splits else 0}",  # the preset's split, at this size
        "train.steps=2",
        "train.save_every=0",
        "train.learning_rate=0.001",
        "data.eval_size=0",
        f"rewards=[{{name: '{Path(__file__).resolve()}:length_reward', weight: 1.0}}]",
    ]
    config = load_config(path, overrides)
    summary = train(config, progress=False)
    assert summary.steps == 2
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 2
    for metrics in steps:
        for key in ("loss", "grad_norm", "entropy", "clip_ratio/low", "clip_ratio/high"):
            assert metrics[key] == metrics[key], key  # present and not NaN
        assert metrics["optimizer_steps"] == (2 if splits else 1)
        # old log-probs are computed only when the update is not exactly on-policy
        assert ("timing_s/old_logp" in metrics) == splits
        assert ("kl" in metrics) == (config.algorithm.beta > 0)
        if config.algorithm.dynamic_sampling:
            assert metrics["sampling/rounds"] >= 1 and "sampling/frac_groups_dropped" in metrics


def test_learning_benchmark_help():
    from rl.benchmarks import learning

    with pytest.raises(SystemExit) as exit_info:
        learning.main(["--help"])
    assert exit_info.value.code == 0
