"""The schemes the ranks share the model by (rl/schemes.py), what the step asks of them, the
streamed weight sync, and the update's metrics read once per optimizer step."""

import itertools
import math
import os
import random
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT

from rl.config import load_config
from rl.distributed import Distributed, describe
from rl.metrics import Metrics
from rl.schemes import DataParallel, choose
from rl.sharded import FSDP2, reduce_in_float32
from rl.trainer import sync_engine
from rl.zero import DeepSpeedZeRO

# ------------------------------------------------------------------ choosing


@pytest.mark.parametrize(
    ("dist", "kind", "name", "partitioned", "chunk_tokens"),
    [
        (Distributed(), DataParallel, "data parallel", False, 5),
        (Distributed(world_size=2), DataParallel, "data parallel", False, 5),
        (Distributed(world_size=2, accelerator=object()), FSDP2, "FSDP2", True, 5),
        (Distributed(world_size=2, zero_stage=2), DeepSpeedZeRO, "DeepSpeed ZeRO-2", False, 5),
        # ZeRO-3 gathers the output layer at each call: all logits at once
        (Distributed(world_size=2, zero_stage=3), DeepSpeedZeRO, "DeepSpeed ZeRO-3", True, 0),
    ],
)
def test_one_scheme_per_set_up(dist, kind, name, partitioned, chunk_tokens):
    scheme = choose(dist)
    assert type(scheme) is kind and scheme.name == name == describe(dist)
    assert scheme.partitioned_weights is partitioned
    assert scheme.logps_chunk_tokens(5) == chunk_tokens


class Recording(DataParallel):
    """One process's scheme, recording what the step asks of it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def zero_grad(self, optimizer):
        self.calls.append("zero_grad")
        super().zero_grad(optimizer)

    def before_forward(self):
        self.calls.append("before_forward")

    def backward(self, loss, last, discard):
        self.calls.append(("backward", last, discard))
        super().backward(loss, last, discard)

    def clip_and_step(self, optimizer, parameters, max_norm, discard):
        self.calls.append(("clip_and_step", discard))
        update = super().clip_and_step(optimizer, parameters, max_norm, discard)
        self.calls.append(("applied", update.applied))
        return update


def test_the_step_asks_its_scheme(tiny_overrides):
    """An optimizer step of two micro-batches (tiny.yaml: 8 sequences, 4 per micro-batch), in
    the scheme's words; the gradients are gone once it has stepped."""
    from rl import setup
    from rl.batch import collate
    from rl.data import batches
    from rl.trainer import assign_advantages, collect_rollouts, policy_update

    config = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    parts = setup.build(config)
    trainer = parts.trainer
    trainer.scheme = Recording()
    prompts = next(batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed))
    rollouts, _, _ = collect_rollouts(trainer, prompts, None, {})
    assign_advantages(rollouts, config.rollout.group_size, config.algorithm)
    policy_update(trainer, collate(rollouts, trainer.tokenizer.pad_token_id))
    assert trainer.scheme.calls == [
        "zero_grad",
        "before_forward",
        ("backward", False, False),
        "before_forward",
        ("backward", True, False),
        ("clip_and_step", False),
        ("applied", True),
    ]
    assert all(p.grad is None for p in trainer.model.parameters())


# ------------------------------------------------------------------ FSDP2's gradient sum


def test_fsdp2_mixed_precision_reduces_in_float32():
    """accelerate's plugin, as ``mixed_precision: bf16`` sets it, computes in bf16 and sums the
    ranks' gradients in bf16; aha keeps the bf16 compute and sums in float32."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's choice
    policy = reduce_in_float32(plugin.mixed_precision_policy)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert reduce_in_float32(None) is None  # no mixed precision: float32 throughout
    assert reduce_in_float32(policy) is policy


def test_fsdp2_prepare_sets_the_policy_before_sharding():
    """On CPUs accelerate refuses FSDP's mixed precision, so the set-up is stubbed: the policy
    accelerate shards with is the float32-reducing one."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    seen = []

    class Accelerator:
        state = SimpleNamespace(fsdp_plugin=plugin)

        def prepare(self, model, optimizer):
            seen.append(self.state.fsdp_plugin.mixed_precision_policy)
            return model, optimizer

    model = torch.nn.Linear(2, 2)
    FSDP2(Distributed(world_size=2, accelerator=Accelerator())).prepare(
        model, torch.optim.AdamW(model.parameters())
    )
    assert seen[0].param_dtype == torch.bfloat16 and seen[0].reduce_dtype == torch.float32


