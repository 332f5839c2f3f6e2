"""Pure tensor functions behind the MoE metrics and the load-balancing loss."""

from __future__ import annotations

import math

import torch


def differing_choices(own: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """Whether two top-k choices differ as sets of experts (the order of the k is the router's
    ranking, which the experts' weighted sum ignores).

    own, given [N, K] expert indices -> [N] bool
    """
    return (own.sort(dim=-1).values != given.sort(dim=-1).values).any(dim=-1)


def expert_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many (token, slot) assignments each expert got. index [N, K] -> [E] float64"""
    return torch.bincount(index.reshape(-1), minlength=num_experts).to(torch.float64)


def load_entropy(counts: torch.Tensor) -> torch.Tensor:
    """The entropy of each layer's load over its experts, divided by log E: 1 when every expert
    takes the same share, 0 when one takes everything.

    counts [L, E] -> [L] (nan for a layer that routed nothing)
    """
    shares = counts / counts.sum(dim=-1, keepdim=True)
    entropy = -(shares * shares.clamp(min=1e-300).log()).sum(dim=-1)
    return entropy / math.log(counts.shape[-1])


def switch_balance_loss(probs: torch.Tensor, index: torch.Tensor, num_experts: int):
    """Switch Transformer's load-balancing loss (Fedus et al. 2022, eq. 4), as transformers'
    ``load_balancing_loss_func`` for one layer: E * sum_e f_e * P_e, with f_e the fraction of
    assignments routed to expert e (no gradient) and P_e the mean router probability of e
    (the gradient's path). 1 for a perfectly balanced router, E when one expert takes all.

    probs [N, E] (the family's probabilities over experts), index [N, K] -> scalar
    """
    fraction = expert_counts(index, num_experts).to(probs.dtype) / max(index.numel(), 1)
    return num_experts * (fraction * probs.mean(dim=0)).sum()
