"""FSDP2 under accelerate: the ``FSDP2`` scheme (``rl/schemes.py``), and the helper that lets
accelerate's FSDP and DeepSpeed run on CPUs.

FSDP2 (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``) keeps the
data-parallel scheme (global loss normalisers, gradients summed) but shards the policy, its
gradients and the optimizer state across the ranks: accelerate applies torch's ``fully_shard``
(``prepare``), the reduce-scatter after each backward sums the ranks' gradients (its divide
factor is set to 1: each rank's loss is already its share), in float32 whatever the
mixed-precision policy computes in, and whole weights exist only where they are needed: gathered
one parameter at a time for the rollout engine after each step (``whole_weights``) and for
checkpoints, which rank 0 writes as an ordinary Hugging Face folder (``full_state_dict``,
``full_optimizer_state``). accelerate turns FSDP on for GPUs only; on CPUs (gloo) aha sets its
state to FSDP itself, and ``fully_shard`` runs there as on GPUs. FSDP1 configs are refused at
start-up.

DeepSpeed ZeRO-2/3 is in ``rl/zero.py``."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from rl.config import ConfigError
from rl.schemes import DataParallel, Named, Update, canonical_name, keyed_by_name, named_by_order


def enable_on_cpus(accelerator, distributed_type, name: str) -> None:
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
        enable_on_cpus(accelerator, DistributedType.FSDP, "FSDP")
        accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise ConfigError("accelerate config: FSDP could not be enabled (fsdp_version: 2 expected)")
    return accelerator


class FSDP2(DataParallel):
    """The policy, its gradients and AdamW's state sharded across the ranks by ``fully_shard``;
    the gradients are summed by the reduce-scatter after each backward."""

    name = "FSDP2"
    partitioned_weights = True

    def prepare(self, model, optimizer, ref_model=None, micro_batch_size=1, max_grad_norm=1.0):
        """(policy, reference) sharded in place by accelerate, the optimizer's parameters
        swapped for the policy's shards. The optimizer stays the plain torch one (accelerate's
        wrapper adds nothing aha uses), so the LR scheduler built on it keeps working. The
        reduce-scatter after each backward sums the ranks' gradients instead of averaging them
        (each rank's loss is its share of the global loss), in float32."""
        from torch.distributed.fsdp import FSDPModule

        # aha never changes a module's output in place (the hazard this warns of), and the
        # models' own forwards return views (logits_to_keep): the warning would only be noise.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        accelerator = self.dist.accelerator
        plugin = accelerator.state.fsdp_plugin
        wrap_by_own_layers(plugin)
        plugin.mixed_precision_policy = reduce_in_float32(plugin.mixed_precision_policy)
        model, _ = accelerator.prepare(model, optimizer)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                # a plain SUM: otherwise a factor is a PREMUL_SUM, which gloo lacks
                module.set_force_sum_reduction_for_comms(True)
        if ref_model is not None:  # the frozen reference: sharded the same way, no optimizer
            ref_model = self.prepare_frozen(ref_model)
        return model, ref_model

    def prepare_frozen(self, model):
        """Sharded as the policy, no optimizer (the reference, a teacher)."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        wrap_by_own_layers(self.dist.accelerator.state.fsdp_plugin)
        return fsdp2_prepare_model(self.dist.accelerator, model)

    def clip_and_step(self, optimizer, parameters, max_norm: float, discard: bool) -> Update:
        # the gradients were summed by the reduce-scatter; the norm is over all ranks' shards
        norm = self.dist.accelerator.clip_grad_norm_(parameters, max_norm)
        return self._step_if_finite(optimizer, norm, discard)

    def whole_weights(self, model: torch.nn.Module, trainable_only: bool = False) -> Named:
        """Each parameter's shards gathered in turn (one all-gather each, on every rank)."""
        from torch.distributed.tensor import DTensor

        for name, p in model.named_parameters():
            if p.requires_grad or not trainable_only:
                with torch.no_grad():
                    whole = p.full_tensor() if isinstance(p, DTensor) else p.detach()
                yield canonical_name(name), whole

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.dist.accelerator.get_state_dict(model)

    def full_optimizer_state(self, model, optimizer) -> dict[str, Any]:
        """torch's distributed-checkpoint format: any world size, or one process, loads it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """A plain ``state_dict()`` (ids in parameter order) or one keyed by name, re-sharded."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if not keyed_by_name(state):  # ids count the optimizer's parameters in order: name them
            names = [
                canonical_name(n)
                for group in optimizer.param_groups
                for n in _names_of(model, group["params"])
            ]
            state = named_by_order(state, names)
        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )


def wrap_by_own_layers(plugin) -> None:
    """Each model sharded at its own decoder layers. accelerate resolves the layer classes to
    wrap (a model's ``_no_split_modules``) on the first model it prepares and keeps them in its
    plugin: a later model of another architecture (a teacher, or a new policy in the same
    process) is refused with "Could not find the transformer layer class MixtralDecoderLayer".
    The plugin's wrap settings go back to what the accelerate config said before each model;
    classes the config names itself (``fsdp_transformer_layer_cls_to_wrap``) still apply."""
    configured = getattr(plugin, "_aha_configured_wrap", None)
    if configured is None:
        configured = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
        plugin._aha_configured_wrap = configured
    plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = configured


def reduce_in_float32(policy):
    """accelerate's FSDP2 mixed-precision policy with the gradients reduced in float32.
    accelerate sets ``reduce_dtype`` to the mixed-precision dtype (bf16 with
    ``mixed_precision: bf16``): the ranks' gradients would then be summed in bf16, 8 bits of
    mantissa, each sum losing what the shares' float32 gradients held. None (no mixed precision:
    everything float32) stays None."""
    if policy is None or policy.reduce_dtype in (None, torch.float32):
        return policy
    return dataclasses.replace(policy, reduce_dtype=torch.float32)


def _names_of(model: torch.nn.Module, parameters: Iterable[torch.Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in parameters]
