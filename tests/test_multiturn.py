"""The turn loop end to end: a trajectory's tokens and mask checked by hand on a scripted engine,
every way a trajectory ends, TRL's documented environment run unchanged, the mask through
collate and the rewards, token alignment on the transformers engine, and two training steps of
the tiny model with tools (vLLM's alignment: tests/test_multiturn_vllm.py)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import FIXTURES, ROOT
from numerics import LOGP_TOLERANCE, LONG_CHAIN_LOGP_TOLERANCE
from safetensors.torch import load_file

from rl.batch import collate, completion_logps
from rl.checkpoint import latest_checkpoint
from rl.config import RewardSpec, load_config
from rl.models import load_policy, resolve_model
from rl.scoring import WeightedReward, score
from rollouts.agent.loop import MultiTurnEngine, TurnSettings
from rollouts.agent.parsing import Call, Parsed
from rollouts.agent.tools import as_tool, load_environment
from rollouts.base import SamplingSettings
from rollouts.record import Prompt, Rollout, Turn

AGENT = FIXTURES / "agent_fixtures.py"


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


class ScriptedEngine:
    """An engine whose k-th generate call answers its i-th request with ``script(k, i, text)``
    (the request's text), as token ids; each sampled token's log-prob is -0.01 x its index in
    the turn (so misplaced log-probs show). It honours ``Prompt.max_tokens``, as both engines
    do, and records what it was asked."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.policy_version = 0
        self.calls: list[list[Prompt]] = []
        self.widths: list[int] = []

    def generate(self, prompts, n, sampling):
        assert n == 1
        self.calls.append(prompts)
        self.widths.append(sampling.max_tokens)
        out = []
        for index, prompt in enumerate(prompts):
            text, stops = self.script(len(self.calls) - 1, index, self.tokenizer.decode(prompt.ids))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            ids += [self.tokenizer.eos_token_id] if stops else []
            cap = prompt.max_tokens if prompt.max_tokens is not None else sampling.max_tokens
            finish = "stop" if stops and len(ids) <= cap else "length"
            ids = ids[:cap]
            logps = [-0.01 * i for i in range(len(ids))]
            out.append(Rollout(prompt, ids, self.tokenizer.decode(ids), logps, finish, 0))
        return out

    def release_memory(self): ...

    def update_weights(self, named_tensors, version):
        self.policy_version = version

    def close(self): ...


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def make_prompt(tokenizer, index=0, question="What is 2 + 3?", answer="5"):
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return Prompt(index, messages, list(ids), {"answer": answer})


def looped(tokenizer, script, tools=(add,), environment=None, **settings):
    engine = ScriptedEngine(tokenizer, script)
    turn_settings = TurnSettings(**{"max_tokens": 256, "max_context": 2048, **settings})
    wrapper = MultiTurnEngine(
        engine, tokenizer, [as_tool(t, "test") for t in tools], environment, turn_settings
    )
    return wrapper, engine


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_mask_of_a_scripted_trajectory_checked_by_hand(tiny_tokenizer):
    """prompt | call + <|im_end|> (model) | the tool turn (environment) | answer + <|im_end|>"""
    tok = tiny_tokenizer
    script = {0: (CALL, True), 1: ("The answer is 5.", True)}
    wrapper, engine = looped(tok, lambda k, i, text: script[k])
    (rollout,) = wrapper.generate([make_prompt(tok)], 1, SamplingSettings(max_tokens=256))

    eos = tok.eos_token_id
    call_ids = [*encode(tok, CALL), eos]
    tool_ids = encode(tok, "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")
    answer_ids = [*encode(tok, "The answer is 5."), eos]
    assert rollout.completion_ids == call_ids + tool_ids + answer_ids
    assert rollout.model_mask == [1] * len(call_ids) + [0] * len(tool_ids) + [1] * len(answer_ids)
    assert rollout.sampler_logps == (
        [-0.01 * i for i in range(len(call_ids))]
        + [0.0] * len(tool_ids)
        + [-0.01 * i for i in range(len(answer_ids))]
    )
    assert rollout.finish_reason == "stop" and not rollout.truncated
    assert rollout.model_tokens == len(call_ids) + len(answer_ids)
    assert [t.as_message() for t in rollout.turns] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [Call("add", {"a": 2, "b": 3}).as_trl()],
        },
        {"role": "tool", "content": "5", "name": "add"},
        {"role": "assistant", "content": "The answer is 5."},
    ]
    # the second turn was sampled from exactly these tokens, never re-tokenized text
    assert engine.calls[1][0].ids == rollout.prompt.ids + call_ids + tool_ids
    # the prompt carries the tools (the tiny model's ChatML ignores tools=: Hermes, in system)
    assert "<tools>" in tok.decode(rollout.prompt.ids) and '"name": "add"' in tok.decode(
        rollout.prompt.ids
    )


