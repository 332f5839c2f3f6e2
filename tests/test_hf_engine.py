"""The transformers engine's own sampling loop: transformers' sampling semantics, exact log-probs,
stop strings, MKL-packed decode weights that never go stale, and grouped-head attention."""

import math

import pytest
import torch
from numerics import (
    LOGP_TOLERANCE,
    TINY_FORWARD_TERMS,
    TINY_LOGIT_MAGNITUDE,
    U64,
    worst_error,
)
from transformers import (
    GenerationConfig,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rl.batch import collate, completion_logps
from rl.models import CPU_SDPA, load_policy, load_tokenizer, resolve_model
from rollouts import packed_linear
from rollouts.base import SamplingSettings
from rollouts.hf_engine import TransformersEngine
from rollouts.record import Prompt
from rollouts.sampling import draw, filter_logits, sample_next

QUESTIONS = ["Ana has 3 apples and gets 4 more.", "What is 12 + 7? Think step by step."]
# Greedy decoding is compared token for token. That is exact wherever the best token leads the
# second by more than two float32 evaluations of the logits can differ: twice the worst case of
# the forward's terms at temperature 1 (tests/numerics.py), 2.2e-4. The tiny model's leads along
# these completions are 0.26 and more; assert_greedy_is_decided checks they stay above this.
GREEDY_LEAD = 1e-3
assert 2 * worst_error(TINY_FORWARD_TERMS, TINY_LOGIT_MAGNITUDE * 0.7) < GREEDY_LEAD


@pytest.fixture(scope="module")
def tiny():
    folder = resolve_model("tiny-random")
    return load_policy(folder, "float32").eval(), load_tokenizer(folder)


def make_prompts(tokenizer, questions=QUESTIONS) -> list[Prompt]:
    prompts = []
    for index, question in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        prompts.append(Prompt(index=index, messages=messages, ids=list(ids), row={}))
    assert len({len(p.ids) for p in prompts}) > 1, "the prompts should need left padding"
    return prompts


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.6, 20, 0.5), (1.0, 1, 1.0)],
)
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = filter_logits(logits, temperature, top_k, top_p)
    # The warpers' operations in the warpers' order (equal to the bit here), so the same tokens
    # are cut; the default tolerance (1.3e-6 relative) would still allow a rounding or two.
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(got[kept], expected[kept])


@pytest.mark.parametrize("block", [2, 3, 256])  # blocks that split, pad and hold the vocabulary
def test_draw_follows_the_distribution_and_never_picks_an_impossible_token(block):
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    draws = torch.stack([draw(probs, block) for _ in range(20_000)])  # [N, 2]
    counts = torch.stack([torch.bincount(draws[:, row], minlength=5) for row in range(2)])
    assert counts[0, 1] == counts[0, 4] == 0 and counts[1, 4] == 20_000
    frequencies = counts[0].double() / 20_000
    # 5 standard errors of a binomial frequency at p = 0.5 over 20,000 draws is 0.018
    assert torch.allclose(frequencies, probs[0].double(), atol=0.018)


def test_sample_next_reports_the_log_prob_of_the_token_it_drew():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    tokens, logps = sample_next(logits, 0.8, top_k=10, top_p=0.9)
    expected = torch.log_softmax(filter_logits(logits, 0.8, 10, 0.9), dim=-1)
    # the same log_softmax of the same tensor: the same bits
    assert torch.equal(logps, expected.gather(-1, tokens[:, None]).squeeze(-1))
    greedy, greedy_logps = sample_next(logits, 0.0)
    assert torch.equal(greedy, logits.argmax(dim=-1))
    assert torch.equal(greedy_logps, torch.log_softmax(logits, -1).max(dim=-1).values)


