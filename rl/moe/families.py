"""The mixture-of-experts families aha trains, and what each one's router does.

One ``Family`` per transformers model type. Everything that differs between them lives here:
which module is the router (the patch point: its forward returns ``(router_logits, top_k_weights,
top_k_index)`` in every family of transformers 5), how its gate weights come from its logits
for a given set of experts, which probabilities the load-balancing loss uses, which modules are
attention (LoRA's default targets) and which parameters hold the experts (LoRA on the experts,
peft's ``target_parameters``). ``family_of`` refuses a MoE model of any other type with the
reason, so nothing trains with a router aha does not know how to replay.

The gate weights of replayed experts are the family's own formula evaluated at those experts
(R3, Ma et al. 2025, arXiv 2510.11370: the sampler's routing mask, the trainer's router logits),
so the router still gets a gradient; evaluated at the router's own top-k they are exactly the
weights the unpatched router returns (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class UnsupportedMoEError(ValueError):
    """A mixture-of-experts model whose router aha cannot patch: training it would leave the
    sampler's routing unreplayed and the router statistics wrong."""


def _softmax_gates(renormalise: Callable[[torch.nn.Module], bool]):
    """Mixtral, Qwen3-MoE, OLMoE: softmax over all experts in float32, the chosen ones' values,
    divided by their sum where the family renormalises (Mixtral always; the others with
    ``norm_topk_prob``)."""

    def gates(router, logits: torch.Tensor, index: torch.Tensor, dtype: torch.dtype):
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        weights = probs.gather(1, index)  # [N, K]
        if renormalise(router):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(dtype)

    return gates


def _softmax_probs(router, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _deepseek_gates(router, logits: torch.Tensor, index: torch.Tensor, dtype: torch.dtype):
    """DeepSeek-V3: sigmoid scores (the correction bias picks experts, it never weighs them),
    normalised over the chosen ones, times ``routed_scaling_factor``."""
    scores = logits.float().sigmoid()  # [N, E]
    weights = scores.gather(1, index)  # [N, K]
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * router.routed_scaling_factor).to(dtype)


def _deepseek_probs(router, logits: torch.Tensor) -> torch.Tensor:
    scores = logits.float().sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class Family:
    """What aha needs to know about one MoE model type."""

    name: str  # transformers' model_type
    router_class: str  # the module whose forward returns (logits, top-k weights, top-k index)
    # the gate weights [N, K] of experts ``index`` [N, K] from the router's logits [N, E]
    gates: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
    # per-token probabilities over experts [N, E] for the load-balancing loss
    probs: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    attention_modules: tuple[str, ...]  # LoRA's targets unless model.lora.target_modules is set
    expert_parameters: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")

    def num_experts(self, config) -> int:
        return int(getattr(config, "num_local_experts", None) or config.num_experts)

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)


LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# DeepSeek-V3's multi-head latent attention: queries and the joint key/value go through low-rank
# down- and up-projections (q_proj itself when q_lora_rank is null).
MLA_ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "mixtral",
            "MixtralTopKRouter",
            _softmax_gates(lambda router: True),
            _softmax_probs,
            LLAMA_ATTENTION,
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeTopKRouter",
            _softmax_gates(lambda router: router.norm_topk_prob),
            _softmax_probs,
            LLAMA_ATTENTION,
        ),
        Family(
            "olmoe",
            "OlmoeTopKRouter",
            _softmax_gates(lambda router: router.norm_topk_prob),
            _softmax_probs,
            LLAMA_ATTENTION,
        ),
        Family(
            "deepseek_v3",
            "DeepseekV3TopkRouter",
            _deepseek_gates,
            _deepseek_probs,
            MLA_ATTENTION,
        ),
    )
}

# Config fields that mark a model as a mixture of experts, whatever its type.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def is_moe_config(config) -> bool:
    return any((getattr(config, name, None) or 0) > 1 for name in _EXPERT_FIELDS)


def family_of(config) -> Family | None:
    """The family of a model's config; None for a dense model. A mixture of experts of another
    type is refused with the reason."""
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is not None:
        return family
    if is_moe_config(config):
        raise UnsupportedMoEError(
            f"model.name: a mixture-of-experts model of type {config.model_type!r}, which aha "
            f"cannot train: its router is not patched for routing replay and expert statistics "
            f"(supported: {', '.join(sorted(FAMILIES))}; rl/moe/families.py adds one)"
        )
    return None


def routers(model: torch.nn.Module, family: Family) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) of every routed layer, in order. The layer index is
    the routing tensors' layer axis, as vLLM numbers it (dense layers keep their slot)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ != family.router_class:
            continue
        parts = name.split(".")
        index = next(
            (int(parts[i + 1]) for i in range(len(parts) - 1) if parts[i] == "layers"), None
        )
        if index is None:
            raise UnsupportedMoEError(f"router {name}: no decoder layer index in its name")
        found.append((index, module))
    return found
