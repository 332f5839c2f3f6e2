"""The whole per-micro-batch objective, composed from the registries: what the trainer
differentiates and what the TRL parity tests compare."""

from __future__ import annotations

import torch

from rl.algorithms.registry import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    TEACHER_ADVANTAGES,
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
    teacher_logps: Tensor | None = None,
    teacher_coef: float = 1.0,
    teacher_advantage: str = "reverse_kl",
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the optimisation batch's loss:

        aggregate( policy_loss(logps, old_logps, A) * w_sampler + beta * KL(logps, ref_logps) )

    The sampler IS weight multiplies the policy term only and the KL term is not reweighted, as
    in TRL 1.16 (``use_bias_correction_kl=False``) and verl.

    With ``teacher_logps`` (on-policy distillation) the advantage becomes per token, A + the
    teacher's term (``teacher_advantage``, reverse_kl: -coef * (old_logps - teacher_logps)),
    taken against the behaviour log-probs ``old_logps``: the policy the tokens were sampled
    from, fixed for the whole update.

    logps (with grad), old_logps, mask, ref_logps, teacher_logps: [B, T]; advantages: [B] or
    [B, T]; sampler_weights: [B, T] or [B, 1] -> scalar loss, detached stats
    """
    distill_stats = {}
    if teacher_logps is not None:
        advantages = TEACHER_ADVANTAGES[teacher_advantage](
            advantages, old_logps, teacher_logps, teacher_coef
        )
        distill_stats = {
            "distill/reverse_kl": masked_mean((old_logps - teacher_logps).detach(), mask),
            "distill/teacher_logp": masked_mean(teacher_logps, mask),
        }
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
    stats = {**stats, **distill_stats}
    loss = LOSS_AGGREGATIONS[aggregation](
        per_token_loss,
        mask,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
    )
    return loss, stats
