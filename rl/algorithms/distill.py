"""On-policy distillation's part of the advantage: a frozen teacher grades every token the
student sampled (per token, not per sequence), and the grade is added to the rewards' group
advantage. No gradient flows through it: it is a reward, as in RL.
"""

from __future__ import annotations

import torch

from rl.algorithms.registry import per_token, register_teacher_advantage

Tensor = torch.Tensor


@register_teacher_advantage("reverse_kl")
def reverse_kl_advantages(
    advantages: Tensor, logps: Tensor, teacher_logps: Tensor, coef: float
) -> Tensor:
    """The per-token reverse KL to the teacher as a negative reward (Thinking Machines 2025,
    "On-Policy Distillation"; Agarwal et al. 2024, arXiv:2306.13649, GKD with on-policy student
    samples and the reverse KL, estimated on the sampled token instead of summed over the
    vocabulary):

        A_{i,t} = A_i - coef * (logp_{i,t} - teacher_logp_{i,t})

    logp: the student's log-prob of its own sampled token (the behaviour policy's, the one it
    was sampled with); teacher_logp: the teacher's log-prob of that token after the same prompt
    and completion prefix. Over the student's samples, logp - teacher_logp averages to
    KL(student || teacher) at each position, so the policy gradient with this advantage lowers
    the reverse KL (mode seeking: the student is pushed off what the teacher finds unlikely).
    Each token's term is its own, not summed over the tokens after it (Thinking Machines'
    discount of zero). ``A_i`` is the rewards' group advantage (0 everywhere with no rewards:
    pure distillation).

    advantages: [B] or [B, T]; logps, teacher_logps: [B, T] -> advantages [B, T] (no grad)
    """
    return (per_token(advantages) - coef * (logps - teacher_logps)).detach()