def _sum_worker(rank, port, reduce_dtype, out):
    """grad = x on each rank: rank 0's 1, rank 1's 3 * 2^-10, summed by fully_shard's
    reduce-scatter as aha sets it up (a plain sum)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(1, 2, bias=False)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        fully_shard(model, mp_policy=policy)
        model.set_gradient_divide_factor(1.0)
        model.set_force_sum_reduction_for_comms(True)
        x = torch.tensor([[1.0 if rank == 0 else 3 * 2**-10]])
        model(x).sum().backward()
        grad = model.weight.grad.full_tensor()
        if rank == 0:
            torch.save(grad, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    ("reduce_dtype", "expected"),
    [
        # 1 + 3 * 2^-10 needs 11 significant bits; bf16 has 8 (spacing 2^-7 at 1): it is 1
        (torch.bfloat16, 1.0),
        (torch.float32, 1 + 3 * 2**-10),  # exact: what aha's policy gives
    ],
)
def test_fsdp2_sums_in_the_reduce_dtype(tmp_path, reduce_dtype, expected):
    out = tmp_path / "grad.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sum_worker, args=(port, reduce_dtype, out), nprocs=2, join=True)
    assert torch.load(out).flatten().tolist() == [expected, expected]


# ------------------------------------------------------------------ streamed weight sync


def counted(items):
    """``items`` as a stream that counts how many were drawn."""
    box = {"drawn": 0}

    def stream():
        for item in items:
            box["drawn"] += 1
            yield item

    return stream(), box


class PartialEngine:
    def __init__(self, take: int):
        self.take, self.taken, self.policy_version = take, [], 0

    def update_weights(self, named_tensors, version):
        self.taken = [name for name, _ in itertools.islice(named_tensors, self.take)]
        self.policy_version = version


class StreamScheme(DataParallel):
    """Whole weights as a counted stream (under FSDP2 each one a gather every rank joins)."""

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.box = None

    def whole_weights(self, model, trainable_only=False):
        stream, self.box = counted([(n, torch.zeros(1)) for n in self.names])
        return stream


@pytest.mark.parametrize("take", [0, 1, 3])
def test_sync_draws_every_tensor_whatever_the_engine_takes(take):
    names = ["a", "b", "c"]
    engine, scheme = PartialEngine(take), StreamScheme(names)
    trainer = SimpleNamespace(engine_model=None, scheme=scheme, model=None, engine=engine, step=4)
    sync_engine(trainer)
    assert engine.taken == names[:take] and engine.policy_version == 4
    assert scheme.box["drawn"] == len(names)


def test_vllm_push_merges_each_layer_as_soon_as_it_is_drawn():
    """Each tensor is handed on as soon as what it is made of has been drawn: a merged LoRA
    weight right after its B matrix, the tied output layer right after the embedding table;
    so the push holds one layer's tensors at most."""
    from rl.config import LoraConfig
    from rl.models import load_policy, resolve_model
    from rollouts.weights import PEFT_PREFIX, vllm_named_tensors

    lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = load_policy(resolve_model("tiny-random"), "float32", lora)
    source = list(model.named_parameters())
    position = {name.removeprefix(PEFT_PREFIX): i for i, (name, _) in enumerate(source)}
    stream, box = counted(source)
    pushed = 0
    for name, _ in vllm_named_tensors(stream, True, lora_scaling=lora.alpha / lora.r):
        pushed += 1
        if name == "lm_head.weight":
            needed = [position["model.embed_tokens.weight"]]
        elif name in position:
            needed = [position[name]]
        else:  # merged: <module>.weight from base_layer, lora_A, lora_B
            module = name.removesuffix(".weight")
            needed = [
                position[f"{module}.base_layer.weight"],
                position[f"{module}.lora_A.default.weight"],
                position[f"{module}.lora_B.default.weight"],
            ]
        assert box["drawn"] == max(needed) + 1, name
    assert box["drawn"] == len(source) and pushed > 0


