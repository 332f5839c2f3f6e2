"""What the sampler hands the learner: the rollout engine/trainer importance-sampling correction
and DAPO's dynamic-sampling group filter.

The correction weighs each token's (or sequence's) loss by pi_old / pi_sampler, where pi_sampler
is the rollout engine's log-prob (vLLM's numerics, fp8 or a stale version differ from the
trainer's) and pi_old the trainer's before the update. Four modes, as TRL 1.16's
``vllm_importance_sampling_mode`` (Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training", truncated IS; masked IS as in Liu et al. 2025's "MIS"):

    token_truncate     w_t = min(max(r_t, c_min), c_max)
    token_mask         w_t = r_t if c_min <= r_t <= c_max else 0
    sequence_truncate  w_i = clamp(prod_t r_t, c_min, c_max), one weight per sequence
    sequence_mask      w_i = prod_t r_t if within [c_min, c_max] else 0 (TRL's default)

with r_t = exp(old_logp_t - sampler_logp_t). ``c_min`` None means no lower bound. A NaN sampler
log-prob (unknown) counts as no gap, as in TRL.
"""

from __future__ import annotations

import math

import torch

from rl.algorithms.registry import register_sampler_correction

Tensor = torch.Tensor


def _log_gap(old_logps: Tensor, sampler_logps: Tensor, mask: Tensor, per_sequence: bool) -> Tensor:
    diff = torch.nan_to_num((old_logps - sampler_logps) * mask, nan=0.0)
    return diff.sum(dim=1, keepdim=True) if per_sequence else diff


def _stats(weights: Tensor, mask: Tensor, dropped: Tensor | None) -> dict[str, Tensor]:
    # per-token weights count on completion tokens, per-sequence ones on non-empty sequences
    present = (mask > 0) if weights.shape == mask.shape else (mask.sum(dim=1, keepdim=True) > 0)
    values = weights[present] if present.any() else weights.new_ones(1)
    stats = {
        "sampling/importance_sampling_ratio/mean": values.mean(),
        "sampling/importance_sampling_ratio/min": values.min(),
        "sampling/importance_sampling_ratio/max": values.max(),
    }
    if dropped is not None:
        stats["sampling/importance_sampling_masked"] = dropped[present].float().mean()
    return stats


def _truncate(log_gap: Tensor, mask: Tensor, clip_min: float | None, clip_max: float | None):
    weights = torch.clamp(torch.exp(log_gap), min=clip_min, max=clip_max)
    return weights, _stats(weights, mask, None)


def _mask(log_gap: Tensor, mask: Tensor, clip_min: float | None, clip_max: float | None):
    ratio = torch.exp(log_gap)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    dropped = (ratio < low) | (ratio > high)
    weights = ratio.masked_fill(dropped, 0.0)
    return weights, _stats(weights, mask, dropped)


@register_sampler_correction("token_truncate")
def token_truncate(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated IS per token. [B, T] x3 -> weights [B, T] (no grad), stats"""
    return _truncate(_log_gap(old_logps, sampler_logps, mask, False), mask, clip_min, clip_max)


@register_sampler_correction("token_mask")
def token_mask(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked IS per token: tokens whose ratio leaves the bounds get weight 0.
    [B, T] x3 -> weights [B, T], stats"""
    return _mask(_log_gap(old_logps, sampler_logps, mask, False), mask, clip_min, clip_max)


@register_sampler_correction("sequence_truncate")
def sequence_truncate(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated IS per sequence (product of token ratios). [B, T] x3 -> weights [B, 1], stats"""
    return _truncate(_log_gap(old_logps, sampler_logps, mask, True), mask, clip_min, clip_max)


@register_sampler_correction("sequence_mask")
def sequence_mask(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked IS per sequence: a sequence whose ratio leaves the bounds is dropped.
    [B, T] x3 -> weights [B, 1], stats"""
    return _mask(_log_gap(old_logps, sampler_logps, mask, True), mask, clip_min, clip_max)


def informative_groups(rewards: Tensor, tolerance: float = 1e-6) -> Tensor:
    """DAPO's dynamic sampling filter (Yu et al. 2025, eq. 11: 0 < |{o_i correct}| < G): keep a
    group unless all its rewards are equal, since such a group has zero advantage everywhere and
    only dilutes the batch. Generalised from accuracy to any reward by the range.

    rewards: [P, G] -> keep [P] bool
    """
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > tolerance
