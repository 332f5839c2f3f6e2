"""FSDP2 and DeepSpeed ZeRO-2/3 under accelerate: sharding the policy, and whole weights and
optimizer state gathered where aha needs them (the rollout engine, rank 0's checkpoints).

FSDP2 (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``) keeps the
data-parallel scheme of ``rl/distributed.py`` (global loss normalisers, gradients summed) but
shards the policy, its gradients and the optimizer state across the ranks: accelerate applies
torch's ``fully_shard`` (``prepare``), the reduce-scatter after each backward sums the ranks'
gradients (its divide factor is set to 1: each rank's loss is already its share), and whole weights
exist only where they are needed: gathered for the rollout engine after each step
(``full_parameters``) and for checkpoints, which rank 0 writes as an ordinary Hugging Face folder
(``full_state_dict``, ``full_optimizer_state``). accelerate turns FSDP on for GPUs only; on CPUs
(gloo) aha sets its state to FSDP itself, and ``fully_shard`` runs there as on GPUs. FSDP1 configs
are refused at start-up.

DeepSpeed ZeRO-2 and ZeRO-3 (an accelerate config with ``distributed_type: DEEPSPEED``) hand the
policy and the optimizer to DeepSpeed's engine (``accelerator.prepare``), which then owns the
gradient reduction, clipping (its ``gradient_clipping`` is aha's ``train.max_grad_norm``) and the
optimizer step; aha still runs the micro-batches itself and marks the last one of each optimizer
step as the accumulation boundary (DeepSpeed's own ``gradient_accumulation_steps`` is 1). DeepSpeed
*averages* the ranks' gradients, so each rank's loss is multiplied by the number of ranks: the
average of those is the sum aha wants. ZeRO-2 keeps whole weights on every rank (optimizer state
and gradients sharded); under ZeRO-3 the weights are partitioned too and gathered as under FSDP2.
Checkpoints stay ordinary Hugging Face folders written by rank 0, with the optimizer state keyed by
name (DeepSpeed's per-rank checkpoint files are not used). As for FSDP, accelerate enables
DeepSpeed on accelerators only; on CPUs aha sets its state itself."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from rl.config import ConfigError
from rl.distributed import Distributed

# The DeepSpeed set-ups aha runs (the README says the same).
DEEPSPEED_STAGES = (2, 3)


def deepspeed_plugin():
    """accelerate's DeepSpeed plugin from the launcher's variables (ACCELERATE_DEEPSPEED_*, or
    the DeepSpeed JSON file they name), checked for what aha supports."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"accelerate config: distributed_type DEEPSPEED needs the deepspeed package "
            f"(pip install 'aha[deepspeed]'): {error}"
        ) from None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    stage = plugin.zero_stage
    if stage not in DEEPSPEED_STAGES:
        raise ConfigError(
            f"accelerate config: DeepSpeed zero_stage {stage} is not supported; use 2 (optimizer "
            "state and gradients sharded) or 3 (the weights too): configs/accelerate/"
            "deepspeed_zero2.yaml, deepspeed_zero3.yaml"
        )
    zero = config.get("zero_optimization", {})
    for what in ("offload_optimizer", "offload_param"):
        device = zero.get(what, {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(
                f"accelerate config: DeepSpeed {what} to {device!r} is not supported (aha's AdamW "
                "steps where the weights are); set it to none"
            )
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(
            "DeepSpeed config: remove its optimizer and scheduler sections; aha builds AdamW and "
            "its LR schedule from train.* (learning_rate, adam_betas, weight_decay, lr_schedule)"
        )
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise ConfigError(
            f"accelerate config: DeepSpeed gradient_accumulation_steps must be 1 (or auto), got "
            f"{accumulation}; aha accumulates over train.micro_batch_size-sized micro-batches of "
            "each train.mini_batch_size itself"
        )
    return plugin


def deepspeed_accelerator(cpu: bool, plugin):
    """accelerate's Accelerator with DeepSpeed's plugin. accelerate enables DeepSpeed for
    accelerators only; on CPUs (gloo, MULTI_CPU) aha sets the state to DEEPSPEED itself, as
    accelerate does on GPUs, and DeepSpeed's engine runs on the CPU there."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=cpu, deepspeed_plugin=plugin)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:  # CPUs
        _enable_on_cpus(accelerator, DistributedType.DEEPSPEED, "DeepSpeed")
        state = accelerator.state
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
    # accelerate registered the config with transformers, whose from_pretrained would then build
    # every model partitioned (zero.Init) and whose generate() would sync the ranks. aha loads
    # whole models and partitions the policy in prepare(); generation stays per rank.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return accelerator


def _enable_on_cpus(accelerator, distributed_type, name: str) -> None:
    """Set accelerate's shared states to ``distributed_type`` on CPUs (gloo, MULTI_CPU), where
    accelerate itself enables FSDP and DeepSpeed for accelerators only: in both states, as it
    does on GPUs (each new AcceleratorState() copies PartialState's type over its own)."""
    from accelerate import PartialState

    if accelerator.mixed_precision != "no":
        raise ConfigError(
            f"accelerate config: mixed_precision {accelerator.mixed_precision} with {name} on "
            f"CPUs is not supported (accelerate applies {name}'s mixed precision on GPUs only); "
            "use mixed_precision: 'no'"
        )
    PartialState().distributed_type = distributed_type
    accelerator.state.distributed_type = distributed_type


def fsdp2_accelerator(cpu: bool):
    """accelerate's Accelerator with the launcher's FSDP plugin (the FSDP_* variables), FSDP2 only.

    accelerate enables FSDP for accelerators only: on CPUs its state says MULTI_CPU and its
    ``prepare`` would wrap the model in DDP. ``fully_shard`` itself runs on gloo, so there the
    state is set to FSDP with the same plugin, and accelerate shards exactly as on GPUs.
    """
    from accelerate import Accelerator
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
        _enable_on_cpus(accelerator, DistributedType.FSDP, "FSDP")
        accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise ConfigError("accelerate config: FSDP could not be enabled (fsdp_version: 2 expected)")
    return accelerator


def prepare(
    dist: Distributed,
    model,
    optimizer: torch.optim.Optimizer,
    ref_model=None,
    micro_batch_size: int = 1,
    max_grad_norm: float = 1.0,
):
    """FSDP2: (policy, reference) sharded in place by accelerate, the optimizer's parameters
    swapped for the policy's shards; DeepSpeed: the policy and optimizer handed to DeepSpeed's
    engine (``dist.ds_engine``), the reference left whole; otherwise both as given. The policy
    returned is always the model itself (not a wrapper).

    The optimizer stays the plain torch one (accelerate's wrapper adds nothing aha uses), so the
    LR scheduler built on it keeps working. The reduce-scatter after each backward sums the
    ranks' gradients instead of averaging them: each rank's loss is its share of the global loss.
    """
    if dist.deepspeed:
        _prepare_deepspeed(dist, model, optimizer, micro_batch_size, max_grad_norm)
        return model, ref_model
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


def _prepare_deepspeed(
    dist: Distributed, model, optimizer, micro_batch_size: int, max_grad_norm: float
) -> None:
    """DeepSpeed's engine around the policy and aha's AdamW (ZeRO partitions its state, and the
    gradients; ZeRO-3 the weights too, in place). The micro-batch size only fills DeepSpeed's
    bookkeeping: aha feeds the micro-batches itself and sets the accumulation boundary."""
    accelerator = dist.accelerator
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    clipping = config.get("gradient_clipping", "auto")
    if clipping not in ("auto", None) and float(clipping) != float(max_grad_norm):
        raise ConfigError(
            f"DeepSpeed config: gradient_clipping {clipping} differs from train.max_grad_norm "
            f"({max_grad_norm}); leave it out (or auto): aha fills it from train.max_grad_norm"
        )
    config["gradient_clipping"] = float(max_grad_norm)
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["train_batch_size"] = micro_batch_size * dist.world_size
    if dist.zero_stage == 3:  # rank 0's checkpoints gather the whole weights (get_state_dict)
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    accelerator.gradient_accumulation_steps = 1
    # DeepSpeed's ZeRO-3 calls torch's reduce_scatter_tensor, deprecated in torch 2.13
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated")
    accelerator.prepare(model, optimizer)


def deepspeed_forward(dist: Distributed) -> None:
    """DeepSpeed: what the engine's forward does before the model's, called before each training
    micro-batch's forward: ZeRO-3 counts its micro-steps here (the first one's gradients are
    copied, later ones added)."""
    dist.ds_engine.optimizer.clear_backward_seen_flag()


def deepspeed_backward(dist: Distributed, loss: torch.Tensor, last: bool) -> None:
    """DeepSpeed: backward of this rank's share of the loss; ``last`` (the optimizer step's last
    micro-batch) reduces the gradients, clips them and steps the optimizer. The loss is
    multiplied by the number of ranks because DeepSpeed averages the ranks' gradients.

    aha runs the policy's forward on the model itself, not through the engine's forward, which
    would hook DeepSpeed's backward prologue onto each output (a micro-batch may run the model
    twice, the prompts once and the completions on their cache): the prologue is hooked onto the
    loss instead, once per backward."""
    from deepspeed.runtime.utils import register_output_backward_hooks

    engine = dist.ds_engine
    loss = loss * dist.world_size
    register_output_backward_hooks(
        loss,
        preprocess_once_fn=engine._backward_prologue,
        preprocess_per_tensor_fn=engine._backward_prologue_per_tensor,
    )
    dist.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)


def deepspeed_grad_norm(dist: Distributed) -> float:
    """The global gradient norm of DeepSpeed's last optimizer step, before clipping."""
    norm = dist.ds_engine.get_global_grad_norm()
    return float(norm.item() if hasattr(norm, "item") else norm)


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
    if dist.zero_stage == 3:  # one parameter at a time: never the whole model twice
        from deepspeed.runtime.zero import GatheredParameters

        whole = []
        for name, p in named:
            with GatheredParameters([p]):
                whole.append((name, p.data.detach().clone()))
        return whole
    if not dist.sharded:
        return named
    from torch.distributed.tensor import DTensor

    return [(n, p.full_tensor() if isinstance(p, DTensor) else p.detach()) for n, p in named]


def full_state_dict(dist: Distributed, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2, ZeRO-3: the whole model state dict on rank 0 (empty on the other ranks), for
    ``save_pretrained``; every rank must call it. Otherwise (ZeRO-2 included: every rank holds
    whole weights): None (the model has it)."""
    if dist.zero_stage == 3:
        state = dist.accelerator.get_state_dict(dist.ds_engine) or {}  # None off rank 0
        return {name: tensor.detach().cpu() for name, tensor in state.items()}
    if not dist.sharded:
        return None
    return dist.accelerator.get_state_dict(model)


def full_optimizer_state(
    dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """FSDP2, DeepSpeed: the whole optimizer state on rank 0, keyed by parameter name (torch's
    distributed checkpoint format: any world size, or one process, loads it); every rank must
    call it. Without sharding: None (``optimizer.state_dict()`` is whole)."""
    if dist.deepspeed:
        return _deepspeed_optimizer_state(dist, model, optimizer)
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
    if not by_name and not dist.sharded and not dist.deepspeed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # ids count the optimizer's parameters in order: name them
        names = (
            # DeepSpeed's optimizer holds flat partitions: setup.build's order, the trainable ones
            [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad]
            if dist.deepspeed
            else [
                canonical_name(n)
                for group in optimizer.param_groups
                for n in _names_of(model, group["params"])
            ]
        )
        state = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }
    if dist.deepspeed:
        _load_deepspeed_optimizer_state(dist, model, state)
        return
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


# AdamW's per-parameter tensors, as DeepSpeed's partitions hold them
_ADAM_TENSORS = ("exp_avg", "exp_avg_sq")


def _base_optimizer(dist: Distributed) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's ZeRO optimizer: it steps the flat fp32 partitions."""
    return dist.ds_engine.optimizer.optimizer


def _deepspeed_optimizer_state(
    dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The ZeRO partitions of AdamW's state gathered to whole tensors, one parameter at a time,
    in the by-name format of ``full_optimizer_state``; whole on rank 0, empty elsewhere."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(dist)
    steps = [s["step"] for s in base.state.values() if "step" in s]
    out: dict[str, Any] = {}
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = canonical_name(name)
        names.append(name)
        if not steps:  # no optimizer step yet: no state
            continue
        entry = {"step": steps[0].detach().clone().cpu()}
        for key in _ADAM_TENSORS:
            whole = safe_get_full_optimizer_state(p, key)  # a collective: every rank calls it
            entry[key] = whole.detach().cpu().reshape(getattr(p, "ds_shape", p.shape))
        if dist.is_main:
            out[name] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    if len(groups) != 1:
        raise RuntimeError(f"DeepSpeed: one parameter group expected, found {len(groups)}")
    return {"state": out if dist.is_main else {}, "param_groups": [{**groups[0], "params": names}]}


def _load_deepspeed_optimizer_state(
    dist: Distributed, model: torch.nn.Module, state: dict[str, Any]
) -> None:
    """A by-name optimizer state into DeepSpeed's partitions: AdamW's state is created on each
    flat fp32 partition (as its first step would), then each parameter's part is written."""
    from deepspeed.utils import safe_set_full_optimizer_state

    entries = state.get("state", {})
    base = _base_optimizer(dist)
    saved_groups = state.get("param_groups", [])
    for group in base.param_groups:
        for key in ("lr", "initial_lr"):
            if saved_groups and key in saved_groups[0]:
                group[key] = saved_groups[0][key]
    if not entries:
        return
    step = next(iter(entries.values()))["step"]
    zero = dist.ds_engine.optimizer
    # the flat fp32 partitions AdamW steps (ZeRO-3's, ZeRO-2's)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    for flat in flats if flats is not None else zero.single_partition_of_fp32_groups:
        base.state[flat] = {
            "step": torch.as_tensor(step, dtype=torch.float32).clone(),
            **{key: torch.zeros_like(flat) for key in _ADAM_TENSORS},
        }
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-2: link the fragments
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        entry = entries[canonical_name(name)]
        for key in _ADAM_TENSORS:
            safe_set_full_optimizer_state(p, entry[key].to(p.device).reshape(-1), key)


def _names_of(model: torch.nn.Module, parameters: Iterable[torch.Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in parameters]
