"""The chat template's side of a multi-turn rollout: prompts with tools, and the tokens of a
tool result.

**Tools in the prompt.** A template that renders ``tools=`` (Qwen, Llama 3.1+, Hermes models)
gets the schemas that way. A template that ignores them (the embedded SmolLM2's ChatML, from
its GGUF) gets them in its system turn, in the Hermes convention Qwen 2.5 uses: the schemas in
``<tools></tools>`` and the instruction to answer with ``<tool_call>{"name", "arguments"}
</tool_call>``; results then come back as a ``tool`` turn, which ChatML renders like any role.

**A tool result as tokens.** The model's tokens are never re-tokenized: a trajectory is the
prompt, then each turn's sampled tokens as they were sampled, then the environment's tokens,
and so on. The environment's tokens are what the template puts after the assistant turn's end
token when the conversation has the tool messages and a generation prompt: the templated
conversation with them, from the assistant's end on. Where the template re-renders earlier turns
identically (it *extends* the conversation, prime-rl's rule), this is exactly the difference of
the two templated conversations; where it does not (Qwen3 drops old reasoning, for one) it is
still the template's tool block and generation prompt, found after the same count of end tokens,
and the trajectory keeps its sampled history (``extends`` is False then, counted in
``tools/template_rewrites``). A turn that ended on a stop string rather than the end token is
closed by the environment: its block starts with that token.
"""

from __future__ import annotations

import json
from typing import Any

from rollouts.agent.parsing import CallFormat, detect_format

HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class TemplateError(ValueError):
    """The chat template cannot render a tool result after an assistant turn."""


def hermes_tools_text(schemas: list[dict[str, Any]]) -> str:
    """The Hermes tool description for a system turn."""
    return HERMES_TOOLS.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in schemas))


class ChatFormat:
    """Renders conversations with the tools, for one tokenizer and one set of tool schemas."""

    def __init__(self, tokenizer, schemas: list[dict[str, Any]], call_format: str = "auto"):
        self.tokenizer = tokenizer
        self.schemas = schemas
        self.end_token: int = tokenizer.eos_token_id
        self.takes_tools = bool(schemas) and self._template_takes_tools()
        if call_format == "auto":
            detected = detect_format(getattr(tokenizer, "chat_template", None))
            call_format = detected if self.takes_tools else "hermes"
        self.call_format: CallFormat = call_format  # type: ignore[assignment]
        self.specials = [t for t in tokenizer.all_special_tokens if t]

    # ------------------------------------------------------------------ rendering

    def conversation(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages as the template gets them: with the tools described in the system turn
        when the template ignores ``tools=``."""
        if self.takes_tools or not self.schemas:
            return messages
        description = hermes_tools_text(self.schemas)
        if messages and messages[0].get("role") == "system":
            system = {**messages[0], "content": f"{messages[0]['content']}\n\n{description}"}
            return [system, *messages[1:]]
        return [{"role": "system", "content": description}, *messages]

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            self.conversation(messages),
            tools=self.schemas if self.takes_tools else None,
            add_generation_prompt=generation_prompt,
            tokenize=True,
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def prompt_ids(self, messages: list[dict[str, Any]], response_prefix: str = "") -> list[int]:
        """The prompt with the tools and the generation prompt, then the response prefix."""
        ids = self.render(messages, generation_prompt=True)
        if response_prefix:
            ids += self.tokenizer.encode(response_prefix, add_special_tokens=False)
        return ids

    def environment_ids(
        self,
        history: list[dict[str, Any]],
        tool_messages: list[dict[str, Any]],
        last_sampled: int | None,
    ) -> tuple[list[int], bool]:
        """The tokens after the assistant turn that ends ``history``: its tool results and the
        next generation prompt; and whether the template re-rendered ``history`` unchanged.
        ``last_sampled``: the assistant turn's last token (the end token, unless a stop string
        ended it)."""
        end = self.end_token
        before = self.render(history, generation_prompt=False)
        after = self.render(history + tool_messages, generation_prompt=True)
        turns = before.count(end)
        ends_after = [i for i, token in enumerate(after) if token == end]
        if turns == 0 or len(ends_after) < turns:
            raise TemplateError(
                f"the chat template does not end the assistant's turn with the end-of-sequence "
                f"token ({self.tokenizer.convert_ids_to_tokens(end)!r}), so aha cannot tell where "
                "a tool result starts; use a chat template that does"
            )
        cut_after = ends_after[turns - 1] + 1
        cut_before = len(before) - before[::-1].index(end)
        extends = after[:cut_after] == before[:cut_before]
        ids = after[cut_after:]
        if last_sampled != end:  # a stop string ended the turn: the environment closes it
            ids = [end, *ids]
        return ids, extends

    def check(self) -> None:
        """Render a tool result after a tool call once: a template that cannot fails now, at
        set-up, in one line (TemplateError), not in the middle of a run."""
        history = [
            {"role": "user", "content": "What is 1 + 1?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}
                ],
            },
        ]
        tool = [{"role": "tool", "name": "probe", "content": "2"}]
        try:
            ids, _ = self.environment_ids(history, tool, self.end_token)
        except TemplateError:
            raise
        except Exception as error:
            raise TemplateError(f"the chat template cannot render a tool turn: {error}") from None
        if "2" not in self.tokenizer.decode(ids):
            raise TemplateError("the chat template drops tool results (its tool turn is empty)")

    # ------------------------------------------------------------------ tool output

    def tool_text(self, text: str, max_tokens: int) -> str:
        """A tool's result as the model will read it: cut at ``max_tokens`` tokens with a
        marker, and with special-token text defused (a tool that prints "<|im_end|>" must not
        end a turn in the model's eyes)."""
        for special in self.specials:
            if special in text:
                text = text.replace(special, special[0] + "\u200b" + special[1:])
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        kept = self.tokenizer.decode(ids[:max_tokens])
        return f"{kept}\n[... cut: {len(ids) - max_tokens} more tokens]"

    def _template_takes_tools(self) -> bool:
        """Whether the template renders ``tools=`` at all (SmolLM2's ChatML does not)."""
        messages = [{"role": "user", "content": "Hello"}]
        try:
            plain = self.tokenizer.apply_chat_template(messages, tokenize=False)
            with_tools = self.tokenizer.apply_chat_template(
                messages, tools=self.schemas, tokenize=False
            )
        except Exception:
            return False
        return plain != with_tools
