"""What a multi-turn rollout adds to the logs: metrics, samples.jsonl's turns, readable
transcripts, and the columns rewards receive. Single-turn rollouts add nothing."""

from __future__ import annotations

from typing import Any

from rollouts.record import Rollout


def turn_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """tools/*: per trajectory, the model's turns, the tool calls, whether one was well formed
    (it parsed, whatever the tool then said); per call, the errors; the environment's tokens."""
    multi = [r for r in rollouts if r.model_mask is not None]
    if not multi:
        return {}
    count = len(multi)
    results = [t for r in multi for t in r.turns if t.role == "tool"]
    return {
        "tools/turns/mean": sum(_assistant_turns(r) for r in multi) / count,
        "tools/calls/mean": len(results) / count,
        "tools/well_formed_frac": sum(_well_formed(r) for r in multi) / count,
        "tools/error_frac": sum(t.error for t in results) / len(results) if results else 0.0,
        "tools/env_tokens/mean": sum(len(r.model_mask) - r.model_tokens for r in multi) / count,
        "tools/max_turns_frac": sum(r.finish_reason == "max_turns" for r in multi) / count,
    }


def _assistant_turns(rollout: Rollout) -> int:
    return sum(t.role == "assistant" for t in rollout.turns)


def _well_formed(rollout: Rollout) -> bool:
    return any(t.role == "assistant" and t.tool_calls for t in rollout.turns)


def turn_summary(rollout: Rollout) -> dict[str, Any]:
    """samples.jsonl's extra fields for a multi-turn rollout: the turns in TRL's message form
    (an error result marked), the model's and the environment's token counts."""
    if rollout.model_mask is None:
        return {}
    turns = []
    for turn in rollout.turns:
        message = turn.as_message()
        if turn.error:
            message["error"] = True
        turns.append(message)
    summary: dict[str, Any] = {
        "turns": turns,
        "model_tokens": rollout.model_tokens,
        "env_tokens": len(rollout.model_mask) - rollout.model_tokens,
    }
    if rollout.environment_reward is not None or rollout.environment_error is not None:
        summary["environment_reward"] = rollout.environment_reward
        summary["environment_error"] = rollout.environment_error
    return summary


def transcript(turns: list[dict[str, Any]]) -> str:
    """samples.jsonl turns as readable text: one block per turn, calls and results labelled."""
    blocks = []
    for turn in turns:
        if turn.get("role") == "tool":
            label = f"[tool {turn.get('name') or '?'}{' error' if turn.get('error') else ''}]"
            blocks.append(f"{label} {turn.get('content', '')}")
            continue
        text = f"[assistant] {turn.get('content', '')}".rstrip()
        for call in turn.get("tool_calls") or []:
            function = call.get("function", {})
            text += f"\n  -> {function.get('name')}({_arguments(function.get('arguments'))})"
        blocks.append(text)
    return "\n".join(blocks)


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, dict):
        return ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return str(arguments)


def reward_columns(rollouts: list[Rollout]) -> dict[str, list[Any]]:
    """Extra reward keyword arguments: ``environment_rewards``, each trajectory's get_reward()
    value, or the text of why there is none; absent without an environment reward."""
    if not any(r.environment_reward is not None or r.environment_error for r in rollouts):
        return {}
    return {
        "environment_rewards": [
            r.environment_error if r.environment_error else r.environment_reward for r in rollouts
        ]
    }
