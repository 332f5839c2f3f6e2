"""Calls the reward functions on a batch of rollouts, safely.

A reward that raises, returns the wrong number of scores or takes longer than the timeout
scores 0 for that call and is counted (``reward/<name>/errors``) and reported once with the
reward's name and the first row; the run goes on. With ``on_error="stop"``
(``algorithm.reward_error_policy``) it raises :class:`RewardError` instead, naming both.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from rewards import RewardFn
from rollouts.record import Rollout


@dataclass
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    on_error: Literal["zero", "stop"] = "zero"  # algorithm.reward_error_policy


class RewardError(RuntimeError):
    """A reward failed under ``reward_error_policy: stop``; the message names reward and row."""


@dataclass
class ScoreLog:
    """What reward functions reported through TRL's log_extra / log_metric hooks."""

    extra: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


# One long-lived thread pool: a timed-out call keeps its thread until it returns, but the
# trainer moves on. Rewards that can hang for real (code, math) time out inside themselves.
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="aha-reward")
_reported: set[str] = set()


def _report_once(name: str, message: str) -> None:
    if name not in _reported:
        _reported.add(name)
        print(
            f"warning: reward {name!r}: {message} (scored 0; further failures are only counted)",
            file=sys.stderr,
        )


def _number(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def _first_row(rollouts: list[Rollout]) -> str:
    """The batch's first sample in one short line: the user turn (not the long system prompt),
    the completion and the dataset columns, each cut to 80 characters."""
    first = rollouts[0]
    messages = first.prompt.messages
    prompt = messages[-1]["content"] if isinstance(messages, list) else messages
    row = {"prompt": prompt, "completion": first.response}
    row.update({k: v for k, v in first.prompt.row.items() if k not in row})
    return str({k: v[:80] if isinstance(v, str) else v for k, v in row.items()})[:400]


def reward_inputs(rollouts: list[Rollout]) -> dict[str, Any]:
    """TRL's reward keyword arguments for these rollouts: prompts, completions (as chat messages
    when the prompts are), completion_ids and one list per dataset column."""
    conversational = bool(rollouts) and isinstance(rollouts[0].prompt.messages, list)
    columns = sorted({key for r in rollouts for key in r.prompt.row})
    return {
        "prompts": [r.prompt.messages for r in rollouts],
        "completions": [
            [{"role": "assistant", "content": r.response}] if conversational else r.response
            for r in rollouts
        ],
        "completion_ids": [r.completion_ids for r in rollouts],
        **{column: [r.prompt.row.get(column) for r in rollouts] for column in columns},
    }


def score(
    rollouts: list[Rollout], rewards: list[WeightedReward], timeout_s: float
) -> tuple[dict[str, float], ScoreLog]:
    """Fill each rollout's ``rewards`` and ``reward``; returns per-reward metrics."""
    inputs = reward_inputs(rollouts)
    log = ScoreLog()
    metrics: dict[str, float] = {}
    for reward in rewards:
        kwargs = {
            **inputs,
            **reward.options,
            "log_extra": lambda c, v: log.extra[c].extend(v),
            "log_metric": lambda n, v: log.metrics[n].append(v),
        }
        future = _POOL.submit(reward.fn, **kwargs)
        failed = ""
        try:
            scores = future.result(timeout=timeout_s)
            if not isinstance(scores, list | tuple) or len(scores) != len(rollouts):
                got = len(scores) if isinstance(scores, list | tuple) else type(scores).__name__
                raise ValueError(f"returned {got} scores for {len(rollouts)} completions")
            scores = [None if s is None else float(s) for s in scores]
        except concurrent.futures.TimeoutError:
            failed = f"took longer than algorithm.reward_timeout_s={timeout_s}"
        except Exception as error:
            detail = " ".join("".join(traceback.format_exception_only(error)).split())
            failed = f"raised {detail} on a batch whose first row is {_first_row(rollouts)}"
        if failed and reward.on_error == "stop":
            raise RewardError(
                f"reward {reward.name!r} {failed} (algorithm.reward_error_policy=stop)"
            )
        if failed:
            _report_once(reward.name, failed)
            scores = [0.0] * len(rollouts)
        metrics[f"reward/{reward.name}/errors"] = float(len(rollouts) if failed else 0)
        applicable = [s for s in scores if s is not None and not math.isnan(s)]
        metrics[f"reward/{reward.name}/mean"] = (
            sum(applicable) / len(applicable) if applicable else math.nan
        )
        for rollout, value in zip(rollouts, scores, strict=True):
            rollout.rewards[reward.name] = value
    for rollout in rollouts:
        # None ("does not apply") and NaN count as 0 in the total, as TRL's nansum does.
        rollout.reward = sum(r.weight * _number(rollout.rewards[r.name]) for r in rewards)
    for name, values in log.metrics.items():
        metrics[name] = sum(values) / len(values)
    return metrics, log
