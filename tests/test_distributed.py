"""Two processes over gloo train exactly what one process trains.

The comparison is honest only on identical rollouts, so generation is replaced by a fixed
engine: each completion is a function of its group id and position in the group, whichever rank
asks. Everything after it is the real step (``train_step``): each rank scores its share of the
groups, advantages come from every rank's rewards, the loss uses the global token and sequence
counts, gradients are summed across ranks, and metrics are reduced. After two steps the loss,
the metrics and every parameter of the 2-process run equal the 1-process run's.

The same holds under FSDP2 (accelerate's ``fully_shard``, the model, gradients and optimizer state
split across the two ranks) and DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's engine reduces, clips
and steps), including a checkpoint written halfway and the run rebuilt from it
(``from_pretrained`` weights, the optimizer state re-sharded).

End-to-end ``accelerate launch`` runs on the CPU (slow; accelerate's ``--cpu`` flag starts several
processes only through mpirun), plain data parallel and with configs/accelerate/fsdp2.yaml,
deepspeed_zero2.yaml and deepspeed_zero3.yaml, check the launcher, that rank 0 alone writes the
run folder, and resume.
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
    "grpo_lora_kl": [  # the reference is the base with the adapters off
        "algorithm.loss_aggregation=seq_mean_token_mean",
        "model.lora.enabled=true",
        "algorithm.beta=0.05",
    ],
    "distill": [  # on-policy distillation: a teacher beside the rewards (see overrides)
        "algorithm.loss_aggregation=token_mean",
        "algorithm.teacher_coef=0.5",
    ],
}
COMPARED = ("loss", "grad_norm", "entropy", "reward/mean", "reward/std", "tokens", "clip_ratio/low")
COMPARED += ("distill/reverse_kl", "distill/teacher_logp")
# What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets for each process.
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}
# ... and `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml`.
DEEPSPEED_ENV = {
    stage: {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
    }
    for stage in (2, 3)
}
ENVS = {"ddp": None, "fsdp2": FSDP2_ENV, "zero2": DEEPSPEED_ENV[2], "zero3": DEEPSPEED_ENV[3]}


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

    def release_memory(self):
        pass

    def update_weights(self, named_tensors, version):
        self.policy_version = version

    def close(self):
        pass


def overrides(tmp_path, algorithm):
    teacher = []
    if algorithm == "distill":  # a frozen teacher that disagrees with the student
        from test_distill_on_policy import make_teacher

        teacher = [f"algorithm.teacher={make_teacher(tmp_path / 'teacher')}"]
    return [
        *teacher,
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]",
        "train.prompts_per_step=4",
        "rollout.group_size=4",
        "train.micro_batch_size=3",  # micro-batches that straddle groups
        "train.logps_chunk_tokens=5",
        *ALGORITHMS[algorithm],
    ]


def train_fixed(config_overrides, dist: Distributed, out_path=None, reload_after=None):
    """STEPS steps of ``train_step`` on the fixed engine; this rank's share of each batch. With
    ``reload_after`` (a step), the run is checkpointed there and rebuilt from the checkpoint, as
    a resume does."""
    from rl import setup
    from rl.distributed import shard
    from rl.trainer import train_step

    torch.set_num_threads(1)  # two processes on a small machine: no busy-waiting pile-up
    config = load_config(ROOT / "configs" / "tiny.yaml", config_overrides)
    parts = setup.build(config, None, dist)
    trainer = parts.trainer
    trainer.engine = FixedEngine(trainer.tokenizer)
    stream = batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed)
    metrics = []
    for _ in range(STEPS):
        if trainer.step == reload_after:
            trainer = checkpoint_and_rebuild(trainer, config, dist)
        metrics.append(train_step(trainer, shard(next(stream), dist)))
    result = {
        "metrics": metrics,
        "weights": {k: v.clone() for k, v in trainer.scheme.whole_weights(trainer.model)},
    }
    if trainer.engine_model is not None:  # FSDP2, ZeRO-3: the transformers engine's whole copy
        result["engine_weights"] = dict(trainer.engine_model.named_parameters())
    if out_path is not None and dist.is_main:
        torch.save(result, out_path)
    return result


def checkpoint_and_rebuild(trainer, config, dist: Distributed):
    """Save as a run does (``rl.run.save_step``: whole weights and optimizer state gathered to
    rank 0 under FSDP2 and DeepSpeed), then a fresh trainer from the checkpoint
    (``from_pretrained``) with its state."""
    from pathlib import Path

    from rl import setup
    from rl.checkpoint import load_trainer_state
    from rl.run import save_step

    run_dir = Path(config.run_dir)
    save_step(trainer, run_dir, dist, {}, keep=2)
    checkpoint = run_dir / "checkpoints" / f"step-{trainer.step}"
    state, payload = load_trainer_state(checkpoint)
    if dist.accelerator is not None:  # as in a new process: the accelerator forgets the old model
        dist.accelerator.free_memory()
    fresh = setup.build(config, checkpoint, dist).trainer
    fresh.scheme.load_optimizer_state(fresh.model, fresh.optimizer, payload["optimizer"])
    fresh.scheduler.load_state_dict(payload["scheduler"])
    fresh.step = state["step"]
    fresh.engine = FixedEngine(fresh.tokenizer)
    return fresh


def _worker(rank, world, port, config_overrides, out_path, env=None, reload_after=None):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **(env or {}),
    )
    from rl import distributed

    dist = distributed.init()
    assert dist.world_size == world and dist.rank == rank
    assert (dist.accelerator is not None) == bool(env)
    assert dist.zero_stage == int((env or {}).get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0))
    try:
        train_fixed(config_overrides, dist, out_path, reload_after)
    finally:
        distributed.close(dist)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "algorithm", "reload_after"),
    [
        ("ddp", "grpo", None),
        ("ddp", "dapo_batch_scaled_kl", None),
        ("fsdp2", "grpo", None),
        # the sharded reference model, and a checkpoint written and reloaded under FSDP2
        ("fsdp2", "dapo_batch_scaled_kl", 1),
        ("fsdp2", "grpo_lora_kl", 1),
        ("zero2", "grpo", None),
        ("zero3", "grpo", None),
        # a whole reference on each rank; a checkpoint written and reloaded under DeepSpeed
        ("zero2", "dapo_batch_scaled_kl", 1),
        ("zero3", "dapo_batch_scaled_kl", 1),
        ("zero2", "grpo_lora_kl", 1),
        # the teacher sharded as the reference (FSDP2), or whole on each rank (ZeRO-3)
        ("fsdp2", "distill", None),
        ("zero3", "distill", None),
    ],
)
def test_two_processes_train_exactly_what_one_process_trains(
    tmp_path, sharding, algorithm, reload_after
):
    config_overrides = overrides(tmp_path, algorithm)
    one = train_fixed(config_overrides, Distributed())
    out_path = tmp_path / "two.pt"
    env = ENVS[sharding]
    mp.spawn(
        _worker,
        args=(2, free_port(), config_overrides, out_path, env, reload_after),
        nprocs=2,
        join=True,
    )
    two = torch.load(out_path, weights_only=False)
    if sharding in ("fsdp2", "zero3"):  # the engine generates with what was trained
        assert two["engine_weights"].keys() == two["weights"].keys()
        for name, weight in two["weights"].items():
            assert torch.equal(two["engine_weights"][name], weight), name
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{reload_after}"
    if reload_after is not None and "lora" in algorithm:
        assert (checkpoint / "adapter_model.safetensors").is_file()
    elif reload_after is not None:  # an ordinary Hugging Face folder, whole tensors
        from transformers import AutoModelForCausalLM

        loaded = dict(AutoModelForCausalLM.from_pretrained(checkpoint).named_parameters())
        assert {n: p.shape for n, p in loaded.items()} == {
            n: p.shape for n, p in one["weights"].items()
        }
        payload = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        state = payload["optimizer"]["state"]  # keyed by name, whole tensors
        assert set(state) == set(loaded)
        assert all(value["exp_avg"].shape == loaded[name].shape for name, value in state.items())

    for step, (a, b) in enumerate(zip(one["metrics"], two["metrics"], strict=True)):
        for name in COMPARED:
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (step, name)
    assert one["metrics"][0]["loss"] != 0  # the rewards vary: there is something to learn
    assert "kl" not in one["metrics"][0] or two["metrics"][-1]["kl"] == pytest.approx(
        one["metrics"][-1]["kl"], rel=1e-4, abs=1e-7
    )
    # Adam divides by sqrt(v): on a coordinate whose gradient is nearly 0, the summation-order
    # noise of the two runs (1e-7 relative) shows up as a visible fraction of one lr step. (LoRA's
    # A matrices get a zero gradient in the first step, B being 0, and tiny ones after: a few
    # such coordinates in small tensors.)
    lr = 1e-3  # configs/tiny.yaml
    moved = total = 0
    for name, weight in one["weights"].items():
        diff = (two["weights"][name] - weight).abs()
        assert float(diff.max()) < 0.05 * lr, name
        moved, total = moved + int((diff > 1e-6).sum()), total + diff.numel()
    assert moved < 1e-3 * total


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
@pytest.mark.parametrize(
    "launch_options",
    [
        # torchrun underneath; without CUDA aha picks gloo on the CPU
        ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp2.yaml")],
        ["--config_file", str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")],
        ["--config_file", str(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml")],
    ],
    ids=["ddp", "fsdp2", "zero2", "zero3"],
)
def test_accelerate_launch_two_cpu_processes_then_resume(tmp_path, request, launch_options):
    run_dir = tmp_path / "run"
    expected = {
        "ddp": "data parallel",
        "fsdp2": "FSDP2",
        "zero2": "DeepSpeed ZeRO-2",
        "zero3": "DeepSpeed ZeRO-3",
    }[request.node.callspec.id]
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(*args):
        command = [
            launcher,
            "launch",
            *launch_options,
            "--num_processes",
            "2",
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
        assert f"Training on 2 processes: {expected}" in done.stdout  # rank 0 alone says it
        assert done.stdout.count("Training on 2 processes") == 1

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
    from transformers import AutoModelForCausalLM  # whole weights, whatever the sharding

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-3")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unsupported_accelerate_configs_are_refused_at_start_up(monkeypatch):
    """FSDP1, FSDP's own activation checkpointing, and DeepSpeed set-ups aha does not run: a
    clear error before any model loads (for DeepSpeed, before any process group starts)."""
    from rl import distributed, sharded
    from rl.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in ("0", "1"):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
        with pytest.raises(ConfigError, match=f"zero_stage {stage} is not supported"):
            distributed.init()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ConfigError, match="offload_optimizer to 'cpu' is not supported"):
        distributed.init()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be 1"):
        distributed.init()
    assert not torch.distributed.is_initialized()
    lora = load_config(ROOT / "configs" / "tiny.yaml", ["model.lora.enabled=true"])
    with pytest.raises(ConfigError, match="lora.enabled with DeepSpeed ZeRO-3 is not supported"):
        distributed.check_world(lora, Distributed(world_size=2, zero_stage=3))
    distributed.check_world(lora, Distributed(world_size=2, zero_stage=2))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1 is not supported"):
        sharded.fsdp2_accelerator(cpu=True)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        sharded.fsdp2_accelerator(cpu=True)


def test_optimizer_state_loads_across_formats():
    """A plain ``state_dict()`` (ids) and one keyed by name (written under FSDP2) load into a
    fresh optimizer alike, whichever way the model is held."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from rl.schemes import DataParallel
    from rl.sharded import FSDP2

    def trained():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model[0].bias.requires_grad_(False)  # a frozen parameter shifts the ids
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        model(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        return model, optimizer

    model, optimizer = trained()
    by_id = optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    assert set(by_name["state"]) == {"0.weight", "1.weight", "1.bias"}
    sharded = FSDP2(Distributed(accelerator=object()))  # names the ids, as under FSDP2
    for state, scheme in [(by_name, DataParallel()), (by_id, sharded), (by_name, sharded)]:
        fresh, fresh_optimizer = trained()
        fresh_optimizer.state.clear()  # as built: no state, no gradients
        fresh_optimizer.zero_grad(set_to_none=True)
        scheme.load_optimizer_state(fresh, fresh_optimizer, state)
        old_params, new_params = (o.param_groups[0]["params"] for o in (optimizer, fresh_optimizer))
        for p, q in zip(old_params, new_params, strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer.state[p][key], fresh_optimizer.state[q][key])


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_two_processes_each_with_a_colocated_vllm_engine(tmp_path, sharding):
    """The README's multi-GPU command with vLLM: one engine per rank, started through vLLM's
    torchrun launcher inside the trainer's process group; every rank's engine takes the synced
    weights (under FSDP2 gathered whole first), and vLLM's shutdown leaves the trainer's group
    for its last barrier."""
    pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env |= {"VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if sharding == "ddp":
        launch = [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2"]
        launch += ["--master_port", str(free_port())]
    else:
        launch = [os.path.join(bin_dir, "accelerate"), "launch", "--config_file"]
        launch += [str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2"]
        launch += ["--main_process_port", str(free_port())]
    command = [
        *launch,
        "-m",
        "rl.cli",
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        "rollout.engine=vllm",
        f"run_dir={run_dir}",
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert {"ddp": "data parallel", "fsdp2": "FSDP2"}[sharding] in done.stdout
    assert output.count("Using external launcher for distributed inference") == 2
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # step 2 samples from the weights step 1 pushed: the mean over both ranks' engines
    assert steps[1]["sampling/logp_gap"] < 1e-4
    assert (run_dir / "summary.json").is_file()  # written after the last barrier
