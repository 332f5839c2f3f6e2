"""Multi-turn set-up: with ``rollout.tools`` or ``rollout.environment`` the configured engine is
wrapped, once, in the turn loop (rollouts/agent/loop.py), and the step never knows.

What the config decides here: the tools and the environment (resolved as validation did), the
context every trajectory must fit (``rollout.max_model_len``, else room for the prompt with its
tools, the model's budget and the tool results of every turn), and the ``env`` reward added when
the environment scores itself and the config does not list ``env``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl.config import Config, ConfigError, RewardSpec

# Template tokens around one tool block (ChatML's "<|im_end|>\n<|im_start|>tool\n...<|im_end|>
# \n<|im_start|>assistant\n" is 10; Llama 3's headers a few more): room kept per tool turn.
TOOL_TURN_OVERHEAD = 32


@dataclass
class Agent:
    """What the turn loop is built from."""

    tools: list[Any]  # rollouts.agent.tools.Tool
    environment: type | None
    description_tokens: int  # what the tools add to a prompt


def uses_tools(config: Config) -> bool:
    return bool(config.rollout.tools or config.rollout.environment)


def prepare(config: Config, tokenizer) -> Agent | None:
    """The tools and environment the config names (None without any), and what their
    descriptions add to a prompt."""
    if not uses_tools(config):
        return None
    from rollouts.agent.chat import ChatFormat, TemplateError
    from rollouts.agent.tools import (
        ToolError,
        as_tool,
        environment_methods,
        load_environment,
        resolve_tools,
    )

    r = config.rollout
    try:
        tools = resolve_tools(r.tools, builtin_deadline(r.tool_timeout_s))
        environment = load_environment(r.environment) if r.environment else None
        schemas = [t.schema for t in tools]
        if environment is not None:
            schemas += [
                as_tool(m, "rollout.environment").schema for m in environment_methods(environment())
            ]
        chat = ChatFormat(tokenizer, schemas, r.tool_call_format)
        chat.check()
    except (ToolError, TemplateError) as error:
        raise ConfigError(str(error)) from None
    except Exception as error:  # the environment's constructor is user code
        raise ConfigError(f"rollout.environment: creating an instance raised {error}") from None
    probe = [{"role": "user", "content": "x"}]
    bare = ChatFormat(tokenizer, [], r.tool_call_format)
    extra = len(chat.prompt_ids(probe)) - len(bare.prompt_ids(probe))
    return Agent(tools, environment, max(extra, 0))


def builtin_deadline(tool_timeout_s: float) -> float:
    """The built-in tools' own deadline: a little below the loop's, so they answer first."""
    return max(tool_timeout_s - min(1.0, tool_timeout_s / 10), tool_timeout_s / 2)


def context_length(config: Config, agent: Agent | None) -> int:
    """Prompt + completion tokens a sequence may reach (vLLM's max_model_len)."""
    r = config.rollout
    if r.max_model_len:
        return r.max_model_len
    length = config.data.max_prompt_tokens + r.max_tokens
    if agent is not None:
        room = r.max_tool_output_tokens + TOOL_TURN_OVERHEAD
        length += agent.description_tokens + (r.max_turns - 1) * room
    return length


def wrap(engine, config: Config, tokenizer, agent: Agent | None):
    """The engine as the step uses it: ``engine`` itself, or the turn loop around it."""
    if agent is None:
        return engine
    from rollouts.agent.loop import MultiTurnEngine, TurnSettings

    r = config.rollout
    settings = TurnSettings(
        max_turns=r.max_turns,
        max_tokens=r.max_tokens,
        max_context=context_length(config, agent),
        tool_timeout_s=r.tool_timeout_s,
        max_tool_output_tokens=r.max_tool_output_tokens,
    )
    return MultiTurnEngine(
        engine, tokenizer, agent.tools, agent.environment, settings, r.tool_call_format
    )


def with_environment_reward(config: Config, specs: list[RewardSpec]) -> list[RewardSpec]:
    """``specs`` and, when the environment has ``get_reward`` and ``env`` is not among them,
    ``env`` with weight 1 (TRL's rule: an environment that scores itself is a reward source)."""
    if not config.rollout.environment or any(s.name == "env" for s in specs):
        return specs
    from rollouts.agent.tools import ToolError, has_reward, load_environment

    try:
        environment = load_environment(config.rollout.environment)
    except ToolError as error:
        raise ConfigError(str(error)) from None
    return [*specs, RewardSpec("env", 1.0)] if has_reward(environment) else specs
