"""The weight translation the vLLM engines push (pure torch: runs without vLLM, not marked)."""

from __future__ import annotations

import torch

from rl.config import LoraConfig
from rl.models import load_policy, resolve_model
from rollouts.vllm_engine import auto_kv_cache_gb, vllm_named_tensors


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


def test_kv_cache_size_follows_free_memory():
    assert auto_kv_cache_gb(4) == 1
    assert auto_kv_cache_gb(21) == 2
    assert auto_kv_cache_gb(500) == 8
