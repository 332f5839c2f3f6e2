"""Tiny random mixture-of-experts models, one per family, for the tests: ``model.name:
tiny-random-mixtral``, ``tiny-random-qwen3-moe``, ``tiny-random-olmoe``,
``tiny-random-deepseek-v3``.

Each is built in a second or two on first use, with the tiny dense model's tokenizer
(``rl.models``' ``tiny-random``), 2 decoder layers, 4 experts (8 for DeepSeek-V3, in 2 groups)
and top-2 routing. Attention heads are 32 wide, the smallest vLLM's CPU attention accepts.
DeepSeek-V3's defaults would make a 2-layer model with no routed layer at all
(``first_k_dense_replace=3``) and need 8 expert groups (``n_group=8``): here the first layer is
dense and the second routed, with 8 experts in 2 groups of which 1 is chosen (its grouped
top-k does something). ``tests/test_moe.py`` checks that every tiny model has routed layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY_MOE = {
    "tiny-random-mixtral": "mixtral",
    "tiny-random-qwen3-moe": "qwen3_moe",
    "tiny-random-olmoe": "olmoe",
    "tiny-random-deepseek-v3": "deepseek_v3",
}
VERSION = "v3"  # a new value rebuilds the cached folders


def tiny_config(family: str, tokenizer):
    """The tiny config of one family, with the tokenizer's vocabulary and special tokens."""
    from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "mixtral":
        return MixtralConfig(
            **common, head_dim=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            head_dim=32,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if family == "olmoe":  # OLMoE's head size is hidden / heads: 128 / 4 = 32
        return OlmoeConfig(
            **{**common, "hidden_size": 128},
            intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
        )
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=32,
            kv_lora_rank=288,  # + qk_rope_head_dim = 320, a head size vLLM's MLA takes
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=32,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            # what DeepSeek-V3's own config.json says and vLLM reads (transformers assumes both)
            topk_method="noaux_tc",
            scoring_func="sigmoid",
        )
    raise ValueError(f"no tiny model for family {family!r}")


def build_tiny_moe(name: str, target: Path, tiny_dense: Path) -> None:
    """Write the tiny MoE model ``name`` into ``target`` (a fresh folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rl.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_dense)
    config = tiny_config(TINY_MOE[name], tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    shutil.copy(tiny_dense / "generation_config.json", target / "generation_config.json")
