"""Multi-turn trajectories on the colocated vLLM engine: every open trajectory's next turn in one
vLLM call, from token ids, and the sampler's log-probs equal to the trainer's on every model
token of every turn after a weight sync.

Run in their own pytest process: ``pytest -m vllm tests/test_multiturn_vllm.py``.
"""

from __future__ import annotations

import pytest
import torch
from numerics import LOGP_TOLERANCE

from rl.batch import collate, completion_logps
from rl.models import load_policy
from rollouts.agent.loop import MultiTurnEngine, TurnSettings
from rollouts.agent.parsing import Call, Parsed
from rollouts.agent.tools import as_tool
from rollouts.base import SamplingSettings
from rollouts.record import Prompt

pytestmark = pytest.mark.vllm

# fp32 on both sides: vLLM's kernels and the trainer's differ in summation order only; the tiny
# model's derived bound, as in tests/test_vllm_engine.py (tests/numerics.py: 2e-4, tolerance 5e-4)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def forced_call(text: str) -> Parsed:
    """Every turn of the tiny random model calls the tool (it never would by itself)."""
    return Parsed(text.strip(), [Call("add", {"a": 1, "b": 1})])


@pytest.fixture(scope="module")
def vllm(tiny_folder, tiny_tokenizer):
    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    engine = VLLMEngine(
        tiny_folder, tiny_tokenizer, VLLMSettings(kv_cache_gb=1, max_model_len=1024)
    )
    yield engine
    engine.close()


def prompts(tokenizer) -> list[Prompt]:
    out = []
    for index, question in enumerate(["What is 2 + 3?", "Ana has 3 apples and gets 4 more."]):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append(Prompt(index, messages, list(ids), {"answer": "5"}))
    return out


def test_vllm_log_probs_align_across_turns_after_a_sync(vllm, tiny_folder, tiny_tokenizer):
    model = load_policy(tiny_folder, "float32").eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a stand-in for an optimizer step, then the sync
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    vllm.update_weights(model.named_parameters(), version=1)

    calls = []
    generate = vllm.llm.generate

    def counted(requests, params, **kwargs):
        calls.append(len(requests))
        return generate(requests, params, **kwargs)

    vllm.llm.generate = counted
    settings = TurnSettings(max_turns=3, max_tokens=40, max_context=1024)
    wrapper = MultiTurnEngine(vllm, tiny_tokenizer, [as_tool(add, "t")], None, settings)
    wrapper.parse = forced_call
    sampling = SamplingSettings(temperature=1.0, max_tokens=40, stop=(" ",))  # short turns
    try:
        rollouts = wrapper.generate(prompts(tiny_tokenizer), 4, sampling)
    finally:
        vllm.llm.generate = generate

    # one vLLM call per turn with every open trajectory in it (the first: all 8, a group's
    # sharing its prompt through vLLM's prefix cache; later ones: those still going)
    assert len(calls) == max(sum(t.role == "assistant" for t in r.turns) for r in rollouts)
    assert calls[0] == 8 and all(c <= 8 for c in calls[1:])
    assert any(0 in r.model_mask and r.model_mask[-1] == 1 for r in rollouts)
    assert all(r.policy_version == 1 and r.model_tokens <= 40 for r in rollouts)
    for rollout in rollouts:
        rollout.advantage = 0.0
    batch = collate(rollouts, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, 1.0)
    model_tokens = batch.completion_mask.bool()
    gap = (logps - batch.sampler_logps).abs()[model_tokens]
    assert gap.numel() > 0 and float(gap.max()) < LOGP_TOLERANCE
    assert float(batch.sampler_logps[~model_tokens].abs().max()) == 0.0  # none on tools' tokens
