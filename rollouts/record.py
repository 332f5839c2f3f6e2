"""The one record that flows between the stages of a step.

generate fills the generation fields, score fills ``rewards`` and ``reward``, the advantage
estimator fills ``advantage``. No field is ever overwritten with something of another meaning
(GRPO-Zero's ``Episode`` is the model; its habit of writing the advantage into the reward is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass
class Prompt:
    """A prompt ready to sample from: what the rewards see and what the model sees."""

    index: int  # position in the generation batch; every completion of it shares this group id
    messages: str | list[dict[str, str]]  # as reward functions receive it (TRL's `prompts`)
    ids: list[int]  # the chat-templated prompt, tokenized
    row: dict[str, Any]  # the dataset row's other columns (answer, tests, ...)
    # Text the assistant turn already starts with (its tokens end ``ids``), e.g. "<think>" as
    # DeepSeek-R1 recommends; the rewards see it as the start of the response, the loss never.
    response_prefix: str = ""


@dataclass
class Rollout:
    """One sampled completion of one prompt, and everything the step learns about it."""

    prompt: Prompt
    completion_ids: list[int]
    completion: str
    # Log-prob of each sampled token under the sampler's distribution (after temperature,
    # top-k and top-p); None if the engine cannot report them. Length == len(completion_ids).
    sampler_logps: list[float] | None
    finish_reason: FinishReason  # "length": cut at max_tokens, no end-of-sequence token
    policy_version: int  # optimizer steps the sampling weights had taken
    # Mixture-of-experts policies: the experts each position's token was routed to in every
    # layer, [P + T - 1, layers, top_k] small integers (uint8 up to 256 experts), positions 0 ..
    # P + T - 2 of prompt + completion as vLLM's ``routed_experts`` (row P - 1 + t is the forward
    # that sampled completion token t; the last token is never run). None: a dense policy, or an
    # engine that reports no routing. Replayed by the trainer (rollout.routing_replay, rl/moe).
    routed_experts: Any | None = None
    rewards: dict[str, float | None] = field(default_factory=dict)  # per reward, unweighted
    reward: float = math.nan  # weighted sum of `rewards` (None counts as 0)
    advantage: float = math.nan

    @property
    def response(self) -> str:
        """The whole assistant reply as the rewards see it: the prompt's prefix + completion."""
        return self.prompt.response_prefix + self.completion

    @property
    def group(self) -> int:
        return self.prompt.index

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"
