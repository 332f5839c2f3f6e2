"""The GRPO family as small pure tensor functions, chosen by name from registries.

Shapes: P prompts, G completions per prompt, B = P*G sequences, T completion tokens.
No function here reads a config object, does I/O or talks to other processes.

Variants are added with the ``register_*`` decorators; a config names the key, and an
unknown key fails at start-up listing the known ones (rl.config.validate).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
AdvantageFn = Callable[..., Tensor]
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
AggregationFn = Callable[..., Tensor]

ADVANTAGES: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
LOSS_AGGREGATIONS: dict[str, AggregationFn] = {}
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}


def _register(registry: dict, name: str):
    def decorate(fn):
        registry[name] = fn
        return fn

    return decorate


def register_advantage(name: str):
    return _register(ADVANTAGES, name)


def register_policy_loss(name: str):
    return _register(POLICY_LOSSES, name)


def register_loss_aggregation(name: str):
    return _register(LOSS_AGGREGATIONS, name)


def register_kl_estimator(name: str):
    return _register(KL_ESTIMATORS, name)


# ------------------------------------------------------------------------------ advantages

STD_EPS = 1e-4  # as TRL: keeps a near-constant group from exploding


def _scale(centered: Tensor, rewards: Tensor, scale: str) -> Tensor:
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    if scale == "batch":
        return centered / (rewards.std() + STD_EPS)
    if scale == "none":
        return centered
    raise ValueError(f"scale must be group, batch or none, not {scale!r}")


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, scale: str = "group") -> Tensor:
    """Group-relative advantages, DeepSeekMath (Shao et al. 2024, eq. 3 outcome supervision).

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as in TRL.
    ``scale="batch"`` divides by the batch std instead (Liu et al. 2025 discuss the bias of the
    group std); ``"none"`` only centres.

    rewards: [P, G] -> advantages [P, G]
    """
    return _scale(rewards - rewards.mean(dim=1, keepdim=True), rewards, scale)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, scale: str = "none") -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): centre only.

    A_i = r_i - mean(r_group). The paper removes the std division because it up-weights
    questions that are too easy or too hard; ``scale`` is accepted for a uniform signature
    and applied if not "none".

    rewards: [P, G] -> advantages [P, G]
    """
    return _scale(rewards - rewards.mean(dim=1, keepdim=True), rewards, scale)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, scale: str = "none") -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024).

    A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean(r_group)).

    rewards: [P, G] -> advantages [P, G]
    """
    group_size = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return _scale(rewards - baseline, rewards, scale)


# ------------------------------------------------------------------------------ KL estimators


@register_kl_estimator("k1")
def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref (Schulman 2020, "Approximating KL divergence"). [B, T] -> [B, T]"""
    return logps - ref_logps


@register_kl_estimator("k2")
def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2 (Schulman 2020). [B, T] -> [B, T]"""
    return 0.5 * (logps - ref_logps) ** 2


@register_kl_estimator("k3")
def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1, unbiased and >= 0 (Schulman 2020); GRPO's
    choice (Shao et al. 2024, eq. 4). [B, T] -> [B, T]"""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


# ------------------------------------------------------------------------------ policy losses


@register_policy_loss("clip")
def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), as used by GRPO, with DAPO's
    decoupled clip range (Yu et al. 2025, "clip-higher": epsilon_high > epsilon_low).

    loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),  r_t = exp(logp_t - old_logp_t)

    logps, old_logps, mask: [B, T]; advantages: [B] -> per-token loss [B, T] and
    clip fractions (over masked tokens).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    per_token_loss = -torch.min(unclipped, clipped)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        clipped_low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
        clipped_high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
        stats = {
            "clip_ratio/low": (clipped_low * mask).sum() / tokens,
            "clip_ratio/high": (clipped_high * mask).sum() / tokens,
            "ratio/mean": (ratio * mask).sum() / tokens,
        }
    return per_token_loss, stats


# ------------------------------------------------------------------------------ aggregation
# Each returns this micro-batch's share of the batch loss, so that summing the shares over the
# micro-batches of one optimisation batch gives the loss of the whole batch.
#   num_sequences, num_tokens: sequences and unmasked tokens in the whole optimisation batch.


@register_loss_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """GRPO (Shao et al. 2024, eq. 3): mean over each sequence's tokens, then over sequences.
    [B, T] -> scalar"""
    per_sequence = (per_token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_sequence.sum() / num_sequences


@register_loss_aggregation("token_mean")
def token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """DAPO (Yu et al. 2025, eq. 12): mean over every token of the batch, so long completions
    weigh in proportion to their length. [B, T] -> scalar"""
    return (per_token_loss * mask).sum() / max(num_tokens, 1)


@register_loss_aggregation("token_sum_norm")
def token_sum_norm(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): token sum divided by a constant, sequences x the maximum
    completion length, which removes GRPO's length bias. [B, T] -> scalar"""
    return (per_token_loss * mask).sum() / (num_sequences * max_completion_length)
