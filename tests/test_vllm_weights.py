"""The weight translation the vLLM engines push (pure torch: runs without vLLM, not marked)."""

from __future__ import annotations

import pytest
import torch

from rl.config import LoraConfig
from rl.models import load_policy, resolve_model
from rollouts.vllm_engine import auto_kv_cache_gb
from rollouts.weights import vllm_named_tensors


def test_tied_embeddings_get_an_lm_head():
    model = load_policy(resolve_model("tiny-random"), "float32")
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # tied: named_parameters lists the embedding once
    pushed = dict(vllm_named_tensors(model.named_parameters(), tie_word_embeddings=True))
    assert torch.equal(pushed["lm_head.weight"], pushed["model.embed_tokens.weight"])
    assert set(pushed) == {*names, "lm_head.weight"}


def test_lora_is_merged_like_peft_merge_and_unload():
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = load_policy(resolve_model("tiny-random"), "float32", lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    pushed = dict(
        vllm_named_tensors(model.named_parameters(), True, lora_scaling=lora.alpha / lora.r)
    )
    merged = model.merge_and_unload().state_dict()
    assert not any("lora" in name or "base_layer" in name for name in pushed)
    # W + 2 B A either way: a 4-term dot product of terms below 0.5 (B ~ N(0, 1) below 4, A below
    # 0.125), doubled exactly, then one addition: each side within (2 x 3 x 2 + 4.1) x 2^-24 =
    # 1e-6 of exact, in any order. A wrong scaling or a transposed product is off by 0.1 and more.
    for name, tensor in merged.items():
        assert torch.allclose(pushed[name], tensor, rtol=0, atol=1e-5), name


@pytest.mark.parametrize(
    "name",
    [
        "tiny-random-qwen3-moe",
        "tiny-random-mixtral",
        "tiny-random-olmoe",
        "tiny-random-deepseek-v3",
    ],
)
def test_expert_lora_is_merged_like_peft_merge_and_unload(name):
    """LoRA on the fused expert weights (peft's target_parameters, one nested wrapper per
    weight): pushed merged, as peft merges them; before this was tested the adapters were
    dropped and vLLM sampled the base experts (sampling/logp_gap 0.016 from step 2 on)."""
    lora = LoraConfig(enabled=True, r=4, alpha=8, experts=True)
    model = load_policy(resolve_model(name), "float32", lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    assert any(".experts.lora_B" in n for n, _ in model.named_parameters())
    pushed = dict(
        vllm_named_tensors(model.named_parameters(), True, lora_scaling=lora.alpha / lora.r)
    )
    merged = dict(model.merge_and_unload().named_parameters())  # buffers are not pushed
    assert not any("lora" in n or "base_layer" in n for n in pushed)
    assert {n for n in merged if "experts" in n} <= set(pushed)
    # per expert element the same 4-term product over the rank as the dense case above (A's
    # fan-in 64 or 128: below 0.125; B ~ N(0, 1): below 4), doubled, then one addition: 1e-5
    for tensor_name, tensor in merged.items():
        assert torch.allclose(pushed[tensor_name], tensor, rtol=0, atol=1e-5), tensor_name


def test_kv_cache_size_follows_free_memory():
    assert auto_kv_cache_gb(4) == 1
    assert auto_kv_cache_gb(21) == 2
    assert auto_kv_cache_gb(500) == 8
