"""Rollout engines: sample G completions per prompt and return `Rollout` records."""

from rollouts.record import FinishReason, Prompt, Rollout, Turn

__all__ = ["FinishReason", "Prompt", "Rollout", "Turn"]
