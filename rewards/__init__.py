"""Rule-based reward functions with TRL's signature ``fn(prompts, completions, **columns)``."""

from rewards.registry import (
    RewardFn,
    UnknownRewardError,
    get_reward,
    list_rewards,
    register_reward,
)
from rewards.text import completion_text

__all__ = [
    "RewardFn",
    "UnknownRewardError",
    "completion_text",
    "get_reward",
    "list_rewards",
    "register_reward",
]
