"""The ``env`` reward: a TRL environment's own score, its ``get_reward()`` when a trajectory
ends (read by the turn loop, rollouts/agent/loop.py, before the instance is dropped).

TRL adds such an environment as a reward source of weight 1 under its class name; aha adds
``env`` (weight 1) to the configured rewards when ``rollout.environment`` has a ``get_reward``
and the config does not list ``env`` itself (which it may, to give it another weight).
"""

from __future__ import annotations

from typing import Any

from rewards.registry import register_reward


@register_reward("env")
def environment_reward(
    prompts: list, completions: list, environment_rewards: list | None = None, **_: Any
) -> list[float | None]:
    """The environment's get_reward() at the end of each trajectory (rollout.environment)."""
    if environment_rewards is None:  # no environment, or one without get_reward
        return [None] * len(completions)
    for index, value in enumerate(environment_rewards):
        if isinstance(value, str):  # get_reward raised, timed out or gave no number
            raise ValueError(f"row {index}: {value}")
    return list(environment_rewards)
