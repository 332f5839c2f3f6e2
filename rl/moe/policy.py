"""What set-up (rl/setup.py, rl/models.py) asks of a mixture-of-experts policy: its router patch,
its LoRA targets, and the checkpoint layout its weights go to vLLM in. Each is None or the
dense behaviour for a dense model, so the callers never ask which kind of model runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from rl.moe.families import family_of
from rl.moe.routing import Routing

# rl.config.LoraConfig's default target_modules: on a MoE model it means "attention only"
DENSE_LORA_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def install_routing(model, replay: bool, aux_loss_coef: float, ref_model=None) -> Routing | None:
    """The router patch of a MoE policy, hooked into it (and into its reference copy); None for
    a dense model."""
    config = model.config
    family = family_of(config)
    if family is None:
        return None
    routing = Routing(
        family,
        num_layers=config.num_hidden_layers,
        num_experts=family.num_experts(config),
        top_k=family.top_k(config),
        replay=replay,
        aux_loss_coef=aux_loss_coef,
    )
    routing.install(model)
    if ref_model is not None:
        routing.install(ref_model)
    return routing


def lora_targets(config, target_modules: list[str], experts: bool) -> dict[str, list[str]]:
    """peft's ``target_modules`` and ``target_parameters`` for ``model.lora``: as configured on a
    dense model; on a MoE model the default list means the family's attention projections, and
    ``experts`` adds the experts' fused weights (peft's ParamWrapper, which adapts each expert
    with its own rank-r pair)."""
    family = family_of(config)
    if family is None:
        if experts:
            raise ValueError("model.lora.experts: the model is not a mixture of experts")
        return {"target_modules": list(target_modules)}
    modules = list(target_modules)
    if modules == DENSE_LORA_DEFAULT:
        modules = list(family.attention_modules)
    targets = {"target_modules": modules}
    if experts:
        targets["target_parameters"] = list(family.expert_parameters)
    return targets


def checkpoint_layout(model) -> Callable[[str, torch.Tensor], Iterable] | None:
    """A function from one of the trainer's (HF, merged) tensors to the tensors of the model's
    checkpoint layout, which vLLM's loader reads: transformers 5 fuses each layer's experts into
    ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I] (and renames some
    modules, Mixtral's ``block_sparse_moe``), and saves them back per expert; this is that
    reversal, one tensor at a time. None for a dense model (the names are the checkpoint's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if family_of(base.config) is None:
        return None
    from transformers.core_model_loading import revert_weight_conversion

    def to_checkpoint(name: str, tensor: torch.Tensor):
        return revert_weight_conversion(base, {name: tensor}).items()

    return to_checkpoint
