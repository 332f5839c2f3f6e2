"""Several training processes (``accelerate launch``, ``torchrun``): who this process is, and the
few collective calls the trainer makes. Nothing else in aha calls torch.distributed.

The scheme is data parallel, DDP-equivalent: every rank holds the whole model, generates for its
own share of the step's prompts (whole groups: a group is never split, so group-relative
advantages need no communication), and computes its share of the loss with the *global*
normalisers (sequences and tokens of the whole optimisation batch). Summing the ranks' gradients
then gives exactly the one-process gradient; aha does that sum itself, one all-reduce per
optimizer step after the micro-batches, instead of wrapping the model in DDP, so any forward
(chunked log-probs, LoRA's disabled adapters for the reference) needs no wrapper's hooks.

FSDP2 (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``) keeps that
scheme but shards the policy, its gradients and the optimizer state across the ranks: accelerate
applies torch's ``fully_shard`` (``prepare``), the reduce-scatter after each backward sums the
ranks' gradients (its divide factor is set to 1, for the same reason as above), and whole weights
exist only where they are needed: gathered for the rollout engine after each step
(``full_parameters``) and for checkpoints, which rank 0 writes as an ordinary Hugging Face folder
(``full_state_dict``, ``full_optimizer_state``). accelerate turns FSDP on for GPUs only; on CPUs
(gloo) aha sets its state to FSDP itself, and ``fully_shard`` runs there as on GPUs. FSDP1 and
DeepSpeed configs are refused at start-up (DeepSpeed: see ``DEEPSPEED_UNSUPPORTED``).

With one process (``WORLD_SIZE`` unset or 1) every function here returns at once without any
distributed call.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rl.config import ConfigError

T = TypeVar("T")

# Gradients are summed in flat buckets of this many elements: few collective calls, bounded
# extra memory (100 MB in fp32).
BUCKET_ELEMENTS = 25_000_000


# Why an accelerate config asking for DeepSpeed is refused (the README says the same).
DEEPSPEED_UNSUPPORTED = (
    "accelerate config: distributed_type DEEPSPEED is not supported yet; shard the model with "
    "FSDP2 instead (distributed_type: FSDP, fsdp_config.fsdp_version: 2; ready to use: "
    "configs/accelerate/fsdp2.yaml), or train plain data parallel (accelerate launch "
    "--multi_gpu). aha's trainer is not wired to DeepSpeed's engine, which owns backward, "
    "gradient averaging and accumulation, clipping and the optimizer step, and writes "
    "checkpoints from every rank"
)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: cuda if available, else cpu
    accelerator: Any = None  # FSDP2: the accelerate Accelerator that shards the model

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2: parameters, gradients and optimizer state are split across the ranks."""
        return self.accelerator is not None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def init() -> Distributed:
    """The process group from the launcher's environment (accelerate launch or torchrun set
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); one process: no group at all.
    An accelerate FSDP config (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``) adds the
    Accelerator that shards the model."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    # Before any accelerate state: on GPUs accelerate would start DeepSpeed's own process group.
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError(DEEPSPEED_UNSUPPORTED)
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or _env_flag("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu)  # gloo on CPUs, nccl on GPUs; sets the CUDA device per rank
    accelerator = _fsdp2_accelerator(cpu) if _env_flag("ACCELERATE_USE_FSDP") else None
    return Distributed(
        state.process_index,
        state.num_processes,
        state.local_process_index,
        state.device,
        accelerator,
    )


def _fsdp2_accelerator(cpu: bool):
    """accelerate's Accelerator with the launcher's FSDP plugin (the FSDP_* variables), FSDP2 only.

    accelerate enables FSDP for accelerators only: on CPUs its state says MULTI_CPU and its
    ``prepare`` would wrap the model in DDP. ``fully_shard`` itself runs on gloo, so there the
    state is set to FSDP with the same plugin, and accelerate shards exactly as on GPUs.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            "accelerate config: FSDP version 1 is not supported; set fsdp_config.fsdp_version: 2 "
            "(torch's fully_shard; configs/accelerate/fsdp2.yaml is a ready one)"
        )
    plugin = FullyShardedDataParallelPlugin()  # every setting from the launcher's FSDP_* variables
    if plugin.activation_checkpointing:
        # its wrapper hides the checkpointing from aha, which then reuses prompt caches
        # (train.share_prompts) inside recomputed layers
        raise ConfigError(
            "accelerate config: fsdp_activation_checkpointing is not supported; set it to false "
            "and use aha's model.gradient_checkpointing: true"
        )
    accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin)
    if accelerator.distributed_type != DistributedType.FSDP:  # CPUs
        if accelerator.mixed_precision != "no":
            raise ConfigError(
                f"accelerate config: mixed_precision {accelerator.mixed_precision} with FSDP on "
                "CPUs is not supported (accelerate applies FSDP's mixed precision on GPUs only); "
                "use mixed_precision: 'no'"
            )
        # in both shared states, as accelerate does on GPUs: each new AcceleratorState()
        # copies PartialState's distributed_type over its own
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise ConfigError("accelerate config: FSDP could not be enabled (fsdp_version: 2 expected)")
    return accelerator