@pytest.mark.parametrize(
    "case, script, settings, finish, turns, tool_results",
    [
        ("an answer", [("4", True)], {}, "stop", 1, 0),
        ("call, answer", [(CALL, True), ("5", True)], {}, "stop", 2, 1),
        ("the turn cap", [(CALL, True), (CALL, True)], {"max_turns": 2}, "max_turns", 2, 1),
        ("no end token", [("1 2 3 4 5 6 7 8 9", False)], {"max_tokens": 6}, "length", 1, 0),
        ("budget used up", [(CALL, True), ("5", True)], {"max_tokens": "the call"}, "length", 1, 0),
        ("result too long", [(CALL, True), ("5", True)], {"max_context": 0}, "length", 1, 0),
    ],
)
def test_every_way_a_trajectory_ends(
    tiny_tokenizer, case, script, settings, finish, turns, tool_results
):
    tok = tiny_tokenizer
    prompt = make_prompt(tok)
    call_tokens = len(encode(tok, CALL)) + 1  # and its end token
    if settings.get("max_tokens") == "the call":  # exactly the call's tokens
        settings = {"max_tokens": call_tokens}
    if settings.get("max_context") == 0:  # room for the call, not for the result after it
        prompt_tokens = len(looped(tok, None)[0].chat.prompt_ids(prompt.messages))
        settings = {"max_context": prompt_tokens + call_tokens + 3}
    wrapper, engine = looped(tok, lambda k, i, text: script[k], **settings)
    (rollout,) = wrapper.generate([prompt], 1, SamplingSettings(max_tokens=256))
    assert rollout.finish_reason == finish, case
    assert sum(t.role == "assistant" for t in rollout.turns) == turns
    assert sum(t.role == "tool" for t in rollout.turns) == tool_results
    assert rollout.truncated == (finish == "length")
    budget = settings.get("max_tokens", 256)
    assert rollout.model_tokens <= budget
    if "max_context" in settings:
        assert len(rollout.prompt.ids) + len(rollout.completion_ids) <= settings["max_context"]
        assert 0 not in rollout.model_mask  # the result that did not fit was not appended
    if case == "budget used up":  # the call turn took the budget: no result, no next turn
        assert len(engine.calls) == 1 and rollout.model_tokens == call_tokens


def test_each_turn_is_capped_by_what_its_trajectory_has_left(tiny_tokenizer):
    tok = tiny_tokenizer
    script = {0: (CALL, True), 1: ("The answer is 5.", True)}
    first = len(encode(tok, CALL)) + 1
    budget = first + 20
    wrapper, engine = looped(tok, lambda k, i, text: script[k], max_tokens=budget)
    wrapper.generate([make_prompt(tok)], 1, SamplingSettings(max_tokens=256))
    assert [c[0].max_tokens for c in engine.calls] == [budget, 20]
    assert engine.widths == [budget, 20]  # the call's own cap: the widest request


def test_a_group_samples_its_first_turn_from_one_prompt_and_later_ones_apart(tiny_tokenizer):
    tok = tiny_tokenizer

    def script(k, i, text):  # each trajectory calls with its own numbers
        return (CALL.replace('"a": 2', f'"a": {i}'), True) if k == 0 else ("5", True)

    wrapper, engine = looped(tok, script)
    rollouts = wrapper.generate(
        [make_prompt(tok, 0), make_prompt(tok, 1, "What is 3 + 4?")], 3, SamplingSettings()
    )
    first, second = engine.calls
    assert len(first) == 6 and len({id(p) for p in first}) == 2  # one object per prompt
    assert [r.group for r in rollouts] == [0, 0, 0, 1, 1, 1]
    assert len({id(p) for p in second}) == 6  # each trajectory its own history now
    assert [r.turns[1].content for r in rollouts] == [str(i + 3) for i in range(6)]


