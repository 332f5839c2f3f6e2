"""The math reward: answer extraction, equivalence checking in a worker pool, and the
registered ``math`` reward. See :mod:`rewards.math.reward` for the pipeline."""

from rewards.math.extract import DEFAULT_ORDER, STRATEGIES, extract_answer
from rewards.math.pool import CheckerPool, Verdict, get_pool
from rewards.math.reward import answers_equal, check_many, decide_fast, gold_answer, math_reward

__all__ = [
    "DEFAULT_ORDER",
    "STRATEGIES",
    "CheckerPool",
    "Verdict",
    "answers_equal",
    "check_many",
    "decide_fast",
    "extract_answer",
    "get_pool",
    "gold_answer",
    "math_reward",
]
