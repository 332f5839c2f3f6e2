"""A non-finite loss or gradient norm never reaches the optimizer: the step is skipped (weights,
AdamW's moments and step count unchanged, gradients dropped), counted in the metrics, said in
the log, and ``train.max_nonfinite_steps`` such steps in a row stop the run with one line,
before any checkpoint of that step. (Two processes, where one rank alone goes non-finite:
tests/test_distributed.py.)"""

import json
import math
import os

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from rl import algorithms
from rl.checkpoint import checkpoint_dirs, load_trainer_state
from rl.config import load_config

real_objective = algorithms.objective


def nan_loss(loss: torch.Tensor) -> torch.Tensor:
    return loss * math.nan


def inf_loss(loss: torch.Tensor) -> torch.Tensor:
    return loss + math.inf


def nan_gradient(loss: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """A finite loss whose gradient is NaN: d sqrt(|x|)/dx at x = 0 is inf * 0."""
    return loss + torch.sqrt((logps - logps.detach()).abs().sum())


def poisoned_objective(poison, from_call: int = 1):
    """``algorithms.objective`` with ``poison`` applied to the loss from the ``from_call``-th call
    on (one call per micro-batch)."""
    calls = {"n": 0}

    def objective(logps, *args, **kwargs):
        loss, stats = real_objective(logps, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] < from_call:
            return loss, stats
        if poison is nan_gradient:
            return nan_gradient(loss, logps), stats
        return poison(loss), stats

    return objective


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("poison", [nan_loss, inf_loss, nan_gradient])
def test_a_nonfinite_step_changes_nothing(tiny_overrides, monkeypatch, capsys, poison):
    from rl import setup
    from rl.data import batches
    from rl.trainer import train_step

    config = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    parts = setup.build(config)
    trainer = parts.trainer
    stream = batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed)
    good = train_step(trainer, next(stream))  # AdamW has moments to lose
    assert good["optimizer_steps_skipped"] == 0 and trainer.nonfinite_in_a_row == 0
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {
        id(p): {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
        for p in trainer.model.parameters()
    }

    monkeypatch.setattr(algorithms, "objective", poisoned_objective(poison))
    metrics = train_step(trainer, next(stream))

    assert metrics["optimizer_steps_skipped"] == 1 and trainer.nonfinite_in_a_row == 1
    assert not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"])
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert p.grad is None  # dropped, not carried into the next step
        for key, value in trainer.optimizer.state[p].items():  # step count included
            assert torch.equal(value, moments[id(p)][key]), (name, key)
    assert "warning: step 2: optimizer step skipped" in capsys.readouterr().err

    monkeypatch.setattr(algorithms, "objective", real_objective)
    after = train_step(trainer, next(stream))  # a good step again: it applies, the count resets
    assert after["optimizer_steps_skipped"] == 0 and trainer.nonfinite_in_a_row == 0
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())


def test_steps_in_a_row_stop_the_run_with_its_last_good_checkpoint(
    tiny_overrides, tmp_path, monkeypatch, capsys
):
    """Steps 1 and 2 train; from step 3 the loss is NaN. Steps 3 and 4 are skipped and logged,
    and the second in a row stops the run before step 4 is checkpointed. The last checkpoint
    (step 3, written after its skipped step) holds step 2's weights and optimizer, and a resume
    loads it."""
    from rl.run import train
    from rl.trainer import NonFiniteUpdateError

    overrides = [
        *tiny_overrides,
        "train.steps=6",
        "train.max_nonfinite_steps=2",
        "train.keep_checkpoints=5",
        "data.eval_size=0",
    ]
    config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    # tiny.yaml: 8 sequences per step, micro-batches of 4: two objective calls a step
    monkeypatch.setattr(algorithms, "objective", poisoned_objective(nan_loss, from_call=5))
    with pytest.raises(NonFiniteUpdateError) as stopped:
        train(config, progress=False)
    run_dir = tmp_path / "run"
    message = str(stopped.value)
    assert message.startswith("train.max_nonfinite_steps: 2 optimizer steps in a row up to step 4")
    assert str(run_dir / "checkpoints" / "step-3") in message
    err = capsys.readouterr().err
    assert (
        "warning: step 3: optimizer step skipped" in err
        and "(1 in a row, the run stops at 2)" in err
    )
    assert "warning: step 4: optimizer step skipped" in err

    steps = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["optimizer_steps_skipped"] for m in steps] == [0, 0, 1, 1]
    assert all(math.isnan(m["loss"]) for m in steps[2:])
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-1", "step-2", "step-3"]

    two, three = (run_dir / "checkpoints" / f"step-{n}" for n in (2, 3))
    weights_two, weights_three = (load_file(c / "model.safetensors") for c in (two, three))
    for name, tensor in weights_three.items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, weights_two[name]), name
    _, payload_two = load_trainer_state(two)
    state_three, payload_three = load_trainer_state(three)
    assert state_three["step"] == 3
    for key, entry in payload_three["optimizer"]["state"].items():
        assert float(entry["step"]) == 2.0  # AdamW counted the two applied steps only
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(entry[name], payload_two["optimizer"]["state"][key][name])
    # the schedule follows the training steps, skipped or not
    assert payload_three["scheduler"]["last_epoch"] == 3

    monkeypatch.setattr(algorithms, "objective", real_objective)
    summary = train(load_config(None, [f"resume={run_dir}", "train.steps=4"]), progress=False)
    assert summary.steps == 4
    resumed = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["optimizer_steps_skipped"] == 0 and math.isfinite(resumed[-1]["loss"])