def test_trls_documented_environment_runs_unchanged(tiny_tokenizer):
    """TRL's example environment (tests/fixtures/agent_fixtures.py: reset(**kwargs) gives the
    task, increment is the tool, get_reward scores the counter) through the loop and the
    rewards, not a line changed."""
    tok = tiny_tokenizer
    environment = load_environment(f"{AGENT}:IncrementEnv")

    def script(k, i, text):
        if k == 0:  # read the task the environment appended to the prompt, call the tool
            step = int(re.findall(r"Increment the counter by (\d)\.", text)[-1])
            step += i % 2  # the odd trajectories overshoot
            return (
                f'<tool_call>{{"name": "increment", "arguments": {{"step": {step}}}}}</tool_call>',
                True,
            )
        return "Done.", True

    wrapper, _ = looped(tok, script, tools=(), environment=environment)
    prompt = make_prompt(tok, question="Please do the task.")
    rollouts = wrapper.generate([prompt], 4, SamplingSettings())
    for index, rollout in enumerate(rollouts):
        user = rollout.prompt.messages[-1]["content"]
        assert re.fullmatch(
            r"Please do the task\.Increment the counter by \d\.", user
        )  # TRL: appended
        assert '"name": "increment"' in tok.decode(rollout.prompt.ids)  # its method is a tool
        counter = int(rollout.turns[1].content)
        assert counter == int(user[-2]) + index % 2
        assert rollout.environment_reward == float(index % 2 == 0)
    # get_reward is the `env` reward, added as TRL adds it (weight 1)
    from rl.multiturn import with_environment_reward

    config = load_config(None, [f"rollout.environment={AGENT}:IncrementEnv"])
    specs = with_environment_reward(config, [RewardSpec("math", 1.0)])
    assert [s.name for s in specs] == ["math", "env"]
    from rewards import get_reward

    _, log = score(rollouts, [WeightedReward("env", get_reward("env"))])
    assert [r.rewards["env"] for r in rollouts] == [1.0, 0.0, 1.0, 0.0]


def test_an_environment_that_fails_to_reset_leaves_an_empty_trajectory(tiny_tokenizer):
    class Broken:
        def reset(self, **kwargs):
            raise RuntimeError("no data")

        def get_reward(self):
            return 1.0

    warnings = []
    wrapper, engine = looped(tiny_tokenizer, None, tools=(), environment=Broken)
    wrapper.warn = warnings.append
    (rollout,) = wrapper.generate([make_prompt(tiny_tokenizer)], 1, SamplingSettings())
    assert rollout.completion_ids == [] and engine.calls == []
    assert rollout.environment_reward is None and "reset" in warnings[0]


# ------------------------------------------------------------------ through the step


def multi_turn_rollouts(tok):
    """Two trajectories of one group: a call and an answer; an answer alone."""
    first_turns = [(CALL, True), ("The answer is 5.", True)]
    wrapper, _ = looped(
        tok, lambda k, i, text: first_turns[i] if k == 0 else ("The answer is 5.", True)
    )
    rollouts = wrapper.generate([make_prompt(tok)], 2, SamplingSettings())
    for rollout, advantage in zip(rollouts, (1.0, -1.0), strict=True):
        rollout.advantage = advantage
    return rollouts


def test_collate_trains_on_the_model_tokens_only(tiny_tokenizer):
    rollouts = multi_turn_rollouts(tiny_tokenizer)
    assert 0 in rollouts[0].model_mask
    batch = collate(rollouts, tiny_tokenizer.pad_token_id)
    for row, rollout in enumerate(rollouts):
        length = len(rollout.completion_ids)
        assert batch.completion_mask[row, :length].tolist() == rollout.model_mask
        assert batch.completion_mask[row, length:].sum() == 0
        assert batch.sampler_logps[row, :length].tolist() == pytest.approx(rollout.sampler_logps)
    # a micro-batch keeps every column up to the last model token, zeros in the mask or not
    assert batch.select([0]).completion_width == len(rollouts[0].completion_ids)
    assert batch.group_ids.tolist() == [0, 0]  # one prompt: shared


