"""Two processes over gloo train exactly what one process trains.

The comparison is honest only on identical rollouts, so generation is replaced by a fixed
engine: each completion is a function of its group id and position in the group, whichever rank
asks. Everything after it is the real step (``train_step``): each rank scores its share of the
groups, advantages come from every rank's rewards, the loss uses the global token and sequence
counts, gradients are summed across ranks, and metrics are reduced. After two steps the loss,
the metrics and every parameter of the 2-process run equal the 1-process run's.

An end-to-end ``accelerate launch --multi_gpu --num_processes 2`` run on the CPU (slow;
accelerate's ``--cpu`` flag starts several processes only through mpirun) checks the launcher,
that rank 0 alone writes the run folder, and resume.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FIXTURES, ROOT

from rl.config import load_config
from rl.data import batches
from rl.distributed import Distributed, reduce_metrics
from rollouts.record import Rollout

STEPS = 2
ALGORITHMS = {
    "grpo": ["algorithm.loss_aggregation=seq_mean_token_mean"],
    "dapo_batch_scaled_kl": [
        "algorithm.loss_aggregation=token_mean",
        "algorithm.scale_rewards=batch",
        "algorithm.beta=0.05",
    ],
}
COMPARED = ("loss", "grad_norm", "entropy", "reward/mean", "reward/std", "tokens", "clip_ratio/low")


class FixedEngine:
    """Completions that depend only on (group, position in group): the same on any rank."""

    def __init__(self, tokenizer):
        self.tokenizer, self.policy_version = tokenizer, 0

    def generate(self, prompts, n, sampling):
        out = []
        for prompt in prompts:
            for j in range(n):
                digits = " ".join(str(d) for d in range((prompt.index * 3 + j * 5) % 7))
                ids = self.tokenizer.encode(
                    f"<think> {digits} </think> answer", add_special_tokens=False
                )
                ids = ids[: sampling.max_tokens - 1] + [self.tokenizer.eos_token_id]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(Rollout(prompt, ids, text, None, "stop", self.policy_version))
        return out

    def update_weights(self, named_tensors, version):
        self.policy_version = version

    def close(self):
        pass


def overrides(tmp_path, algorithm):
    return [
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]",
        "train.prompts_per_step=4",
        "rollout.group_size=4",
        "train.micro_batch_size=3",  # micro-batches that straddle groups
        "train.logps_chunk_tokens=5",
        *ALGORITHMS[algorithm],
    ]


def train_fixed(config_overrides, dist: Distributed, out_path=None):
    """STEPS steps of ``train_step`` on the fixed engine; this rank's share of each batch."""
    from rl import setup
    from rl.distributed import shard
    from rl.trainer import train_step

    torch.set_num_threads(1)  # two processes on a small machine: no busy-waiting pile-up
    config = load_config(ROOT / "configs" / "tiny.yaml", config_overrides)
    parts = setup.build(config, None, dist)
    trainer = parts.trainer
    trainer.engine = FixedEngine(trainer.tokenizer)
    stream = batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed)
    metrics = [train_step(trainer, shard(next(stream), dist)) for _ in range(STEPS)]
    result = {
        "metrics": metrics,
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
    }
    if out_path is not None and dist.is_main:
        torch.save(result, out_path)
    return result


def _worker(rank, world, port, config_overrides, out_path):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from rl import distributed

    dist = distributed.init()
    assert dist.world_size == world and dist.rank == rank
    try:
        train_fixed(config_overrides, dist, out_path)
    finally:
        distributed.close(dist)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_two_processes_train_exactly_what_one_process_trains(tmp_path, algorithm):
    config_overrides = overrides(tmp_path, algorithm)
    one = train_fixed(config_overrides, Distributed())
    out_path = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, free_port(), config_overrides, out_path), nprocs=2, join=True)
    two = torch.load(out_path, weights_only=False)

    for step, (a, b) in enumerate(zip(one["metrics"], two["metrics"], strict=True)):
        for name in COMPARED:
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (step, name)
    assert one["metrics"][0]["loss"] != 0  # the rewards vary: there is something to learn
    assert "kl" not in one["metrics"][0] or two["metrics"][-1]["kl"] == pytest.approx(
        one["metrics"][-1]["kl"], rel=1e-4, abs=1e-7
    )
    # Adam divides by sqrt(v): on a coordinate whose gradient is nearly 0, the summation-order
    # noise of the two runs (1e-7 relative) shows up as a visible fraction of one lr step.
    lr = 1e-3  # configs/tiny.yaml
    for name, weight in one["weights"].items():
        diff = (two["weights"][name] - weight).abs()
        assert float(diff.max()) < 0.05 * lr, name
        assert float((diff > 1e-6).float().mean()) < 1e-3, name


def test_one_process_has_no_distributed_calls(monkeypatch):
    """World size 1: the helpers return at once and never touch torch.distributed."""
    from rl import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("called"))
    dist = distributed.init()
    assert not dist.enabled and dist.is_main
    assert reduce_metrics(dist, {"loss": 1.5}, summed=["loss"]) == {"loss": 1.5}
    assert distributed.shard([1, 2, 3], dist) == [1, 2, 3]
    assert distributed.all_sum(dist, 2.0) == 2.0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
    reason="accelerate's launcher is not installed",
)
def test_accelerate_launch_two_cpu_processes_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(*args):
        command = [
            launcher,
            "launch",
            "--multi_gpu",  # torchrun underneath; without CUDA aha picks gloo on the CPU
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "rl.cli",
            "train",
            *args,
            "--no-progress",
        ]
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reward = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"
    launch(str(ROOT / "configs" / "tiny.yaml"), f"run_dir={run_dir}", reward, "train.steps=2")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]  # one line per step: rank 0 alone writes
    assert steps[0]["tokens"] > 0 and steps[0]["perf/throughput"] > 0
    state = torch.load(run_dir / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == 2

    launch(str(ROOT / "configs" / "tiny.yaml"), f"resume={run_dir}", "train.steps=3")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step-3" / "model.safetensors").is_file()