def test_greedy_completions_equal_transformers_generate(tiny):
    model, tokenizer = tiny
    prompts = make_prompts(tokenizer)
    settings = SamplingSettings(temperature=0.0, max_tokens=12)
    ours = TransformersEngine(model, tokenizer).generate(prompts, 2, settings)

    rows = [p for p in prompts for _ in range(2)]
    width = max(len(p.ids) for p in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(rows):
        input_ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
        attention_mask[row, width - len(prompt.ids) :] = 1
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        theirs = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )[:, width:]
    for rollout, expected in zip(ours, theirs.tolist(), strict=True):
        assert rollout.completion_ids == expected[: len(rollout.completion_ids)]
        assert rollout.finish_reason == ("stop" if tokenizer.eos_token_id in expected else "length")
    assert_greedy_is_decided(model, ours)


def assert_greedy_is_decided(model, rollouts):
    """At every greedy step the chosen token leads the second by more than GREEDY_LEAD: no
    summation order can change the choice, so comparing tokens exactly is sound."""
    for rollout in rollouts:
        ids = torch.tensor([rollout.prompt.ids + rollout.completion_ids], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(rollout.prompt.ids) - 1 : -1]
        best, second = logits.double().topk(2, dim=-1).values.unbind(-1)
        assert float((best - second).min()) > GREEDY_LEAD, "a near tie: compare log-probs instead"


def test_sampled_log_probs_equal_the_trainers(tiny):
    model, tokenizer = tiny
    prompts = make_prompts(tokenizer)
    torch.manual_seed(0)
    rollouts = TransformersEngine(model, tokenizer).generate(
        prompts, 4, SamplingSettings(temperature=0.7, max_tokens=16)
    )
    # the decode loop (cache, packed weights) and the trainer's forward: every reduction in
    # another order (tests/numerics.py)
    assert_sampler_logps_are_the_trainers(model, tokenizer, rollouts, 0.7, LOGP_TOLERANCE)
    assert len({tuple(r.completion_ids) for r in rollouts}) > 1  # it samples


def assert_sampler_logps_are_the_trainers(model, tokenizer, rollouts, temperature, atol):
    for rollout in rollouts:
        rollout.advantage = 0.0
    batch = collate(rollouts, tokenizer.pad_token_id)
    with torch.no_grad():
        trainer_logps, _ = completion_logps(model, batch, temperature=temperature)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(
        batch.sampler_logps[mask], trainer_logps.cpu()[mask], atol=atol, rtol=0
    )


def test_a_stop_string_ends_the_completion(tiny):
    model, tokenizer = tiny
    prompts = make_prompts(tokenizer)[:1]
    engine = TransformersEngine(model, tokenizer)
    free = engine.generate(prompts, 1, SamplingSettings(temperature=0.0, max_tokens=16))[0]
    text = free.completion
    assert len(text) >= 8, text
    stop = text[4:7]  # ends inside the free completion, so greedy decoding reaches it
    stopped = engine.generate(
        prompts, 1, SamplingSettings(temperature=0.0, max_tokens=16, stop=(stop,))
    )[0]
    assert stopped.finish_reason == "stop"
    assert stop in stopped.completion and len(stopped.completion_ids) < len(free.completion_ids)
    assert free.completion_ids[: len(stopped.completion_ids)] == stopped.completion_ids
    assert stop not in tokenizer.decode(stopped.completion_ids[:-1])  # it stopped at the first


@pytest.mark.skipif(not packed_linear.available(), reason="this torch has no MKL packed GEMM")
def test_packed_decode_weights_give_the_plain_results_and_follow_weight_updates():
    folder = resolve_model("tiny-random")
    model, tokenizer = load_policy(folder, "float32"), load_tokenizer(folder)
    prompts = make_prompts(tokenizer)
    settings = SamplingSettings(temperature=0.0, max_tokens=12)
    packed, plain = TransformersEngine(model, tokenizer), TransformersEngine(model, tokenizer)
    plain.packed = None
    assert packed.packed is not None

    def both_agree():  # every linear layer in another kernel: LOGP_TOLERANCE
        a, b = packed.generate(prompts, 2, settings), plain.generate(prompts, 2, settings)
        assert_greedy_is_decided(model, b)
        assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
        for x, y in zip(a, b, strict=True):
            gaps = [abs(p - q) for p, q in zip(x.sampler_logps, y.sampler_logps, strict=True)]
            assert max(gaps) < LOGP_TOLERANCE

    both_agree()
    # A fused AdamW step changes the weights in place without moving their version counters:
    # the next generate must not decode with the old packs.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in model.parameters()]
    before = packed.generate(prompts, 2, settings)
    optimizer.step()
    assert versions == [p._version for p in model.parameters()]
    after = packed.generate(prompts, 2, settings)
    assert [r.completion_ids for r in before] != [r.completion_ids for r in after]
    both_agree()