def test_the_cli_says_one_line_and_fails(tiny_overrides, tmp_path, monkeypatch, capsys):
    from rl.cli import main

    monkeypatch.setattr(algorithms, "objective", poisoned_objective(nan_loss))
    code = main(
        [
            "train",
            str(ROOT / "configs" / "tiny.yaml"),
            *tiny_overrides,
            "train.max_nonfinite_steps=1",
            "--no-progress",
        ]
    )
    assert code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aha:")]
    assert len(errors) == 1 and errors[0].startswith("aha: error: train.max_nonfinite_steps: 1 ")
    assert "no checkpoint was written" in errors[0]
    assert not checkpoint_dirs(tmp_path / "run")


def test_zero_never_stops(tiny_overrides, monkeypatch):
    from rl.run import train

    monkeypatch.setattr(algorithms, "objective", poisoned_objective(nan_loss))
    overrides = [*tiny_overrides, "train.max_nonfinite_steps=0", "train.steps=3"]
    summary = train(load_config(ROOT / "configs" / "tiny.yaml", overrides), progress=False)
    assert summary.steps == 3
    steps = [m for m in read_jsonl(summary.run_dir / "metrics.jsonl") if "loss" in m]
    assert [m["optimizer_steps_skipped"] for m in steps] == [1, 1, 1]


def test_a_negative_limit_is_refused():
    from rl.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_nonfinite_steps: must be 0"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.max_nonfinite_steps=-1"])


# ------------------------------------------------------------------ two processes, one poisoned


def _one_rank_poisoned_worker(rank, world, port, config_overrides, out_path, env):
    """Step 1 trains; in step 2 rank 1's loss is NaN, in step 3 its gradient is (a finite loss);
    step 4 trains again. Every rank must skip steps 2 and 3, whatever its own loss."""
    from test_distributed import FixedEngine

    from rl import distributed, setup
    from rl.data import batches
    from rl.distributed import shard
    from rl.trainer import train_step

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **(env or {}),
    )
    torch.set_num_threads(1)
    dist = distributed.init()
    poison = {"now": None}

    def objective(logps, *args, **kwargs):
        loss, stats = real_objective(logps, *args, **kwargs)
        if rank == 1 and poison["now"] is not None:
            loss = nan_gradient(loss, logps) if poison["now"] is nan_gradient else nan_loss(loss)
        return loss, stats

    algorithms.objective = objective
    try:
        config = load_config(ROOT / "configs" / "tiny.yaml", config_overrides)
        parts = setup.build(config, None, dist)
        trainer = parts.trainer
        trainer.engine = FixedEngine(trainer.tokenizer)
        stream = batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed)

        def whole():
            return {n: t.clone() for n, t in trainer.scheme.whole_weights(trainer.model)}

        record = {"skipped": [], "in_a_row": [], "unchanged": []}
        for now in (None, nan_loss, nan_gradient, None):
            before = whole()
            poison["now"] = now
            metrics = train_step(trainer, shard(next(stream), dist))
            after = whole()
            record["skipped"].append(metrics["optimizer_steps_skipped"])
            record["in_a_row"].append(trainer.nonfinite_in_a_row)
            record["unchanged"].append(all(torch.equal(after[n], t) for n, t in before.items()))
            record.setdefault("finite", []).append(
                all(torch.isfinite(t).all() for t in after.values())
            )
        torch.save(record, f"{out_path}.{rank}")
    finally:
        distributed.close(dist)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2", "zero2", "zero3"])
def test_one_rank_nonfinite_skips_the_step_on_every_rank(tmp_path, sharding):
    import torch.multiprocessing as mp
    from test_distributed import ENVS, free_port, overrides

    out = tmp_path / "record"
    mp.spawn(
        _one_rank_poisoned_worker,
        args=(2, free_port(), overrides(tmp_path, "grpo"), out, ENVS[sharding]),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        record = torch.load(f"{out}.{rank}")
        assert record["skipped"] == [0, 1, 1, 0], rank
        assert record["in_a_row"] == [0, 1, 2, 0], rank
        assert record["unchanged"] == [False, True, True, False], rank
        assert all(record["finite"]), rank
