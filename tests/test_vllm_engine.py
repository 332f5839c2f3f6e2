"""The colocated vLLM engine against the trainer: records, log-probs, weight sync, a 2-step run.

Run in their own pytest process: ``pytest -m vllm`` (vLLM changes the calling process).
One engine on the tiny random model serves every test in this module.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from numerics import LOGP_TOLERANCE

from rl.batch import collate, completion_logps
from rl.models import load_policy
from rollouts.base import SamplingSettings
from rollouts.record import Prompt, Rollout

pytestmark = pytest.mark.vllm

# fp32 on both sides, vLLM's kernels against the trainer's: LOGP_TOLERANCE (tests/numerics.py,
# derived for the tiny model and its perturbed copy; measured: ~1e-6)


@pytest.fixture(scope="module")
def engine(tiny_folder, tiny_tokenizer):
    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    engine = VLLMEngine(tiny_folder, tiny_tokenizer, VLLMSettings(kv_cache_gb=1, max_model_len=512))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[Prompt]:
    questions = ["Ana has 3 apples and gets 4 more.", "What is 7 + 5?", "the answer is"]
    out = []
    for index, question in enumerate(questions):
        ids = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append(Prompt(index, question, list(ids), {"answer": "7"}))
    return out


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """The model with every weight moved: a stand-in for an optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def trainer_logps(
    model, rollouts: list[Rollout], pad_id: int, temperature: float
) -> list[list[float]]:
    batch = collate(rollouts, pad_id)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, temperature)
    return [logps[i, : len(r.completion_ids)].tolist() for i, r in enumerate(rollouts)]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(
        abs(x - y)
        for row_a, row_b in zip(a, b, strict=True)
        for x, y in zip(row_a, row_b, strict=True)
    )


def test_generate_returns_grouped_well_formed_records(engine, prompts, tiny_tokenizer):
    rollouts = engine.generate(prompts, 4, SamplingSettings(temperature=1.0, max_tokens=24))
    assert len(rollouts) == 12
    assert [r.group for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
    for rollout in rollouts:
        ids = rollout.completion_ids
        assert 1 <= len(ids) <= 24
        assert len(rollout.sampler_logps) == len(ids)
        assert all(x <= 0 and math.isfinite(x) for x in rollout.sampler_logps)
        assert rollout.completion == tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert rollout.policy_version == engine.policy_version
        if rollout.finish_reason == "stop":  # stopped on EOS: the EOS token is kept, as in HF
            assert ids[-1] == tiny_tokenizer.eos_token_id
        else:
            assert len(ids) == 24 and tiny_tokenizer.eos_token_id not in ids


def test_stop_strings_end_the_completion(engine, prompts, tiny_tokenizer):
    free = engine.generate(prompts[:1], 1, SamplingSettings(temperature=0.0, max_tokens=24))[0]
    text = free.completion
    assert len(text) > 4, "the tiny model must produce some text for this test"
    stop = text[2:4]
    cut = engine.generate(
        prompts[:1], 1, SamplingSettings(temperature=0.0, max_tokens=24, stop=(stop,))
    )[0]
    assert cut.finish_reason == "stop"
    assert stop in cut.completion  # the token that completed the stop string is kept, as in HF
    assert cut.completion_ids == free.completion_ids[: len(cut.completion_ids)]


def test_greedy_matches_the_transformers_engine(engine, prompts, tiny_folder, tiny_tokenizer):
    from test_hf_engine import assert_greedy_is_decided

    from rollouts.hf_engine import TransformersEngine

    greedy = SamplingSettings(temperature=0.0, max_tokens=16)
    ours = engine.generate(prompts, 1, greedy)
    theirs = TransformersEngine(load_policy(tiny_folder, "float32"), tiny_tokenizer).generate(
        prompts, 1, greedy
    )
    assert_greedy_is_decided(load_policy(tiny_folder, "float32"), theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.completion_ids == b.completion_ids
        assert a.completion == b.completion and a.finish_reason == b.finish_reason
        assert (
            max(abs(x - y) for x, y in zip(a.sampler_logps, b.sampler_logps, strict=True))
            < LOGP_TOLERANCE
        )


@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.3, 0), (1.0, 20)])
def test_sampler_logps_are_the_processed_distribution(
    engine, prompts, tiny_folder, tiny_tokenizer, temperature, top_k
):
    """With temperature and no truncation the sampler's log-probs equal the trainer's at that
    temperature; with top-k they are renormalised over the k kept tokens, so never lower."""
    model = load_policy(tiny_folder, "float32").eval()
    engine.update_weights(model.named_parameters(), version=engine.policy_version)
    sampling = SamplingSettings(temperature=temperature, top_k=top_k, max_tokens=16)
    rollouts = engine.generate(prompts, 2, sampling)
    ours = [r.sampler_logps for r in rollouts]
    theirs = trainer_logps(model, rollouts, tiny_tokenizer.pad_token_id, temperature)
    if top_k == 0:
        assert max_gap(ours, theirs) < LOGP_TOLERANCE
    else:
        assert all(
            x >= y - LOGP_TOLERANCE
            for a, b in zip(ours, theirs, strict=True)
            for x, y in zip(a, b, strict=True)
        )