@pytest.mark.skipif(not packed_linear.available(), reason="this torch has no MKL packed GEMM")
def test_frozen_weights_are_packed_once_and_repacked_when_changed():
    folder = resolve_model("tiny-random")
    model, tokenizer = load_policy(folder, "float32"), load_tokenizer(folder)
    model.requires_grad_(False)  # as LoRA's base
    engine = TransformersEngine(model, tokenizer)
    settings = SamplingSettings(temperature=0.0, max_tokens=4)
    prompts = make_prompts(tokenizer)
    engine.generate(prompts, 2, settings)
    packs = {m: p[2] for m, p in engine.packed._packs.items()}
    assert packs
    engine.generate(prompts, 2, settings)
    assert all(engine.packed._packs[m][2] is p for m, p in packs.items())  # reused
    layer = next(iter(packs))
    with torch.no_grad():
        layer.weight.mul_(1.5)  # an in-place change moves the version counter
    engine.generate(prompts, 2, settings)
    assert engine.packed._packs[layer][2] is not packs[layer]


def test_grouped_head_attention_matches_sdpa_with_padding_and_gradients():
    folder = resolve_model("tiny-random")
    model = load_policy(folder, "float32").double()
    assert model.config._attn_implementation == CPU_SDPA
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    input_ids = torch.randint(0, model.config.vocab_size, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding: transformers would repeat the key/value heads

    def logits_and_grads():
        model.zero_grad()
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits[attention_mask.bool()].square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ours, our_grads = logits_and_grads()
    model.set_attn_implementation("sdpa")
    theirs, their_grads = logits_and_grads()
    # float64, sums of fewer than 4,000 terms whose magnitudes add up to less than 1.35 (logits)
    # or 1 (gradients of a mean over 13k squares): within 4,000 x 2^-53 x 1.35 = 6e-13 in any order
    assert 2 * worst_error(4_000, 1.35, U64) < 1.3e-12
    keep = attention_mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1.3e-12)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1.3e-12)
    assert not math.isnan(float(ours.sum()))


def test_the_cache_room_gives_the_concatenated_keys_and_overflows_into_concatenation():
    from transformers import DynamicCache

    from rollouts.hf_engine import RoomyLayer, reserve_room

    cache = DynamicCache()
    prompt_keys, prompt_values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache.update(prompt_keys, prompt_values, layer_idx=0)
    reserve_room(cache, 2)
    assert isinstance(cache.layers[0], RoomyLayer) and cache.get_seq_length() == 5
    new = [(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)) for _ in range(3)]
    for step, (k, v) in enumerate(new):  # the third step is beyond the room
        keys, values = cache.update(k, v, layer_idx=0)
        expected_keys = torch.cat([prompt_keys, *[n[0] for n in new[: step + 1]]], dim=-2)
        expected_values = torch.cat([prompt_values, *[n[1] for n in new[: step + 1]]], dim=-2)
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        assert cache.get_seq_length() == 6 + step


def test_one_query_attention_of_a_decode_step_matches_sdpa():
    from transformers import DynamicCache

    folder = resolve_model("tiny-random")
    model = load_policy(folder, "float32").double().eval()
    input_ids = torch.randint(0, model.config.vocab_size, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    step = torch.randint(0, model.config.vocab_size, (3, 1))

    def decode_logits():
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
            return model(
                input_ids=step,
                attention_mask=torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], 1),
                position_ids=attention_mask.sum(dim=1, keepdim=True),
                past_key_values=cache,
            ).logits

    ours = decode_logits()
    model.set_attn_implementation("sdpa")
    # float64, as above: within 6e-13
    torch.testing.assert_close(ours, decode_logits(), rtol=0, atol=1.3e-12)