def test_prompts_that_differ_within_a_group_are_not_shared(tiny_tokenizer):
    a, b = make_prompt(tiny_tokenizer), make_prompt(tiny_tokenizer, question="What is 9 + 9?")
    rollouts = [Rollout(p, [5, 6], "", None, "stop", 0, advantage=0.0) for p in (a, a, b)]
    rollouts[2].prompt.index = 0  # one group (an environment's reset text differs per row)
    assert collate(rollouts, 0).group_ids.tolist() == [0, 0, 1]


def test_math_scores_the_final_answer_of_a_trajectory():
    from rewards.math.reward import math_reward

    def trajectory(tool_says: str, final: str):
        return [
            {"role": "assistant", "content": "", "tool_calls": [Call("add", {}).as_trl()]},
            {"role": "tool", "name": "add", "content": tool_says},
            {"role": "assistant", "content": final},
        ]

    completions = [trajectory("999", "The answer is 5."), trajectory("5", "I do not know.")]
    assert math_reward([None, None], completions, answer=["5", "5"]) == [1.0, 0.0]


def test_rewards_see_the_conversation_and_the_model_tokens(tiny_tokenizer):
    from rl.scoring import reward_inputs

    rollouts = multi_turn_rollouts(tiny_tokenizer)
    inputs = reward_inputs(rollouts)
    assert [m["role"] for m in inputs["completions"][0]] == ["assistant", "tool", "assistant"]
    assert inputs["completions"][1] == [{"role": "assistant", "content": "The answer is 5."}]
    ids, mask = rollouts[0].completion_ids, rollouts[0].model_mask
    assert inputs["completion_ids"][0] == [t for t, m in zip(ids, mask, strict=True) if m]
    assert "environment_rewards" not in inputs  # no environment


def forced_call(text: str) -> Parsed:
    """Every turn of the tiny random model calls the tool (it never would by itself)."""
    return Parsed(text.strip(), [Call("add", {"a": 1, "b": 1})])


def test_transformers_engine_log_probs_align_across_turns(tiny_folder, tiny_tokenizer):
    """Sampled on the transformers engine, recomputed by the trainer on the collated batch: the
    same log-prob for every model token of every turn (fp32 both; the decode with a cache and
    the full forward differ in summation order, ~1e-6 here). The bound is the derived
    LOGP_TOLERANCE, as for the vLLM twin in tests/test_multiturn_vllm.py: the trajectory's
    longer chain (TINY_MULTITURN_FORWARD_TERMS) at the untrained model's logit magnitude (1.4)
    stays within it; the former 1e-4 lay below the 2e-4 the arithmetic allows on another CPU."""
    from rollouts.hf_engine import TransformersEngine

    torch.manual_seed(0)
    model = load_policy(tiny_folder, "float32").eval()
    settings = TurnSettings(max_turns=3, max_tokens=40, max_context=1024)
    wrapper = MultiTurnEngine(
        TransformersEngine(model, tiny_tokenizer),
        tiny_tokenizer,
        [as_tool(add, "t")],
        None,
        settings,
    )
    wrapper.parse = forced_call
    sampling = SamplingSettings(temperature=1.0, max_tokens=40, stop=(" ",))  # short turns
    rollouts = wrapper.generate([make_prompt(tiny_tokenizer)], 4, sampling)
    assert any(r.model_mask.count(0) > 0 and r.model_mask[-1] == 1 for r in rollouts)
    for rollout in rollouts:
        rollout.advantage = 0.0
    batch = collate(rollouts, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, 1.0)
    mask = batch.completion_mask.bool()
    gap = (logps - batch.sampler_logps).abs()[mask]
    assert gap.numel() > 0 and float(gap.max()) < LOGP_TOLERANCE
    for rollout in rollouts:  # the environment's tokens are the template's tool turns
        text = tiny_tokenizer.decode(
            [t for t, m in zip(rollout.completion_ids, rollout.model_mask, strict=True) if not m]
        )
        assert text.count("<|im_start|>tool\n2<|im_end|>") == sum(
            t.role == "tool" for t in rollout.turns
        )