def test_the_process_keeps_its_thread_setting(engine):
    """vLLM's CPU worker replaces torch.set_num_threads with a warning no-op at start-up; the
    engine puts the real one back, so a later train.threads (an SFT run after a vLLM evaluation,
    in the same process) still takes effect."""
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1  # a change the no-op would leave undone
    try:
        torch.set_num_threads(other)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(threads)


def test_weight_sync_makes_vllm_match_the_trainer(engine, prompts, tiny_folder, tiny_tokenizer):
    """The proof: after update_weights vLLM scores a fixed sequence as the trainer does, and
    before it does not."""
    fixed = engine.generate(prompts, 1, SamplingSettings(temperature=1.0, max_tokens=16))
    model = perturbed(load_policy(tiny_folder, "float32").eval())
    theirs = trainer_logps(model, fixed, tiny_tokenizer.pad_token_id, 1.0)

    before = [engine.sequence_logps(r.prompt.ids, r.completion_ids) for r in fixed]
    engine.update_weights(model.named_parameters(), version=7)
    after = [engine.sequence_logps(r.prompt.ids, r.completion_ids) for r in fixed]

    assert max_gap(before, theirs) > 0.05  # weights moved by 0.05 against 0.02: not noise
    assert max_gap(after, theirs) < LOGP_TOLERANCE
    assert engine.generate(prompts[:1], 1, SamplingSettings(max_tokens=2))[0].policy_version == 7


def test_weight_sync_merges_lora(engine, prompts, tiny_folder, tiny_tokenizer):
    from rl.config import LoraConfig

    lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = load_policy(tiny_folder, "float32", lora).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); give it something to merge
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    fixed = engine.generate(prompts, 1, SamplingSettings(temperature=1.0, max_tokens=16))
    theirs = trainer_logps(model, fixed, tiny_tokenizer.pad_token_id, 1.0)

    engine.settings = dataclasses.replace(engine.settings, lora_scaling=lora.alpha / lora.r)
    engine.update_weights(model.named_parameters(), version=8)
    after = [engine.sequence_logps(r.prompt.ids, r.completion_ids) for r in fixed]
    assert max_gap(after, theirs) < LOGP_TOLERANCE
    names = [name for name, _ in model.named_parameters()]
    assert any("lora_A" in n for n in names), "peft names reached the engine"


def test_two_step_training_run_with_vllm(engine, tmp_path, tiny_overrides):
    """`aha train configs/tiny.yaml rollout.engine=vllm`; the run builds its own engine."""
    from rl.config import load_config
    from rl.run import train

    engine.close()  # one engine per process at a time: free the module's before the run's
    config = load_config(
        "configs/tiny.yaml", [*tiny_overrides, "rollout.engine=vllm", "rollout.kv_cache_gb=1"]
    )
    summary = train(config, progress=False)
    lines = [
        json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [line for line in lines if "loss" in line]
    assert [s["step"] for s in steps] == [1, 2]
    # sampled by vLLM, scored by the trainer with the weights vLLM had: the gap (a mean over the
    # tokens) is float32 noise
    assert all(s["sampling/logp_gap"] < LOGP_TOLERANCE for s in steps)
