"""Calls the reward functions on a batch of rollouts, safely.

A reward call that raises, returns anything but one finite number (or None) per completion, or
takes longer than its timeout (``algorithm.reward_timeout_s``) scores 0 for the batch, is
counted (``reward/<name>/errors``) and is reported once with the reward's name and a row; the
run goes on. With ``on_error="stop"`` (``algorithm.reward_error_policy``) it raises
:class:`RewardError` instead, naming both. Where each reward runs, and how a hung one is let go,
is rewards/isolation.py: user rewards in a worker process that is killed on a timeout, the
rest in a daemon thread per call.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards import RewardFn
from rewards.isolation import BadScores, RewardOutput, RewardRaised, RewardTimeout, call_reward
from rewards.registry import ANSWER_COLUMN
from rollouts.record import Rollout


@dataclass
class WeightedReward:
    name: str
    fn: RewardFn  # a function, or a rewards.isolation.ProcessReward for user code
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    on_error: Literal["zero", "stop"] = "zero"  # algorithm.reward_error_policy
    # algorithm.reward_timeout_s: carried by the reward, like its error policy, so that training
    # and the held-out evaluation cannot call it with different limits.
    timeout_s: float = 60.0


class RewardError(RuntimeError):
    """A reward failed under ``reward_error_policy: stop``; the message names reward and row."""


@dataclass
class ScoreLog:
    """What reward functions reported through TRL's log_extra / log_metric hooks (only calls
    that succeeded), and the answers each reward extracted (log_extra(ANSWER_COLUMN, ...)),
    by reward name, one per completion."""

    extra: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    answers: dict[str, list[str | None]] = field(default_factory=dict)

    def add(self, reward: str, output: RewardOutput, count: int) -> None:
        for column, values in output.extra:
            self.extra[column].extend(values)
            if column == ANSWER_COLUMN and len(values) == count:
                self.answers[reward] = [None if v is None else str(v) for v in values]
        for name, value in output.metrics:
            self.metrics[name].append(value)


_reported: set[str] = set()


def _report_once(name: str, message: str) -> None:
    if name not in _reported:
        _reported.add(name)
        print(
            f"warning: reward {name!r}: {message} (scored 0; further failures are only counted)",
            file=sys.stderr,
        )


def _row(rollouts: list[Rollout], index: int = 0) -> str:
    """One sample in one short line: the user turn (not the long system prompt), the
    completion and the dataset columns, each cut to 80 characters."""
    sample = rollouts[index]
    messages = sample.prompt.messages
    prompt = messages[-1]["content"] if isinstance(messages, list) else messages
    row = {"prompt": prompt, "completion": sample.response}
    row.update({k: v for k, v in sample.prompt.row.items() if k not in row})
    return str({k: v[:80] if isinstance(v, str) else v for k, v in row.items()})[:400]


def reward_inputs(rollouts: list[Rollout]) -> dict[str, Any]:
    """TRL's reward keyword arguments for these rollouts: prompts, completions (as chat messages
    when the prompts are: a multi-turn trajectory's every assistant and tool message),
    completion_ids (the model's tokens) and one list per dataset column; with an environment
    that scores, its get_reward() values (``environment_rewards``, for the ``env`` reward)."""
    from rollouts.agent.summary import reward_columns

    conversational = bool(rollouts) and isinstance(rollouts[0].prompt.messages, list)
    columns = sorted({key for r in rollouts for key in r.prompt.row})
    return {
        "prompts": [r.prompt.messages for r in rollouts],
        "completions": [r.completion_messages if conversational else r.response for r in rollouts],
        "completion_ids": [_model_ids(r) for r in rollouts],
        **{column: [r.prompt.row.get(column) for r in rollouts] for column in columns},
        **reward_columns(rollouts),
    }


def _model_ids(rollout: Rollout) -> list[int]:
    if rollout.model_mask is None:
        return rollout.completion_ids
    return [t for t, m in zip(rollout.completion_ids, rollout.model_mask, strict=True) if m]


def _call(
    reward: WeightedReward, inputs: dict[str, Any], rollouts: list[Rollout]
) -> tuple[RewardOutput | None, str]:
    """Call one reward: (its output, "") or (None, how it failed, in words that name a row)."""
    try:
        kwargs = {**inputs, **reward.options}
        return call_reward(reward.fn, kwargs, reward.timeout_s, reward.name), ""
    except RewardTimeout:
        how = f"took longer than algorithm.reward_timeout_s={reward.timeout_s:g}"
    except RewardRaised as error:
        how = f"raised {error}"
    except BadScores as error:
        if error.row is not None:
            return None, f"{error}, whose row is {_row(rollouts, error.row)}"
        how = str(error)
    return None, f"{how} on a batch whose first row is {_row(rollouts)}"


def score(
    rollouts: list[Rollout], rewards: list[WeightedReward]
) -> tuple[dict[str, float], ScoreLog]:
    """Fill each rollout's ``rewards`` and ``reward``; returns per-reward metrics and the log."""
    inputs = reward_inputs(rollouts)
    log = ScoreLog()
    metrics: dict[str, float] = {}
    for reward in rewards:
        output, failed = _call(reward, inputs, rollouts)
        if failed and reward.on_error == "stop":
            raise RewardError(
                f"reward {reward.name!r} {failed} (algorithm.reward_error_policy=stop)"
            )
        if output is None:
            _report_once(reward.name, failed)
            scores: list[float | None] = [0.0] * len(rollouts)
        else:
            scores = output.scores
            log.add(reward.name, output, len(rollouts))
        metrics[f"reward/{reward.name}/errors"] = float(len(rollouts) if failed else 0)
        applicable = [s for s in scores if s is not None]
        metrics[f"reward/{reward.name}/mean"] = (
            sum(applicable) / len(applicable) if applicable else math.nan
        )
        for rollout, value in zip(rollouts, scores, strict=True):
            rollout.rewards[reward.name] = value
    for index, rollout in enumerate(rollouts):
        # None ("does not apply") counts as 0 in the total, as TRL's nansum does.
        rollout.reward = sum(r.weight * (rollout.rewards[r.name] or 0.0) for r in rewards)
        if not math.isfinite(rollout.reward):  # finite scores, finite weights, and yet
            raise RewardError(
                f"the weighted sum of the rewards {rollout.rewards} overflows for the row "
                f"{_row(rollouts, index)}; scale the rewards or their weights down"
            )
    for name, values in log.metrics.items():
        metrics[name] = sum(values) / len(values)
    return metrics, log
