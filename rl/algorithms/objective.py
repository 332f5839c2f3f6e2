"""The whole per-micro-batch objective, composed from the registries: what the trainer
differentiates and what the TRL parity tests compare."""

from __future__ import annotations

import torch

from rl.algorithms.registry import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    masked_mean,
)

Tensor = torch.Tensor


def objective(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    policy_loss: str,
    aggregation: str,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
    epsilon_low: float,
    epsilon_high: float,
    clip_ratio_c: float | None = None,
    sampler_weights: Tensor | None = None,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the optimisation batch's loss:

        aggregate( policy_loss(logps, old_logps, A) * w_sampler + beta * KL(logps, ref_logps) )

    The sampler IS weight multiplies the policy term only and the KL term is not reweighted, as
    in TRL 1.16 (``use_bias_correction_kl=False``) and verl.

    logps (with grad), old_logps, mask, ref_logps: [B, T]; advantages: [B];
    sampler_weights: [B, T] or [B, 1] -> scalar loss, detached stats
    """
    per_token_loss, stats = POLICY_LOSSES[policy_loss](
        logps,
        old_logps,
        advantages,
        mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        clip_ratio_c=clip_ratio_c,
    )
    if sampler_weights is not None:
        per_token_loss = per_token_loss * sampler_weights
    if beta > 0:
        kl = KL_ESTIMATORS[kl_estimator](logps, ref_logps)
        per_token_loss = per_token_loss + beta * kl
        stats = {**stats, "kl": masked_mean(kl.detach(), mask)}
    loss = LOSS_AGGREGATIONS[aggregation](
        per_token_loss,
        mask,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
    )
    return loss, stats