def test_the_transformers_engine_honours_a_prompts_own_cap(tiny_folder, tiny_tokenizer):
    from dataclasses import replace

    from rollouts.hf_engine import TransformersEngine

    engine = TransformersEngine(load_policy(tiny_folder, "float32"), tiny_tokenizer)
    prompt = make_prompt(tiny_tokenizer)
    capped = [replace(prompt, max_tokens=cap) for cap in (3, 7)]
    rollouts = engine.generate(capped, 1, SamplingSettings(temperature=0.0, max_tokens=12))
    for rollout, cap in zip(rollouts, (3, 7), strict=True):
        assert len(rollout.completion_ids) <= cap
        if tiny_tokenizer.eos_token_id not in rollout.completion_ids:
            assert len(rollout.completion_ids) == cap and rollout.finish_reason == "length"
    greedy = engine.generate([prompt], 1, SamplingSettings(temperature=0.0, max_tokens=12))[0]
    assert rollouts[1].completion_ids == greedy.completion_ids[:7]


def test_two_multi_turn_steps_of_the_tiny_model(tmp_path, monkeypatch):
    """Two training steps through `aha train`'s code with a tool and an environment-free
    config: the parameters change, the logs show each turn, call and result."""
    from rl.run import train
    from rl.view import write_view

    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{AGENT}:last_answer_length', weight: 1.0}}]",
        f"rollout.tools=[calculator, '{AGENT}:shout']",
        "rollout.stop=[' ']",
        "rollout.max_turns=3",
        "rollout.max_tokens=24",
        "train.steps=2",
        "data.eval_size=2",
    ]
    monkeypatch.setattr(
        "rollouts.agent.loop.parse_calls",
        lambda text, fmt: Parsed(text.strip(), [Call("calculator", {"expression": "1+1"})]),
    )
    config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    summary = train(config, progress=False)
    run_dir = tmp_path / "run"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 2 and summary.steps == 2
    for m in steps:
        assert m["tools/turns/mean"] > 1 and m["tools/calls/mean"] > 0
        assert m["tools/error_frac"] == 0.0 and m["tools/env_tokens/mean"] > 0
        # float32 engine and trainer over a trajectory: tests/numerics.py
        assert m["sampling/logp_gap"] < LONG_CHAIN_LOGP_TOLERANCE and math.isfinite(m["loss"])
        assert m["tokens"] < m["update_tokens"]
    assert any("eval/tools/turns/mean" in m for m in lines)
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    tool_turns = [t for s in samples for t in s["turns"] if t["role"] == "tool"]
    assert tool_turns and all(t["content"] == "2" and t["name"] == "calculator" for t in tool_turns)
    assert all(s["env_tokens"] > 0 for s in samples if len(s["turns"]) > 1)
    page = write_view(run_dir).read_text()
    assert "turnsCell" in page and '"role": "tool"' in page
    before = load_file(resolve_model("tiny-random") / "model.safetensors")
    after = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_turns_are_shown_in_tracker_tables():
    from rl.tracking import sample_rows

    sample = {
        "step": 1,
        "prompt": "What is 2 + 3?",
        "completion": "raw",
        "reward": 1.0,
        "rewards": {"math": 1.0},
        "turns": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [Call("add", {"a": 2, "b": 3}).as_trl()],
            },
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "tool", "name": "nope", "content": "error: unknown tool", "error": True},
            {"role": "assistant", "content": "The answer is 5."},
        ],
    }
    (row,) = sample_rows([sample])
    assert row[2] == (
        "[assistant]\n  -> add(a=2, b=3)\n[tool add] 5\n[tool nope error] error: unknown tool\n"
        "[assistant] The answer is 5."
    )
    assert Turn("tool", "5", name="add").as_message() == {
        "role": "tool",
        "content": "5",
        "name": "add",
    }