def prepare(dist: Distributed, model, optimizer: torch.optim.Optimizer, ref_model=None):
    """FSDP2: (policy, reference) sharded in place by accelerate, the optimizer's parameters
    swapped for the policy's shards; otherwise both as given.

    The optimizer stays the plain torch one (accelerate's wrapper adds nothing aha uses), so the
    LR scheduler built on it keeps working. The reduce-scatter after each backward sums the
    ranks' gradients instead of averaging them: each rank's loss is its share of the global loss.
    """
    if not dist.sharded:
        return model, ref_model
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    # aha never changes a module's output in place (the hazard this warns of), and the models'
    # own forwards return views (logits_to_keep): the warning would only be noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    accelerator = dist.accelerator
    model, _ = accelerator.prepare(model, optimizer)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a plain SUM: otherwise a factor is a PREMUL_SUM, which gloo lacks
            module.set_force_sum_reduction_for_comms(True)
    if ref_model is not None:  # the frozen reference: sharded the same way, no optimizer
        ref_model = fsdp2_prepare_model(accelerator, ref_model)
    return model, ref_model


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' parts (FSDP2 activation checkpointing,
    torch.compile): the name the Hugging Face model and the rollout engines know."""
    for part in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name


@torch.no_grad()
def full_parameters(
    dist: Distributed, model: torch.nn.Module, trainable_only: bool = False
) -> list[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of the model's parameters; under FSDP2 each shard set is gathered,
    so every rank must call this, in step. Without sharding: the parameters themselves."""
    named = [
        (canonical_name(name), p)
        for name, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    ]
    if not dist.sharded:
        return named
    from torch.distributed.tensor import DTensor

    return [(n, p.full_tensor() if isinstance(p, DTensor) else p.detach()) for n, p in named]


def full_state_dict(dist: Distributed, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2: the whole model state dict on rank 0 (CPU tensors; empty on the other ranks), for
    ``save_pretrained``; every rank must call it. Without sharding: None (the model has it)."""
    if not dist.sharded:
        return None
    return dist.accelerator.get_state_dict(model)


def full_optimizer_state(
    dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """FSDP2: the whole optimizer state on rank 0, keyed by parameter name (torch's distributed
    checkpoint format: any world size, or one process, loads it); every rank must call it.
    Without sharding: None (``optimizer.state_dict()`` is whole)."""
    if not dist.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(
    dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """A checkpoint's optimizer state into this rank's optimizer: a plain ``state_dict()``
    (ids in parameter order) or one keyed by name (written under FSDP2), sharded or not."""
    by_name = any(isinstance(key, str) for key in state.get("state", {})) or any(
        isinstance(key, str) for group in state.get("param_groups", []) for key in group["params"]
    )
    if not by_name and not dist.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # ids count the optimizer's parameters in order: name them
        names = [
            canonical_name(n)
            for group in optimizer.param_groups
            for n in _names_of(model, group["params"])
        ]
        state = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def _names_of(model: torch.nn.Module, parameters: Iterable[torch.Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in parameters]


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
