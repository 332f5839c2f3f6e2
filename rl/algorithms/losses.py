"""Per-token policy losses and KL estimators.

A policy loss takes the trainer's log-probs (with grad), the old (behaviour) log-probs, the
advantages (one per sequence [B], or one per token [B, T]: on-policy distillation's) and the
completion mask, and returns the per-token loss [B, T] (masked and reduced
later by an aggregation) and detached statistics. All share one keyword signature so the trainer
calls them alike: ``epsilon_low``, ``epsilon_high``, ``clip_ratio_c``.
"""

from __future__ import annotations

import torch

from rl.algorithms.registry import (
    masked_mean,
    per_token,
    register_kl_estimator,
    register_policy_loss,
)

Tensor = torch.Tensor


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
    choice (Shao et al. 2024, eq. 4) and the only one TRL 1.16 has. [B, T] -> [B, T]"""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


# ------------------------------------------------------------------------------ policy losses


def _ratio_stats(
    ratio: Tensor, advantages: Tensor, mask: Tensor, low: Tensor, high: Tensor
) -> dict[str, Tensor]:
    """Clip fractions over the masked tokens and ratio statistics. ratio [B, T] or [B, 1]."""
    with torch.no_grad():
        ratio = ratio.expand_as(mask)
        present = mask > 0
        values = ratio[present] if present.any() else ratio.new_ones(1)
        return {
            "clip_ratio/low": masked_mean(low.expand_as(mask).float(), mask),
            "clip_ratio/high": masked_mean(high.expand_as(mask).float(), mask),
            "ratio/mean": masked_mean(ratio, mask),
            "ratio/min": values.min(),
            "ratio/max": values.max(),
        }


def _clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    clip_ratio_c: float | None,
) -> Tensor:
    """-min(r A, clip(r) A), and with dual clip, for A < 0, at most -c A."""
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    if clip_ratio_c is not None:
        # Dual clip (Ye et al. 2020): with a negative advantage a huge ratio would make the
        # loss unbounded; cap it at c * |A| (zero gradient beyond).
        capped = torch.minimum(loss, -clip_ratio_c * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    return loss


@register_policy_loss("clip")
def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    clip_ratio_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7) as used by GRPO (Shao et
    al. 2024, eq. 3), with DAPO's decoupled range (Yu et al. 2025, arXiv:2503.14476, "clip-higher":
    epsilon_high > epsilon_low) and optional dual clip (Ye et al. 2020, arXiv:1912.09729, eq. 5;
    verl's ``clip_ratio_c``, typically 3).

        r_t = exp(logp_t - old_logp_t)
        loss_t = max(-r_t A, -clip(r_t, 1 - eps_low, 1 + eps_high) A)
        dual clip, A < 0:  loss_t = min(loss_t, -c A)

    Equal to TRL 1.16's token-level loss; TRL's ``delta`` (INTELLECT-2's two-sided clip) caps the
    ratio for every sign of A, which gives the same loss and gradient as dual clip whenever
    c > 1 + eps_high (the positive-A branch is already capped by the clip).

    logps, old_logps, mask: [B, T]; advantages: [B] or [B, T] -> per-token loss [B, T], stats
    """
    ratio = torch.exp(logps - old_logps)
    adv = per_token(advantages)
    loss = _clipped_surrogate(ratio, adv, epsilon_low, epsilon_high, clip_ratio_c)
    stats = _ratio_stats(
        ratio,
        adv,
        mask,
        (ratio < 1 - epsilon_low) & (adv < 0),
        (ratio > 1 + epsilon_high) & (adv > 0),
    )
    return loss, stats


@register_policy_loss("gspo")
def gspo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    clip_ratio_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071, eqs. 5-7): one length-normalised importance
    ratio per sequence, clipped per sequence.

        s_i = exp( mean_t (logp_t - old_logp_t) )      (mean over the completion's tokens)
        loss_i = max(-s_i A_i, -clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    The per-sequence loss is broadcast over the sequence's tokens so any aggregation applies;
    with ``seq_mean_token_mean`` this is the paper's (1/G) sum_i loss_i. Equal to TRL 1.16's
    ``importance_sampling_level="sequence"``. The paper's ranges are tiny (3e-4, 4e-4) because
    the ratio is a per-token geometric mean. Dual clip, if set, applies to s_i.

    Per-token advantages A_{i,t} (on-policy distillation's) take the paper's GSPO-token
    (eqs. 13-14), whose ratio has the value s_i and the gradient of token t alone:

        s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]
        loss_{i,t} = max(-s_{i,t} A_{i,t}, -clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t})

    so a sequence is still clipped as a whole (by s_i), and each token is pushed by its own
    advantage. With every A_{i,t} = A_i its loss and gradient are GSPO's (the paper's remark;
    the sequence path is kept for [B] advantages, as TRL's ``"sequence"`` level).

    logps, old_logps, mask: [B, T]; advantages: [B] or [B, T] -> per-token loss [B, T], stats
    """
    log_ratio = ((logps - old_logps) * mask).sum(dim=1, keepdim=True) / mask.sum(
        dim=1, keepdim=True
    ).clamp(min=1)
    ratio = torch.exp(log_ratio)  # [B, 1]
    adv = per_token(advantages)
    if advantages.dim() == 2:  # GSPO-token: value s_i, gradient through each token's logp
        ratio = torch.exp(log_ratio.detach() + logps - logps.detach())  # [B, T]
    loss = _clipped_surrogate(ratio, adv, epsilon_low, epsilon_high, clip_ratio_c)
    stats = _ratio_stats(
        ratio,
        adv,
        mask,
        (ratio < 1 - epsilon_low) & (adv < 0),
        (ratio > 1 + epsilon_high) & (adv > 0),
    )
    return loss.expand_as(logps), stats


@register_policy_loss("cispo")
def cispo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon_low: float = 1.0,
    epsilon_high: float = 4.0,
    clip_ratio_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4): clip the importance weight, not the update,
    and stop its gradient, so every token keeps a gradient (clipped tokens are not dropped).

        w_t = sg( clip(r_t, 1 - eps_low, 1 + eps_high) )
        loss_t = -w_t A logp_t

    The paper disables the lower bound (large eps_low; eps_low = 1 makes it 0) and tunes only
    the upper. TRL 1.16's ``loss_type="cispo"`` clamps with ``max=epsilon_high`` and no lower
    bound, so TRL's epsilon_high is 1 + ours (ScaleRL's eps_max = 5 is our epsilon_high = 4).
    ``clip_ratio_c`` is ignored. The loss value is not 0 on-policy (it is -A logp), its gradient
    is the policy gradient.

    logps, old_logps, mask: [B, T]; advantages: [B] or [B, T] -> per-token loss [B, T], stats
    """
    ratio = torch.exp(logps - old_logps)
    weight = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high).detach()
    adv = per_token(advantages)
    loss = -weight * adv * logps
    stats = _ratio_stats(ratio, adv, mask, ratio < 1 - epsilon_low, ratio > 1 + epsilon_high)
    return loss, stats
