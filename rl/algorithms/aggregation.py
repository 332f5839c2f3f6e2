"""Loss aggregations: per-token loss [B, T] -> a scalar.

Each returns this micro-batch's share of the optimisation batch's loss, so that summing the
shares over the micro-batches gives the loss of the whole batch and micro-batching does not
change the gradient (except ``bnpo``, local by definition).
    num_sequences, num_tokens: sequences and unmasked tokens in the whole optimisation batch
    max_completion_length: the generation budget (rollout.max_tokens)
"""

from __future__ import annotations

import torch

from rl.algorithms.registry import register_loss_aggregation

Tensor = torch.Tensor


@register_loss_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """GRPO (Shao et al. 2024, eq. 3): mean over each sequence's tokens, then over sequences.
    TRL 1.16 ``loss_type="grpo"`` (there: mean over the micro-batch / accumulation steps; equal
    when micro-batches are of equal size). [B, T] -> scalar"""
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
    """DAPO (Yu et al. 2025, eq. 12): mean over every token of the optimisation batch, so long
    completions weigh in proportion to their length. TRL 1.16 ``loss_type="dapo"`` and
    ``"cispo"``, which divide by the generation batch's tokens / steps_per_generation (an average
    per optimizer step); equal with one mini-batch per generation batch. [B, T] -> scalar"""
    return (per_token_loss * mask).sum() / max(num_tokens, 1)


@register_loss_aggregation("token_sum_norm")
def token_sum_norm(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, eq. 3): token sum divided by a constant,
    sequences x the maximum completion length, which removes GRPO's length bias. TRL 1.16
    ``loss_type="dr_grpo"``. [B, T] -> scalar"""
    return (per_token_loss * mask).sum() / (num_sequences * max_completion_length)


@register_loss_aggregation("bnpo")
def bnpo(
    per_token_loss: Tensor,
    mask: Tensor,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Tensor:
    """BNPO as TRL 1.16 ``loss_type="bnpo"``: token mean over the local (micro-)batch, then
    averaged over micro-batches (weighted by their share of sequences, i.e. TRL's division by the
    accumulation steps when micro-batches are equal). Depends on the micro-batch size by design;
    with one micro-batch it is ``token_mean``. (Xiao et al. 2025's BNPO adds adaptive Beta
    normalisation of rewards, not implemented.) [B, T] -> scalar"""
    local = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    return local * per_token_loss.shape[0] / num_sequences
