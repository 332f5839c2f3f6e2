"""The one record that flows between the stages of a step.

generate fills the generation fields, score fills ``rewards`` and ``reward``, the advantage
estimator fills ``advantage``. No field is ever overwritten with something of another meaning
(GRPO-Zero's ``Episode`` is the model; its habit of writing the advantage into the reward is not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

# "stop": ended by the model (its end token or a stop string); "length": cut at max_tokens
# (with tools: the trajectory's model-token budget, or the context bound); "max_turns": a
# multi-turn trajectory whose last allowed turn called a tool (not run). Only "length" is
# ``truncated``: a turn cap ends a trajectory whose every turn the model did end.
FinishReason = Literal["stop", "length", "max_turns"]


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
    # This prompt's own cap on new tokens, below the sampling settings' max_tokens (a multi-turn
    # trajectory's remaining budget); None: the settings' cap.
    max_tokens: int | None = None


@dataclass
class Turn:
    """One message of a multi-turn completion, in TRL's conversational form."""

    role: Literal["assistant", "tool"]
    content: str  # assistant: the text around its tool calls; tool: the result (or error) text
    # assistant: the calls parsed from it, TRL's form {"type": "function", "function": {"name",
    # "arguments"}} (malformed ones are left out; their error is the next tool turn)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None  # tool: the tool that answered
    # tool: the call failed (malformed, unknown tool, bad arguments, raised, timed out)
    error: bool = False

    def as_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.role == "tool":
            message["name"] = self.name
        return message


@dataclass
class Rollout:
    """One sampled completion of one prompt, and everything the step learns about it."""

    prompt: Prompt
    completion_ids: list[int]  # multi-turn: model and environment tokens, as one sequence
    completion: str  # the text of completion_ids (multi-turn: with the turn markers)
    # Log-prob of each sampled token under the sampler's distribution (after temperature,
    # top-k and top-p); None if the engine cannot report them. Length == len(completion_ids)
    # (0.0 on environment tokens).
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
    # Multi-turn (rollouts/agent): 1 on the tokens the model sampled, 0 on the environment's
    # (tool results and the chat template's turn markers around them), per completion token;
    # None: every completion token is the model's (one turn).
    model_mask: list[int] | None = None
    turns: list[Turn] = field(default_factory=list)  # the conversation after the prompt
    environment_reward: float | None = None  # the environment's get_reward(), when it has one
    environment_error: str | None = None  # why get_reward() gave no number

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

    @property
    def model_tokens(self) -> int:
        """Completion tokens the model sampled (the environment's not counted)."""
        return len(self.completion_ids) if self.model_mask is None else sum(self.model_mask)

    @property
    def completion_messages(self) -> list[dict[str, Any]]:
        """The completion as TRL's conversational rewards receive it: one assistant message,
        or, for a multi-turn trajectory, every assistant and tool message in order."""
        if self.turns:
            return [turn.as_message() for turn in self.turns]
        return [{"role": "assistant", "content": self.response}]
