"""Sparse upcycling (Komatsuzaki et al. 2023, arXiv 2212.05055): a dense Llama-style model made a
mixture of experts whose every expert starts as a copy of the dense MLP.

``model.name: smollm2-135m-moe`` is the embedded SmolLM2-135M-Instruct upcycled this way, 4
experts per layer and top-2 routing, built once into the model cache like the dense model
(about 350 M parameters, 1.4 GB in float32).

The layout is Mixtral's (``MixtralForCausalLM``), which transformers and vLLM both load: Llama's
attention exactly (Qwen3-MoE would add a norm on every query and key head, which changes the
function), and a router that always renormalises its top-k gates to sum to 1. That makes the
upcycled model compute the dense model's function exactly at step 0, whatever the router picks:
with identical experts, ``sum_k w_k * MLP(x) = MLP(x)`` when the ``w_k`` sum to 1 (up to float32
rounding: ``tests/test_moe_upcycle.py`` checks the logits within 1e-4). So the router can start
random, as in the paper, without changing the function: tokens then spread over the experts,
whose copies diverge as each is trained on its own tokens (a zero router would tie every token
to the first two experts, and the others would never train). The router itself gets no gradient
until the experts differ (the output does not depend on the gates while the experts are equal).
"""

from __future__ import annotations

from pathlib import Path

EXPERTS = 4
TOP_K = 2
VERSION = "v1"


def upcycled_config(dense_config, experts: int = EXPERTS, top_k: int = TOP_K):
    """The Mixtral config with the dense Llama config's attention, norms and vocabulary."""
    from transformers import MixtralConfig

    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("upcycling: Mixtral has no attention or MLP biases; this model has them")
    return MixtralConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=getattr(dense_config, "head_dim", None),
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        rope_parameters=dict(dense_config.rope_parameters),
        tie_word_embeddings=dense_config.tie_word_embeddings,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
    )


def upcycle(dense, experts: int = EXPERTS, top_k: int = TOP_K, seed: int = 0):
    """A MixtralForCausalLM from a dense LlamaForCausalLM: every weight copied, every MLP copied
    into ``experts`` experts, the routers drawn from transformers' own initialisation (normal,
    std ``initializer_range``) with ``seed``."""
    import torch
    from transformers import MixtralForCausalLM

    config = upcycled_config(dense.config, experts, top_k)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config).to(torch.float32)
    own = dict(moe.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, tensor in dense.state_dict().items():
            if ".mlp." not in name:
                if name in own:
                    own[name].copy_(tensor)
                    copied.add(name)
                continue
            layer = name.split(".mlp.")[0]
            if name.endswith("gate_proj.weight"):  # [I, H] -> the first half of each gate_up
                own[f"{layer}.mlp.experts.gate_up_proj"][:, : tensor.shape[0]] = tensor
            elif name.endswith("up_proj.weight"):  # [I, H] -> the second half
                own[f"{layer}.mlp.experts.gate_up_proj"][:, tensor.shape[0] :] = tensor
            elif name.endswith("down_proj.weight"):  # [H, I]
                own[f"{layer}.mlp.experts.down_proj"][:] = tensor
            copied.add(f"{layer}.mlp.experts.{name.split('.')[-2]}")
    routers = {name for name in own if name.endswith(".mlp.gate.weight")}
    experts_params = {name for name in own if ".mlp.experts." in name}
    missing = set(own) - copied - routers - experts_params
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"upcycling: no dense weight for {sorted(missing)[:3]}")
    moe.tie_weights()
    return moe


def upcycled_smollm2(dense_folder: Path, models_dir: Path) -> Path:
    """The embedded SmolLM2 upcycled (4 experts, top-2), built once under ``models_dir``."""
    from rl.models import _atomic_build

    target = models_dir / f"SmolLM2-135M-Instruct-moe-{EXPERTS}x{TOP_K}-{VERSION}"
    if (target / "config.json").is_file():
        return target

    def build(folder: Path) -> None:
        import shutil

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dense = AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32)
        upcycle(dense).save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(dense_folder).save_pretrained(folder)
        if (dense_folder / "generation_config.json").is_file():
            shutil.copy(dense_folder / "generation_config.json", folder / "generation_config.json")

    print(
        f"Upcycling the embedded SmolLM2-135M into {EXPERTS} experts (top-{TOP_K}) in {target} (once)...",
        flush=True,
    )
    return _atomic_build(target, build)
