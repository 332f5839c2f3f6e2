"""The turn loop: multi-turn rollouts over any rollout engine.

:class:`MultiTurnEngine` wraps an engine (transformers, vLLM, a vLLM server) and returns the same
`Rollout` records, one per trajectory, so the training step does not know turns exist. Each
trajectory is one token sequence: its prompt (rendered with the tools, and the environment's
``reset`` text), then per turn the model's tokens exactly as sampled (mask 1, with their sampler
log-probs) and the environment's tokens (mask 0, log-prob 0): tool results as the chat template
renders them (rollouts/agent/chat.py). Nothing sampled is decoded and encoded again, so the
trainer's log-probs line up with the sampler's token for token.

A turn: every open trajectory's next turn in one ``generate`` call (token-id prompts, n=1; a
group's first turn shares its prompt), then the calls of every trajectory that made some, at
once (rollouts/agent/execute.py), then their results appended. A trajectory ends:

- ``stop``: a turn without a tool call (the final answer);
- ``length``: its model tokens reach ``max_tokens`` (the whole trajectory's budget), or a turn or
  a tool result would not fit the context (``max_context``: prompts never grow without bound;
  a result that does not fit is not appended);
- ``max_turns``: its ``max_turns``-th turn called a tool, which is not run.

The environment (TRL's ``environment_factory`` contract): one instance per trajectory, created
here, ``reset(**row)`` (its text appended to the last prompt message), its public methods as
tools, ``get_reward()`` read when the trajectory ends (``Rollout.environment_reward``), then the
instance is dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rollouts.agent.chat import ChatFormat
from rollouts.agent.execute import Result, Toolset, call_with_timeout, run_calls
from rollouts.agent.parsing import Call, Parsed, parse_calls
from rollouts.agent.tools import Tool, ToolError, as_tool, environment_methods, has_reward
from rollouts.base import RolloutEngine, SamplingSettings
from rollouts.record import FinishReason, Prompt, Rollout, Turn


@dataclass(frozen=True)
class TurnSettings:
    max_turns: int = 4  # model turns per trajectory
    max_tokens: int = 256  # the trajectory's model tokens, all turns together
    max_context: int = 2048  # prompt + every turn's tokens (vLLM's max_model_len)
    tool_timeout_s: float = 10.0
    max_tool_output_tokens: int = 256


@dataclass
class Trajectory:
    prompt: Prompt  # as this trajectory's model saw it: tools, the environment's reset text
    toolset: Toolset
    environment: Any | None
    ids: list[int] = field(default_factory=list)  # completion: model and environment tokens
    mask: list[int] = field(default_factory=list)
    logps: list[float] | None = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    model_tokens: int = 0
    finish: FinishReason | None = None  # None while it goes on
    pending: list[Call] = field(default_factory=list)  # the last turn's calls, to run
    last_token: int | None = None

    def history(self) -> list[dict[str, Any]]:
        messages = self.prompt.messages
        return [*messages, *(turn.as_message() for turn in self.turns)]


class MultiTurnEngine:
    """A `RolloutEngine` whose rollouts are multi-turn trajectories with tools (see the module
    docstring); it samples with ``engine`` and passes weights and memory calls through."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer,
        tools: list[Tool],
        environment: Callable[[], Any] | None,
        settings: TurnSettings,
        call_format: str = "auto",
        warn: Callable[[str], None] | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.tools = tools
        self.environment = environment
        self.settings = settings
        self.environment_tools: list[Tool] = []
        if environment is not None:  # one probe instance for the tools' schemas, as TRL does
            probe, error = call_with_timeout(environment, settings.tool_timeout_s)
            if error is not None:
                raise ToolError(f"rollout.environment: creating an instance {error}")
            self.environment_tools = [
                as_tool(m, "rollout.environment") for m in environment_methods(probe)
            ]
        schemas = [t.schema for t in self.tools + self.environment_tools]
        self.chat = ChatFormat(tokenizer, schemas, call_format)
        self.chat.check()
        self.parse: Callable[[str], Parsed] = lambda text: parse_calls(text, self.chat.call_format)
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self._warned: set[str] = set()
        self._rendered: dict[str, list[int]] = {}

    # -------------------------------------------------------------- the engine protocol

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def release_memory(self) -> None:
        self.engine.release_memory()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int):
        self.engine.update_weights(named_tensors, version)

    def close(self) -> None:
        self.engine.close()

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        """n trajectories per prompt, grouped: rollouts[i*n:(i+1)*n] belong to prompts[i]."""
        trajectories = [self._start(prompt) for prompt in prompts for _ in range(n)]
        for turn in range(1, self.settings.max_turns + 1):
            open_ = [t for t in trajectories if t.finish is None]
            if not open_:
                break
            self._sample_turn(open_, sampling, last_turn=turn == self.settings.max_turns)
            calling = [t for t in open_ if t.finish is None]
            if calling:
                self._run_tools(calling)
        return [self._rollout(t) for t in trajectories]

    # -------------------------------------------------------------- one trajectory

    def _start(self, prompt: Prompt) -> Trajectory:
        functions = {t.name: t.fn for t in self.tools}
        schemas = {t.name: t.schema for t in self.tools}
        environment, observation = None, None
        if self.environment is not None:
            row = {"prompt": prompt.messages, **prompt.row}
            environment, error = call_with_timeout(self.environment, self.settings.tool_timeout_s)
            if error is None:
                observation, error = call_with_timeout(
                    lambda: environment.reset(**row), self.settings.tool_timeout_s
                )
            if error is not None:  # nothing to sample from: the trajectory is empty
                self._warn_once("reset", f"an environment's creation or reset {error}")
                trajectory = Trajectory(prompt, Toolset(functions, schemas), None)
                trajectory.finish = "stop"
                return trajectory
            for method in environment_methods(environment):
                functions[method.__name__] = method
                schemas[method.__name__] = next(
                    (t.schema for t in self.environment_tools if t.name == method.__name__), {}
                )
        messages = prompt.messages
        if observation is not None:  # TRL appends it to the last message, as it is
            last = messages[-1]
            messages = [*messages[:-1], {**last, "content": last["content"] + str(observation)}]
        ids = self._prompt_ids(messages, prompt)
        own = replace(prompt, messages=messages, ids=ids)
        return Trajectory(own, Toolset(functions, schemas), environment)

    def _prompt_ids(self, messages: list[dict[str, Any]], prompt: Prompt) -> list[int]:
        """The prompt's tokens with the tools, rendered once per distinct conversation."""
        import json

        key = json.dumps([messages, prompt.response_prefix], sort_keys=True, default=str)
        ids = self._rendered.get(key)
        if ids is None:
            ids = self.chat.prompt_ids(messages, prompt.response_prefix)
            if len(ids) >= self.settings.max_context:
                from rl.data import DataError

                raise DataError(
                    f"a prompt with its tools is {len(ids)} tokens, not below the context of "
                    f"{self.settings.max_context} (rollout.max_model_len); it starts "
                    f"{str(messages[-1].get('content'))[:80]!r}"
                )
            if len(self._rendered) > 100_000:
                self._rendered.clear()
            self._rendered[key] = ids
        return ids

    def _sample_turn(
        self, trajectories: list[Trajectory], sampling: SamplingSettings, last_turn: bool
    ) -> None:
        """Every trajectory's next turn in one engine call, each capped by what it has left."""
        requests, sampled, shared = [], [], {}
        for t in trajectories:
            ids = t.prompt.ids + t.ids
            cap = min(
                self.settings.max_tokens - t.model_tokens, self.settings.max_context - len(ids)
            )
            if cap <= 0:  # no budget or no room left (kept from happening; never sampled)
                t.finish = "length"
                continue
            key = (tuple(ids), cap)
            if key not in shared:  # a group's first turn: one prompt, prefilled once
                shared[key] = replace(t.prompt, ids=ids, max_tokens=cap)
            requests.append(shared[key])
            sampled.append(t)
        if not requests:
            return
        widest = max(r.max_tokens for r in requests)
        outputs = self.engine.generate(requests, 1, replace(sampling, max_tokens=widest))
        for trajectory, request, output in zip(sampled, requests, outputs, strict=True):
            self._add_model_turn(trajectory, output, request.max_tokens, last_turn)

    def _add_model_turn(self, t: Trajectory, output: Rollout, cap: int, last_turn: bool) -> None:
        ids = output.completion_ids[:cap]  # an engine that ignored the cap is cut to it
        cut = len(ids) < len(output.completion_ids) or output.finish_reason == "length"
        t.ids += ids
        t.mask += [1] * len(ids)
        if t.logps is not None and output.sampler_logps is not None:
            t.logps += output.sampler_logps[: len(ids)]
        else:
            t.logps = None
        t.model_tokens += len(ids)
        t.last_token = ids[-1] if ids else None
        parsed = self.parse(self.tokenizer.decode(ids, skip_special_tokens=True))
        t.turns.append(
            Turn("assistant", parsed.content, [c.as_trl() for c in parsed.calls if c.error is None])
        )
        if cut:
            t.finish = "length"
        elif not parsed.calls:
            t.finish = "stop"
        elif last_turn:
            t.finish = "max_turns"
        elif t.model_tokens >= self.settings.max_tokens:
            t.finish = "length"  # no budget left for the turn after the results
        else:
            t.pending = parsed.calls

    def _run_tools(self, trajectories: list[Trajectory]) -> None:
        batches = [(t.toolset, t.pending) for t in trajectories]
        results = run_calls(batches, self.settings.tool_timeout_s)
        for t, turn_results in zip(trajectories, results, strict=True):
            t.pending = []
            self._add_tool_results(t, turn_results)

    def _add_tool_results(self, t: Trajectory, results: list[Result]) -> None:
        limit = self.settings.max_tool_output_tokens
        turns = [
            Turn("tool", self.chat.tool_text(r.content, limit), name=r.name, error=r.error)
            for r in results
        ]
        ids, extends = self.chat.environment_ids(
            t.history(), [turn.as_message() for turn in turns], t.last_token
        )
        # the block, and room for at least one more model token after it
        if len(t.prompt.ids) + len(t.ids) + len(ids) + 1 > self.settings.max_context:
            t.finish = "length"  # the results do not fit: the trajectory ends before them
            return
        if not extends:
            self._warn_once(
                "rewrite",
                "the chat template renders earlier turns differently once a tool result follows "
                "(it does not extend the conversation); the trajectory keeps its sampled tokens "
                "and takes the template's tool block after them",
            )
        t.turns += turns
        t.ids += ids
        t.mask += [0] * len(ids)
        if t.logps is not None:
            t.logps += [0.0] * len(ids)

    def _rollout(self, t: Trajectory) -> Rollout:
        environment_reward, environment_error = None, None
        if t.environment is not None and has_reward(type(t.environment)):
            value, error = call_with_timeout(t.environment.get_reward, self.settings.tool_timeout_s)
            if error is None:
                try:
                    environment_reward = float(value)
                except (TypeError, ValueError):
                    error = f"returned {value!r}, not a number"
            if error is not None:
                environment_error = f"the environment's get_reward {error}"
        t.environment = None  # the instance is dropped with the trajectory
        return Rollout(
            prompt=t.prompt,
            completion_ids=t.ids,
            completion=self.tokenizer.decode(t.ids, skip_special_tokens=False),
            sampler_logps=t.logps,
            finish_reason=t.finish or "length",
            policy_version=self.engine.policy_version,
            model_mask=t.mask,
            turns=t.turns,
            environment_reward=environment_reward,
            environment_error=environment_error,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(f"{message} (further failures are not reported)")
