"""What the training step logs about its rollouts: the response-length and tool-use metrics, and
samples.jsonl's row per rollout (each turn, call and result of a multi-turn one)."""

from __future__ import annotations

from typing import Any

from rollouts.agent.summary import turn_metrics, turn_summary
from rollouts.record import Rollout


def rollout_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    lengths = [r.model_tokens for r in rollouts]  # the model's: tool results are not counted
    return {
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": float(max(lengths)),
        "response_length/clip_ratio": sum(r.truncated for r in rollouts) / len(rollouts),
        **turn_metrics(rollouts),
    }


def rollout_summary(rollout: Rollout) -> dict[str, Any]:
    messages = rollout.prompt.messages
    prompt_text = messages[-1]["content"] if isinstance(messages, list) else messages
    return {
        "prompt": prompt_text,
        "completion": rollout.response,
        "answer": rollout.prompt.row.get("answer"),
        "rewards": rollout.rewards,
        "reward": rollout.reward,
        "advantage": rollout.advantage,
        "finish_reason": rollout.finish_reason,
        "completion_tokens": len(rollout.completion_ids),
        "policy_version": rollout.policy_version,
        "group": rollout.group,
        **turn_summary(rollout),  # multi-turn: each turn, call and result
    }