def test_server_push_every_rank_draws_every_tensor(monkeypatch):
    """Ranks other than 0 push nothing to a shared server, but still draw each tensor: under
    FSDP2 and ZeRO-3 each is a gather rank 0's push needs them in."""
    from rollouts.server import ServerEngine

    engine = object.__new__(ServerEngine)
    engine.mode, engine.tie_word_embeddings, engine.lora_scaling = "reload", False, None
    engine.policy_version, engine.checkpoint_names = 0, None
    monkeypatch.setenv("RANK", "1")
    stream, box = counted([("a", torch.zeros(1)), ("b", torch.zeros(1))])
    engine.update_weights(stream, version=2)
    assert box["drawn"] == 2 and engine.policy_version == 2


def test_the_nccl_push_goes_in_buckets():
    from rollouts.server import buckets

    weights = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([2, 2, 5, 1, 1])]
    sizes = [[len(t) for _, t in bucket] for bucket in buckets(iter(weights), 4 * 4)]
    assert sizes == [[2, 2], [5], [1, 1]]  # 16 bytes each; a bigger tensor alone


# ------------------------------------------------------------------ metrics read once


class EagerMetrics(Metrics):
    """The update's metrics as they were read before: each value as it comes."""

    def add(self, name, value, weight):
        super().add(name, value, weight)
        self.flush()


def test_deferred_metrics_add_up_exactly_as_eager_ones():
    """Random float32 tensors, Python floats and weights, in the trainer's pattern of names.
    Exact: each float32 value becomes the same float64 either way, added in the same order."""
    generator = random.Random(0)
    for _ in range(20):
        deferred, eager = Metrics(), EagerMetrics()
        for _ in range(generator.randint(1, 4)):  # optimizer steps
            for _ in range(generator.randint(1, 5)):  # micro-batches
                weight = generator.random()
                for name in ("entropy", "clip_ratio/low", "ratio/min", "ratio/max", "kl"):
                    value = torch.tensor(generator.gauss(0, 3), dtype=torch.float32)
                    deferred.add(name, value, weight)
                    eager.add(name, value, weight)
            for name in ("loss", "grad_norm"):
                value = generator.gauss(0, 1)
                deferred.add(name, value, 1.0)
                eager.add(name, value, 1.0)
            deferred.flush()
        assert deferred.result() == eager.result()


def test_a_tiny_update_logs_the_same_metrics_read_once(tiny_overrides, monkeypatch):
    """Two identical fixed-seed tiny steps, one reading each metric at once (the code before),
    one once per optimizer step: the same metrics to the bit (one thread: the same arithmetic
    in both runs, so no tolerance is needed, and none is given)."""
    from rl import setup, trainer
    from rl.data import batches

    def one_step():
        config = load_config(
            ROOT / "configs" / "tiny.yaml",
            [
                *tiny_overrides,
                "train.mini_batch_size=4",
                "algorithm.epochs=2",
                "algorithm.beta=0.1",
            ],
        )
        parts = setup.build(config)
        prompts = next(
            batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed)
        )
        metrics = trainer.train_step(parts.trainer, prompts)
        return {k: v for k, v in metrics.items() if not k.startswith("timing_s/")}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        deferred = one_step()
        monkeypatch.setattr(trainer, "Metrics", EagerMetrics)
        eager = one_step()
    finally:
        torch.set_num_threads(threads)
    assert deferred == eager
    assert math.isfinite(deferred["loss"]) and deferred["optimizer_steps"] == 4
