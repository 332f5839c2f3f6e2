"""DeepSpeed ZeRO-2 and ZeRO-3 under accelerate: the ``DeepSpeedZeRO`` scheme (``rl/schemes.py``).

An accelerate config with ``distributed_type: DEEPSPEED`` hands the policy and the optimizer to
DeepSpeed's engine (``accelerator.prepare``), which then owns the gradient reduction, clipping
(its ``gradient_clipping`` is aha's ``train.max_grad_norm``) and the optimizer step; aha still
runs the micro-batches itself and marks the last one of each optimizer step as the accumulation
boundary (DeepSpeed's own ``gradient_accumulation_steps`` is 1). DeepSpeed *averages* the ranks'
gradients, so each rank's loss is multiplied by the number of ranks: the average of those is the
sum aha wants. ZeRO-2 keeps whole weights on every rank (optimizer state and gradients sharded);
under ZeRO-3 the weights are partitioned too and gathered, one parameter at a time, for the
rollout engine and checkpoints. Checkpoints stay ordinary Hugging Face folders written by rank 0,
with the optimizer state keyed by name (DeepSpeed's per-rank checkpoint files are not used). As
for FSDP, accelerate enables DeepSpeed on accelerators only; on CPUs aha sets its state itself.

A step whose gradient norm is not finite is skipped by DeepSpeed itself (its ZeRO optimizers
treat an invalid norm as an overflow: gradients dropped, no AdamW update, no step counted); a
step whose loss is not finite on some rank is made one, before the backward that steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from rl.config import ConfigError
from rl.distributed import Distributed
from rl.schemes import DataParallel, Named, Update, canonical_name, keyed_by_name, named_by_order
from rl.sharded import enable_on_cpus

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
        enable_on_cpus(accelerator, DistributedType.DEEPSPEED, "DeepSpeed")
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


class DeepSpeedZeRO(DataParallel):
    """DeepSpeed's engine reduces (averaged: the loss is scaled by the world size), clips and
    steps; aha feeds it the micro-batches and marks each optimizer step's last one."""

    def __init__(self, dist: Distributed):
        super().__init__(dist)
        self.stage = dist.zero_stage
        self.name = f"DeepSpeed ZeRO-{self.stage}"
        self.partitioned_weights = self.stage == 3

    @property
    def engine(self):
        """The engine of the latest ``prepare`` (accelerate keeps it)."""
        return self.dist.accelerator.deepspeed_engine_wrapped.engine

    # ------------------------------------------------------------------ set-up

    def prepare(self, model, optimizer, ref_model=None, micro_batch_size=1, max_grad_norm=1.0):
        """DeepSpeed's engine around the policy and aha's AdamW (ZeRO partitions its state, and
        the gradients; ZeRO-3 the weights too, in place); the reference is left whole. The
        micro-batch size only fills DeepSpeed's bookkeeping: aha feeds the micro-batches itself
        and sets the accumulation boundary."""
        accelerator = self.dist.accelerator
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        clipping = config.get("gradient_clipping", "auto")
        if clipping not in ("auto", None) and float(clipping) != float(max_grad_norm):
            raise ConfigError(
                f"DeepSpeed config: gradient_clipping {clipping} differs from train.max_grad_norm "
                f"({max_grad_norm}); leave it out (or auto): aha fills it from train.max_grad_norm"
            )
        if config.get("bf16", {}).get("check_grad_overflow", True) is False:
            raise ConfigError(
                "DeepSpeed config: bf16.check_grad_overflow false is not supported; aha relies on "
                "it to skip any optimizer step whose gradients are not finite"
            )
        config["gradient_clipping"] = float(max_grad_norm)
        config["gradient_accumulation_steps"] = 1
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["train_batch_size"] = micro_batch_size * self.dist.world_size
        if self.stage == 3:  # rank 0's checkpoints gather the whole weights (get_state_dict)
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        accelerator.gradient_accumulation_steps = 1
        # DeepSpeed's ZeRO-3 calls torch's reduce_scatter_tensor, deprecated in torch 2.13
        warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated")
        accelerator.prepare(model, optimizer)
        return model, ref_model

    def logps_chunk_tokens(self, configured: int) -> int:
        """0 under ZeRO-3: there every call of the output layer gathers its weight from all
        ranks, and the ranks' chunk counts differ (their token counts do), so the logits of the
        completion region are computed in the model's forward instead."""
        return 0 if self.stage == 3 else configured

    # ------------------------------------------------------------------ one optimizer step

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: DeepSpeed drops its gradients at each step."""

    def before_forward(self) -> None:
        """What the engine's forward does before the model's: ZeRO-3 counts its micro-steps here
        (the first one's gradients are copied, later ones added)."""
        self.engine.optimizer.clear_backward_seen_flag()

    def backward(self, loss: torch.Tensor, last: bool, discard: bool) -> None:
        """Backward of this rank's share of the loss, times the number of ranks (DeepSpeed
        averages the ranks' gradients); ``last`` marks the accumulation boundary, where the
        gradients are reduced. With ``discard`` the loss is made NaN, so that every rank's
        reduced gradients are, and DeepSpeed's own check skips the step in ``clip_and_step``.

        aha runs the policy's forward on the model itself, not through the engine's forward,
        which would hook DeepSpeed's backward prologue onto each output (a micro-batch may run
        the model twice, the prompts once and the completions on their cache): the prologue is
        hooked onto the loss instead, once per backward."""
        from deepspeed.runtime.utils import register_output_backward_hooks

        engine = self.engine
        loss = loss * self.dist.world_size
        if last and discard:
            loss = loss * math.nan
        register_output_backward_hooks(
            loss,
            preprocess_once_fn=engine._backward_prologue,
            preprocess_per_tensor_fn=engine._backward_prologue_per_tensor,
        )
        # accelerate's DeepSpeedEngineWrapper.backward, with the step left to clip_and_step
        engine.set_gradient_accumulation_boundary(is_boundary=last)
        engine.backward(loss)

    def clip_and_step(self, optimizer, parameters, max_norm: float, discard: bool) -> Update:
        """DeepSpeed's step: reduce, clip, AdamW, drop the gradients; skipped by DeepSpeed when
        the global norm is not finite (the same on every rank: the norm is reduced)."""
        engine = self.engine
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm.item() if hasattr(norm, "item") else norm)
        applied = engine.was_step_applied()
        if applied and (discard or not math.isfinite(grad_norm)):
            # a DeepSpeed that does not check fp32 gradients would get here: never go on from it
            raise RuntimeError(
                f"DeepSpeed applied an optimizer step with a non-finite loss or gradient norm "
                f"({grad_norm}); the weights are no longer valid and no checkpoint is written"
            )
        return Update(grad_norm, applied)

    # ------------------------------------------------------------------ whole weights

    def whole_weights(self, model: torch.nn.Module, trainable_only: bool = False) -> Named:
        """ZeRO-2: the parameters themselves; ZeRO-3: each one gathered from the ranks in turn
        (a copy: the partition comes back before the tensor is handed on), never two at once."""
        if self.stage != 3:
            yield from super().whole_weights(model, trainable_only)
            return
        from deepspeed.runtime.zero import GatheredParameters

        for name, p in model.named_parameters():
            if p.requires_grad or not trainable_only:
                with torch.no_grad(), GatheredParameters([p]):
                    whole = p.data.detach().clone()
                yield canonical_name(name), whole

    # ------------------------------------------------------------------ checkpoints

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: the whole state dict on rank 0; ZeRO-2: None (every rank holds it)."""
        if self.stage != 3:
            return None
        state = self.dist.accelerator.get_state_dict(self.engine) or {}  # None off rank 0
        return {name: tensor.detach().cpu() for name, tensor in state.items()}

    def full_optimizer_state(self, model, optimizer) -> dict[str, Any]:
        """The ZeRO partitions of AdamW's state gathered to whole tensors, one parameter at a
        time, keyed by name; whole on rank 0, empty elsewhere."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base_optimizer()
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
            if self.dist.is_main:
                out[name] = entry
        groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        if len(groups) != 1:
            raise RuntimeError(f"DeepSpeed: one parameter group expected, found {len(groups)}")
        main = self.dist.is_main
        return {"state": out if main else {}, "param_groups": [{**groups[0], "params": names}]}

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """A by-name (or plain) optimizer state into DeepSpeed's partitions: AdamW's state is
        created on each flat fp32 partition (as its first step would), then each parameter's
        part is written."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if not keyed_by_name(state):  # DeepSpeed's optimizer holds setup.build's trainable order
            names = [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad]
            state = named_by_order(state, names)
        entries = state.get("state", {})
        base = self._base_optimizer()
        saved_groups = state.get("param_groups", [])
        for group in base.param_groups:
            for key in ("lr", "initial_lr"):
                if saved_groups and key in saved_groups[0]:
                    group[key] = saved_groups[0][key]
        if not entries:
            return
        step = next(iter(entries.values()))["step"]
        zero = self.engine.optimizer
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

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW inside DeepSpeed's ZeRO optimizer: it steps the flat fp32 partitions."""
        return self.engine.optimizer.optimizer


# AdamW's per-parameter tensors, as DeepSpeed's partitions hold them
_ADAM_TENSORS = ("exp_avg", "exp_avg_sq")
