"""The GRPO family as small pure tensor functions, chosen by name from registries.

Shapes: P prompts, G completions per prompt, B sequences (B = P*G in a generation batch, fewer in
a micro-batch), T completion tokens. No function here reads a config object, does I/O or talks to
other processes.

    advantages.py   rewards [P, G] -> advantages [P, G]: grpo, dr_grpo, rloo
    losses.py       per-token policy losses (clip with dual clip, gspo, cispo) and KL k1/k2/k3
    aggregation.py  per-token loss [B, T] -> this micro-batch's share of the batch loss
    sampling.py     the sampler/trainer importance-sampling correction and DAPO's group filter
    distill.py      on-policy distillation: the teacher's per-token term of the advantage
    objective.py    the per-micro-batch loss composed from the above

Variants are added with the ``register_*`` decorators; a config names the key, and an unknown
key fails at start-up listing the known ones (rl.config.validate).
"""

from rl.algorithms.advantages import (  # noqa: E402  (registers)
    STD_EPS,
    dr_grpo_advantages,
    grpo_advantages,
    rloo_advantages,
)
from rl.algorithms.aggregation import (  # noqa: E402
    bnpo,
    seq_mean_token_mean,
    token_mean,
    token_sum_norm,
)
from rl.algorithms.distill import reverse_kl_advantages  # noqa: E402
from rl.algorithms.losses import (  # noqa: E402
    cispo_policy_loss,
    clipped_policy_loss,
    gspo_policy_loss,
    kl_k1,
    kl_k2,
    kl_k3,
)
from rl.algorithms.objective import objective
from rl.algorithms.registry import (
    ADVANTAGES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SAMPLER_CORRECTIONS,
    TEACHER_ADVANTAGES,
    masked_mean,
    per_token,
    register_advantage,
    register_kl_estimator,
    register_loss_aggregation,
    register_policy_loss,
    register_sampler_correction,
    register_teacher_advantage,
)
from rl.algorithms.sampling import (  # noqa: E402
    informative_groups,
    sequence_mask,
    sequence_truncate,
    token_mask,
    token_truncate,
)

__all__ = [
    "ADVANTAGES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "SAMPLER_CORRECTIONS",
    "STD_EPS",
    "TEACHER_ADVANTAGES",
    "bnpo",
    "cispo_policy_loss",
    "clipped_policy_loss",
    "dr_grpo_advantages",
    "grpo_advantages",
    "gspo_policy_loss",
    "informative_groups",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "objective",
    "per_token",
    "register_advantage",
    "register_kl_estimator",
    "register_loss_aggregation",
    "register_policy_loss",
    "register_sampler_correction",
    "register_teacher_advantage",
    "reverse_kl_advantages",
    "rloo_advantages",
    "seq_mean_token_mean",
    "sequence_mask",
    "sequence_truncate",
    "token_mask",
    "token_mean",
    "token_sum_norm",
    "token_truncate",
]
