"""Advantage estimators: rewards [P, G] (P prompts, G completions each) -> advantages [P, G].

All three are outcome-level: every token of a completion gets its completion's advantage.
``scale`` is one of "group" (divide by the group's std), "batch" (by the whole batch's std,
as TRL's ``scale_rewards="batch"``) or "none" (centre only).
"""

from __future__ import annotations

import torch

from rl.algorithms.registry import register_advantage

Tensor = torch.Tensor

STD_EPS = 1e-4  # as TRL: keeps a near-constant group from exploding


def _scale(centered: Tensor, rewards: Tensor, scale: str) -> Tensor:
    # std is the unbiased one (n - 1), as TRL's nanstd and torch's default.
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    if scale == "batch":
        return centered / (rewards.std() + STD_EPS)
    if scale == "none":
        return centered
    raise ValueError(f"scale must be group, batch or none, not {scale!r}")


@register_advantage("grpo")
def grpo_advantages(rewards: Tensor, scale: str = "group") -> Tensor:
    """Group-relative advantages, DeepSeekMath (Shao et al. 2024, arXiv:2402.03300, §4.1.2,
    outcome supervision).

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps). Same as TRL 1.16 (eps = 1e-4, unbiased
    std). ``scale="batch"`` divides by the batch std of the rewards instead (TRL's
    ``scale_rewards="batch"``; Liu et al. 2025 show the group std's difficulty bias); ``"none"``
    only centres. A group with all-equal rewards gets zero advantages.

    rewards: [P, G] -> advantages [P, G]
    """
    return _scale(rewards - rewards.mean(dim=1, keepdim=True), rewards, scale)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, scale: str = "none") -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, "Understanding R1-Zero-Like Training",
    eq. 3): centre only, A_i = r_i - mean(r_group).

    The paper removes the std division because it up-weights questions that are too easy or too
    hard. TRL expresses this as ``scale_rewards="none"``. ``scale`` is accepted for a uniform
    signature and applied if not "none" (then it is plain GRPO).

    rewards: [P, G] -> advantages [P, G]
    """
    return _scale(rewards - rewards.mean(dim=1, keepdim=True), rewards, scale)


@register_advantage("rloo")
def rloo_advantages(rewards: Tensor, scale: str = "none") -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
    free"; Ahmadian et al. 2024, arXiv:2402.14740, eq. 6).

    A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean(r_group)), as TRL 1.16's RLOOTrainer
    (without unscorable rows). Difference: TRL's ``normalize_advantages`` standardises the
    advantages by their own batch std; here ``scale`` divides by the rewards' std like GRPO's.

    rewards: [P, G] -> advantages [P, G]
    """
    group_size = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return _scale(rewards - baseline, rewards, scale)
