"""Several training processes (``accelerate launch``, ``torchrun``): who this process is, and the
few collective calls the trainer makes. Nothing else in aha calls torch.distributed.

The scheme is data parallel, DDP-equivalent: every rank holds the whole model, generates for its
own share of the step's prompts (whole groups: a group is never split, so group-relative
advantages need no communication), and computes its share of the loss with the *global*
normalisers (sequences and tokens of the whole optimisation batch). Summing the ranks' gradients
then gives exactly the one-process gradient; aha does that sum itself, one all-reduce per
optimizer step after the micro-batches, instead of wrapping the model in DDP, so any forward
(chunked log-probs, LoRA's disabled adapters for the reference) needs no wrapper's hooks.

``rl/schemes.py`` holds the step's side of each scheme (this one: ``DataParallel``); FSDP2 and
DeepSpeed ZeRO-2/3, which shard the model, live in ``rl/sharded.py`` and ``rl/zero.py``.

With one process (``WORLD_SIZE`` unset or 1) every function here returns at once without any
distributed call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rl.config import ConfigError

T = TypeVar("T")

# Gradients are summed in flat buckets of this many elements: few collective calls, bounded
# extra memory (100 MB in fp32).
BUCKET_ELEMENTS = 25_000_000


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: cuda if available, else cpu
    accelerator: Any = None  # FSDP2 or DeepSpeed: the accelerate Accelerator that shards
    zero_stage: int = 0  # DeepSpeed: its ZeRO stage (2 or 3); 0 without DeepSpeed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def describe(dist: Distributed) -> str:
    """How the processes share the model, for the start-up line: the scheme's name."""
    from rl.schemes import choose

    return choose(dist).name


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def init() -> Distributed:
    """The process group from the launcher's environment (accelerate launch or torchrun set
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); one process: no group at all.
    An accelerate FSDP config (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``) or DeepSpeed config
    (``ACCELERATE_USE_DEEPSPEED``) adds the Accelerator that shards the model."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    from accelerate import PartialState

    from rl import sharded, zero

    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    # its errors before any process group
    plugin = zero.deepspeed_plugin() if use_deepspeed else None

    cpu = not torch.cuda.is_available() or _env_flag("ACCELERATE_USE_CPU")
    # gloo on CPUs, nccl on GPUs (DeepSpeed's process group there); sets the CUDA device per rank
    state = PartialState(cpu=cpu)
    accelerator, zero_stage = None, 0
    if plugin is not None:
        accelerator, zero_stage = zero.deepspeed_accelerator(cpu, plugin), plugin.zero_stage
    elif _env_flag("ACCELERATE_USE_FSDP"):
        accelerator = sharded.fsdp2_accelerator(cpu)
    return Distributed(
        state.process_index,
        state.num_processes,
        state.local_process_index,
        state.device,
        accelerator,
        zero_stage,
    )


def close(dist: Distributed) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(items: Sequence[T], dist: Distributed) -> list[T]:
    """This rank's contiguous share of the step's prompts; every rank gets as many."""
    if not dist.enabled:
        return list(items)
    if len(items) % dist.world_size:
        raise ConfigError(
            f"train.prompts_per_step ({len(items)}) must be a multiple of the number of "
            f"processes ({dist.world_size}): each rank generates whole groups"
        )
    size = len(items) // dist.world_size
    return list(items[dist.rank * size : (dist.rank + 1) * size])


def barrier(dist: Distributed) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def all_sum(dist: Distributed, value: float) -> float:
    if not dist.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device(dist))
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def gather_rows(dist: Distributed, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` stacked along dim 0 in rank order (equal shapes on all ranks)."""
    if not dist.enabled:
        return tensor
    local = tensor.to(_comm_device(dist))
    parts = [torch.empty_like(local) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def broadcast_object(dist: Distributed, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not dist.enabled:
        return value
    box = [value if dist.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(dist: Distributed, value: Any) -> list[Any]:
    if not dist.enabled:
        return [value]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, value)
    return out


def broadcast_parameters(dist: Distributed, model: torch.nn.Module) -> None:
    """Rank 0's weights everywhere (a LoRA adapter's random init differs per rank otherwise)."""
    if not dist.enabled:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def sum_gradients(dist: Distributed, parameters: Iterable[torch.nn.Parameter]) -> None:
    """grad <- sum over ranks of grad, in flat buckets. Each rank's loss is already its share of
    the global loss, so the sum (not the mean) is the one-process gradient. A parameter without
    a gradient on this rank counts as zeros, so every rank sends the same buckets."""
    if not dist.enabled:
        return
    parameters = list(parameters)
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in parameters:
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= BUCKET_ELEMENTS:
            _sum_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _sum_bucket(bucket)


def _sum_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_metrics(
    dist: Distributed, metrics: dict[str, float], summed: Iterable[str] = ()
) -> dict[str, float]:
    """Metrics over all ranks: names in ``summed`` are added up (each rank's share of a global
    quantity), names ending in /max or /min and timings keep the extreme (a step waits for its
    slowest rank), everything else is the mean over the ranks that have it (a rank may lack a
    metric, e.g. a reward's std when it scored a single value)."""
    if not dist.enabled:
        return metrics
    summed = set(summed)
    names = sorted(
        {n for ranks_names in gather_objects(dist, sorted(metrics)) for n in ranks_names}
    )
    device = _comm_device(dist)
    have = torch.tensor([n in metrics for n in names], dtype=torch.float64, device=device)
    values = torch.tensor([metrics.get(n, 0.0) for n in names], dtype=torch.float64, device=device)
    high = torch.tensor(
        [metrics.get(n, -math.inf) for n in names], dtype=torch.float64, device=device
    )
    low = torch.tensor(
        [metrics.get(n, math.inf) for n in names], dtype=torch.float64, device=device
    )
    totals = torch.stack([values, have])
    torch.distributed.all_reduce(totals)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        if name in summed:
            out[name] = float(totals[0, i])
        elif name.endswith("/max") or name.startswith("timing_s/"):
            out[name] = float(high[i])
        elif name.endswith("/min"):
            out[name] = float(low[i])
        else:
            out[name] = float(totals[0, i] / totals[1, i])
    return out


def _comm_device(dist: Distributed) -> torch.device:
    """nccl moves CUDA tensors only; gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_world(config, dist: Distributed) -> None:
    """Batch sizes that split into whole groups and whole mini-batches per rank, said at start-up."""
    if not dist.enabled:
        return
    train, world = config.train, dist.world_size
    if train.prompts_per_step % world:
        raise ConfigError(
            f"train.prompts_per_step: must be a multiple of the number of processes ({world}), "
            f"got {train.prompts_per_step}: each rank generates whole groups"
        )
    if train.mini_batch_size % world:
        raise ConfigError(
            f"train.mini_batch_size: must be a multiple of the number of processes ({world}), "
            f"got {train.mini_batch_size}"
        )
    if dist.zero_stage == 3 and config.model.lora.enabled:
        raise ConfigError(
            "model.lora.enabled with DeepSpeed ZeRO-3 is not supported (not verified: its update "
            "differs from the one-process one beyond aha's test tolerance on a few adapter "
            "coordinates with near-zero gradients); use ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2.yaml), FSDP2 or plain data parallel: the "
            "adapters and their optimizer state are small anyway"
        )
