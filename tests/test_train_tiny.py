"""End to end on the tiny random model: the loop trains, logs, checkpoints and resumes."""

import json

import pytest
import torch
from conftest import ROOT
from numerics import LOGP_TOLERANCE
from safetensors.torch import load_file

from rl.checkpoint import checkpoint_dirs, latest_checkpoint, load_trainer_state
from rl.config import load_config
from rl.models import resolve_model
from rl.run import train


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(overrides, steps=2):
    config = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, f"train.steps={steps}"])
    return train(config, progress=False)


def test_two_steps_change_the_parameters_and_write_the_run_folder(tiny_overrides, tmp_path):
    summary = run(tiny_overrides)
    run_dir = tmp_path / "run"
    assert summary.steps == 2 and summary.run_dir == run_dir
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(
            k in m
            for k in (
                "reward/mean",
                "reward/std",
                "frac_reward_zero_std",
                "entropy",
                "response_length/mean",
                "clip_ratio/low",
                "timing_s/step",
                "timing_s/gen",
                "perf/throughput",
                "perf/update_throughput",
                "sampling/logp_gap",
                "grad_norm",
            )
        )
        assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
        # engine and trainer agree on the sampled tokens, to float32 noise (tests/numerics.py)
        assert m["sampling/logp_gap"] < LOGP_TOLERANCE
        assert m["update_tokens"] > m["tokens"] > 0  # the update runs the prompts too
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and {"prompt", "completion", "rewards", "advantage", "step"} <= set(samples[0])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-1", "step-2"]

    before = load_file(resolve_model("tiny-random") / "model.safetensors")
    after = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"


def test_resume_continues_at_step_three_with_the_same_optimizer_state(tiny_overrides, tmp_path):
    run(tiny_overrides, steps=2)
    run_dir = tmp_path / "run"
    saved = torch.load(run_dir / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=False)

    summary = train(load_config(None, [f"resume={run_dir}", "train.steps=3"]), progress=False)
    assert summary.steps == 3
    metrics = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    assert metrics == [1, 2, 3]
    # The optimizer resumed from step 2's moments: step 3 counts on from 2 for every parameter.
    _, resumed = load_trainer_state(run_dir / "checkpoints" / "step-3")
    # (a fresh optimizer would be at step 1 after one more update)
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {2.0}
    assert {float(s["step"]) for s in resumed["optimizer"]["state"].values()} == {3.0}
    assert resumed["scheduler"]["last_epoch"] == saved["scheduler"]["last_epoch"] + 1


def test_a_half_written_checkpoint_is_ignored(tiny_overrides, tmp_path):
    run(tiny_overrides, steps=1)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".step-2.tmp").mkdir()  # what a kill during saving leaves
    assert latest_checkpoint(run_dir).name == "step-1"
    summary = train(load_config(None, [f"resume={run_dir}", "train.steps=2"]), progress=False)
    assert summary.steps == 2 and latest_checkpoint(run_dir).name == "step-2"


def test_lora_trains_only_the_adapter(tiny_overrides, tmp_path):
    summary = run([*tiny_overrides, "model.lora.enabled=true", "model.lora.r=4"], steps=1)
    checkpoint = latest_checkpoint(summary.run_dir)
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()


def test_a_broken_reward_scores_zero_and_the_run_goes_on(tiny_overrides, tmp_path):
    broken = (
        tiny_overrides[1]
        .replace("digit_count", "broken")
        .replace("rewards=[", "rewards=[{name: format_lenient}, ")
    )
    summary = run([tiny_overrides[0], broken], steps=1)
    metrics = [m for m in read_jsonl(summary.run_dir / "metrics.jsonl") if "loss" in m]
    name = next(k for k in metrics[0] if k.endswith(":broken/errors"))
    assert metrics[0][name] > 0


@pytest.mark.parametrize("bad", ["data.dataset=/no/such/file.jsonl", "model.name=/no/such/model"])
def test_bad_input_fails_before_writing_a_checkpoint(tiny_overrides, tmp_path, bad):
    from rl.errors import USER_ERRORS

    with pytest.raises(USER_ERRORS):
        run([*tiny_overrides, bad])
    assert not (tmp_path / "run" / "checkpoints").exists()
