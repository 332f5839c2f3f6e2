"""The training loop. `train_step` is the algorithm: generate, score, advantages, update, sync."""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rl import algorithms
from rl.batch import (
    TokenBatch,
    collate,
    completion_logps,
    forward_tokens,
    logps_in_chunks,
    on_device,
)
from rl.config import Config
from rl.distill.on_policy import with_teacher_logps
from rl.distributed import Distributed, all_sum, gather_rows, reduce_metrics
from rl.metrics import Metrics
from rl.rollout_log import rollout_metrics, rollout_summary
from rl.schemes import DataParallel, choose
from rl.scoring import WeightedReward, score
from rollouts.base import RolloutEngine, SamplingSettings
from rollouts.record import Prompt, Rollout


@dataclass
class Trainer:
    """Everything a step needs, passed explicitly."""

    config: Config
    model: Any  # the policy (a peft model with LoRA)
    ref_model: Any | None  # None when beta == 0 or with LoRA (adapters are disabled instead)
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: RolloutEngine
    rewards: list[WeightedReward]
    sampling: SamplingSettings
    step: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)  # last step's rollouts, for the log
    dist: Distributed = field(default_factory=Distributed)  # this process among the ranks
    # FSDP2 or ZeRO-3 with the transformers engine: the whole (unsharded) copy it generates with
    engine_model: Any | None = None
    # How the ranks share the model (rl/schemes.py); None: chosen from ``dist``
    scheme: DataParallel | None = None
    # Optimizer steps in a row skipped for a non-finite loss or gradient norm
    nonfinite_in_a_row: int = 0
    moe: Any | None = None  # a mixture-of-experts policy's router patch (rl/moe/routing.py)
    teacher: Any | None = None  # on-policy distillation's (rl/distill/on_policy.py); None: none

    def __post_init__(self) -> None:
        if self.scheme is None:
            self.scheme = choose(self.dist)


class NonFiniteUpdateError(RuntimeError):
    """``train.max_nonfinite_steps`` optimizer steps in a row had a non-finite loss or gradient
    norm: the run stops (each was skipped, so the weights and checkpoints hold no inf or NaN)."""


def train_step(
    trainer: Trainer,
    prompts: list[Prompt],
    more_prompts: Callable[[], list[Prompt]] | None = None,
) -> dict[str, float]:
    """One GRPO-family step on a batch of prompts; returns the step's metrics.

    ``more_prompts`` gives fresh prompts for DAPO's dynamic sampling; without it, extra rounds
    resample the same prompts. With several processes, ``prompts`` are this rank's share (whole
    groups) and the returned metrics are over all ranks.
    """
    config, timings = trainer.config, {}

    rollouts, reward_metrics, sampling_metrics = collect_rollouts(
        trainer, prompts, more_prompts, timings
    )
    advantage_metrics = assign_advantages(
        rollouts, config.rollout.group_size, config.algorithm, trainer.dist
    )

    batch = collate(rollouts, trainer.tokenizer.pad_token_id, config.algorithm.mask_truncated)
    trainer.engine.release_memory()  # vLLM's sleep mode; sync_engine below pushes every weight
    update_metrics = policy_update(trainer, batch, timings)

    clock = time.perf_counter()
    trainer.step += 1
    sync_engine(trainer)
    timings["timing_s/sync"] = time.perf_counter() - clock

    trainer.samples = [rollout_summary(r) for r in rollouts]
    local_metrics = {
        **reward_metrics,
        **sampling_metrics,
        **advantage_metrics,
        **rollout_metrics(rollouts),
        **timings,
    }
    moe_metrics = trainer.moe.metrics(trainer.dist) if trainer.moe else {}  # over all ranks
    return {**reduce_metrics(trainer.dist, local_metrics), **update_metrics, **moe_metrics}


def sync_engine(trainer: Trainer) -> None:
    """The policy's weights into the rollout engine, version ``trainer.step``, streamed: one
    whole tensor at a time (under FSDP2 and ZeRO-3 each is gathered from the ranks as the engine
    draws it), never a second copy of the model. Every rank calls it, and every rank draws every
    tensor, in step: a shared vLLM server takes rank 0's push (rollouts/server.py), and what an
    engine leaves undrawn is drawn here. The transformers engine's whole copy (FSDP2, ZeRO-3)
    takes the trained tensors in place."""
    copy = trainer.engine_model
    weights = trainer.scheme.whole_weights(trainer.model, trainable_only=copy is not None)
    if copy is not None:
        own = dict(copy.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                own[name].copy_(tensor)
        weights = copy.named_parameters()
    trainer.engine.update_weights(weights, version=trainer.step)
    for _ in weights:  # the gathers an engine did not draw: every rank takes part in each
        pass


def generate_and_score(
    trainer: Trainer, prompts: list[Prompt], timings: dict[str, float]
) -> tuple[list[Rollout], dict[str, float]]:
    """G completions per prompt, scored; adds to the gen and reward timings."""
    config = trainer.config
    clock = time.perf_counter()
    rollouts = trainer.engine.generate(prompts, config.rollout.group_size, trainer.sampling)
    middle = time.perf_counter()
    metrics, _ = score(rollouts, trainer.rewards)  # each reward's own timeout
    for reward in trainer.rewards:  # the spread of each part, next to its mean
        values = [r.rewards[reward.name] for r in rollouts]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if len(values) > 1:
            metrics[f"reward/{reward.name}/std"] = torch.tensor(values).std().item()
    timings["timing_s/gen"] = timings.get("timing_s/gen", 0.0) + middle - clock
    timings["timing_s/reward"] = timings.get("timing_s/reward", 0.0) + time.perf_counter() - middle
    return rollouts, metrics


def collect_rollouts(
    trainer: Trainer,
    prompts: list[Prompt],
    more_prompts: Callable[[], list[Prompt]] | None,
    timings: dict[str, float],
) -> tuple[list[Rollout], dict[str, float], dict[str, float]]:
    """Generate and score; with dynamic sampling (DAPO, Yu et al. 2025 §3.2) drop the groups whose
    rewards are all equal and generate more until ``len(prompts)`` groups are kept or
    ``max_sampling_rounds`` extra rounds are spent. Reward metrics are the first round's (the
    policy on fresh prompts, before the filter biases them)."""
    algorithm, group_size = trainer.config.algorithm, trainer.config.rollout.group_size
    rollouts, reward_metrics = generate_and_score(trainer, prompts, timings)
    if not algorithm.dynamic_sampling:
        return rollouts, reward_metrics, {}
    wanted, kept, generated, rounds = len(prompts), [], 0, 0
    while True:
        rounds += 1
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
        keep = algorithms.informative_groups(rewards.view(-1, group_size))
        generated += len(keep)
        for group in keep.nonzero().flatten().tolist():
            kept.extend(rollouts[group * group_size : (group + 1) * group_size])
        if len(kept) >= wanted * group_size or rounds > algorithm.max_sampling_rounds:
            break
        fresh = more_prompts() if more_prompts is not None else prompts
        # new group ids, so every group of the step has its own
        fresh = [replace(p, index=p.index + rounds * wanted) for p in fresh]
        rollouts, _ = generate_and_score(trainer, fresh, timings)
    kept_groups = len(kept) // group_size
    metrics = {
        "sampling/frac_groups_dropped": 1 - kept_groups / generated,
        "sampling/rounds": float(rounds),
        "sampling/groups_kept": float(min(kept_groups, wanted)),
    }
    # Not full after the cap: train on what was kept; nothing kept: the last round (zero
    # advantages, so only the KL term, if any, moves the policy).
    return (kept[: wanted * group_size] or rollouts), reward_metrics, metrics


def assign_advantages(
    rollouts: list[Rollout], group_size: int, algorithm, dist: Distributed | None = None
) -> dict[str, float]:
    """Group the rewards [P, G], run the configured estimator, write each rollout's advantage.

    With several ranks the estimator sees every rank's groups (gathered, equal counts per rank),
    so batch-level scaling and the metrics are those of the whole step; each rank keeps its rows.
    """
    dist = dist or Distributed()
    local = torch.tensor([r.reward for r in rollouts], dtype=torch.float64).view(-1, group_size)
    rewards = gather_rows(dist, local)  # [P_all, G]
    advantages = algorithms.ADVANTAGES[algorithm.advantage](rewards, scale=algorithm.scale_rewards)
    own = advantages[dist.rank * len(local) : (dist.rank + 1) * len(local)]
    for rollout, advantage in zip(rollouts, own.flatten().tolist(), strict=True):
        rollout.advantage = advantage
    zero_std = (~algorithms.informative_groups(rewards)).float().mean().item()
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        "frac_reward_zero_std": zero_std,
    }


def policy_update(
    trainer: Trainer, batch: TokenBatch, timings: dict[str, float] | None = None
) -> dict[str, float]:
    """``epochs`` passes over the generation batch, each in mini-batches of
    ``train.mini_batch_size`` sequences, one optimizer step per mini-batch (gradient accumulation
    over micro-batches inside it); the LR scheduler steps once.

    Old log-probs: exactly on-policy (one epoch, one mini-batch) they equal the current ones, so
    they are not computed (the current ones, detached, are used: ratio 1, the clipped loss is the
    policy gradient). Otherwise they are computed once, before the first update, or taken from
    the sampler when ``algorithm.old_logps == "sampler"``. Reference (and teacher) log-probs once.
    """
    config, algorithm = trainer.config, trainer.config.algorithm
    timings = {} if timings is None else timings
    # mini_batch_size counts the sequences of all ranks; each rank takes its share
    mini_size = config.train.mini_batch_size // trainer.dist.world_size or len(batch)
    on_policy = algorithm.epochs == 1 and mini_size >= len(batch)
    temperature, chunk = config.rollout.temperature, config.train.micro_batch_size

    clock = time.perf_counter()
    if algorithm.old_logps == "sampler":
        if batch.sampler_logps is None:
            raise RuntimeError(
                "algorithm.old_logps=sampler, but the rollout engine gave no log-probs"
            )
        batch = replace(batch, old_logps=batch.sampler_logps)
    elif not on_policy:
        trainer.model.eval()  # behaviour policy = the sampling one: no dropout
        with autocast(trainer):
            old_logps = logps_in_chunks(
                trainer.model,
                batch,
                chunk,
                temperature,
                chunk_tokens(trainer),
                config.train.share_prompts,
                trainer.moe,
            )
        batch = replace(batch, old_logps=old_logps)
        timings["timing_s/old_logp"] = time.perf_counter() - clock
    if algorithm.beta > 0:
        clock = time.perf_counter()
        batch = replace(batch, ref_logps=reference_logps(trainer, batch))
        timings["timing_s/ref"] = time.perf_counter() - clock
    batch = with_teacher_logps(trainer, batch, timings)  # unchanged without a teacher

    clock = time.perf_counter()
    metrics, trained_tokens = Metrics(), 0
    for _ in range(algorithm.epochs):
        order = torch.arange(len(batch)) if on_policy else torch.randperm(len(batch))
        for start in range(0, len(batch), mini_size):
            mini = batch.select(order[start : start + mini_size])
            trained_tokens += optimizer_step(trainer, mini, metrics)
    # Once per training step, whether or not its optimizer steps were skipped: the schedule
    # follows the step count, and ends at train.steps as planned. (torch warns when the first
    # optimizer step was skipped, as if the order were wrong.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        trainer.scheduler.step()
    timings["timing_s/update"] = time.perf_counter() - clock
    # Every rank's share of a global sum adds up; grad_norm is the same on all ranks.
    result = metrics.result()
    summed = [n for n in result if n != "grad_norm" and not n.endswith(("/min", "/max"))]
    return {
        **reduce_metrics(
            trainer.dist,
            {
                **result,
                "tokens": float(batch.completion_mask.sum()),
                "update_tokens": float(trained_tokens),
            },
            summed=[*summed, "tokens", "update_tokens"],
        ),
        "learning_rate": trainer.scheduler.get_last_lr()[0],
        "optimizer_steps": float(algorithm.epochs * math.ceil(len(batch) / mini_size)),
        # skipped for a non-finite loss or gradient norm (the same on every rank)
        "optimizer_steps_skipped": float(metrics.skipped),
    }


def chunk_tokens(trainer: Trainer) -> int:
    """``train.logps_chunk_tokens`` as the scheme can run it (0, all at once, under ZeRO-3)."""
    return trainer.scheme.logps_chunk_tokens(trainer.config.train.logps_chunk_tokens)


def autocast(trainer: Trainer):
    """bf16 autocast of the trainer's forward passes on a GPU (``train.bf16_autocast``): matmuls
    in bf16, fp32 weights and optimizer; the log-softmax is float32 either way. A no-op on CPUs,
    where bf16 is slower than fp32 without bf16 units."""
    device = next(trainer.model.parameters()).device
    if trainer.config.train.bf16_autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_step(trainer: Trainer, batch: TokenBatch, metrics: Metrics) -> int:
    """One optimizer step on a mini-batch, in micro-batches; the loss's pieces are the
    registered functions the config names, and the scheme (``trainer.scheme``) runs what differs
    between one process, data parallel, FSDP2 and DeepSpeed. A step whose loss or gradient norm
    is not finite on any rank never reaches the optimizer: it is skipped, counted and said.
    Returns the tokens its forwards ran (for MFU)."""
    config, model, scheme, dist = trainer.config, trainer.model, trainer.scheme, trainer.dist
    algorithm = config.algorithm
    correction = algorithms.SAMPLER_CORRECTIONS.get(algorithm.sampler_correction)
    # The loss normalisers are those of the whole optimisation batch, over all ranks, so the sum
    # of the ranks' gradients is the one-process gradient.
    num_tokens = int(all_sum(dist, float(batch.completion_mask.sum())))
    num_sequences = len(batch) * dist.world_size
    device = next(model.parameters()).device

    model.train()
    scheme.zero_grad(trainer.optimizer)
    losses, trained_tokens = [], 0
    order = micro_batch_order(batch, config.train.share_prompts)
    micro_size = config.train.micro_batch_size
    for start in range(0, len(batch), micro_size):
        micro = batch.select(order[start : start + micro_size])
        mask = on_device(micro.completion_mask, device)
        # this micro-batch's share of tokens, from the host's mask (no wait for the device)
        weight = float(micro.completion_mask.sum()) / max(num_tokens, 1)
        scheme.before_forward()
        with autocast(trainer):
            logps, entropy = completion_logps(
                model,
                micro,
                config.rollout.temperature,
                True,
                chunk_tokens(trainer),
                config.train.share_prompts,
                trainer.moe,
            )
        old_logps = (
            logps.detach() if micro.old_logps is None else on_device(micro.old_logps, device)
        )
        sampler_weights, sampler_stats = None, {}
        if micro.sampler_logps is not None:
            sampler_logps = on_device(micro.sampler_logps, device)
            # the engine/trainer gap, on the same weights: the sampler's against the old ones
            gap = (old_logps - sampler_logps).abs()
            metrics.add("sampling/logp_gap", algorithms.masked_mean(gap, mask), weight)
            if correction is not None:  # pi_old / pi_sampler, fixed for the whole update
                sampler_weights, sampler_stats = correction(
                    old_logps,
                    sampler_logps,
                    mask,
                    algorithm.sampler_clip_min,
                    algorithm.sampler_clip_max,
                )
        loss, stats = algorithms.objective(
            logps,
            old_logps,
            on_device(micro.advantages, device),
            mask,
            policy_loss=algorithm.policy_loss,
            aggregation=algorithm.loss_aggregation,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            max_completion_length=config.rollout.max_tokens,
            epsilon_low=algorithm.epsilon_low,
            epsilon_high=algorithm.epsilon_high,
            clip_ratio_c=algorithm.clip_ratio_c,
            sampler_weights=sampler_weights,
            beta=algorithm.beta,
            ref_logps=None if micro.ref_logps is None else on_device(micro.ref_logps, device),
            kl_estimator=algorithm.kl_estimator,
            teacher_logps=on_device(micro.teacher_logps, device),
            teacher_coef=algorithm.teacher_coef,
            teacher_advantage=algorithm.teacher_advantage,
        )
        if trainer.moe:  # algorithm.router_aux_loss_coef's load balancing: this micro-batch's share
            loss = loss + weight * trainer.moe.aux_loss()
        losses.append(loss.detach())
        last = start + micro_size >= len(batch)
        discard = False
        if last:  # before the backward that may step (DeepSpeed's): the loss, over all ranks
            step_loss = _sum_in_order(losses)
            discard = not math.isfinite(all_sum(dist, step_loss))
        scheme.backward(loss, last=last, discard=discard)
        trained_tokens += forward_tokens(model, micro, config.train.share_prompts)
        metrics.add("entropy", algorithms.masked_mean(entropy, mask), weight)
        for name, value in {**stats, **sampler_stats}.items():
            metrics.add(name, value, weight)
    trainable = [p for p in model.parameters() if p.requires_grad]
    update = scheme.clip_and_step(trainer.optimizer, trainable, config.train.max_grad_norm, discard)
    metrics.add("loss", step_loss, 1.0)
    metrics.add("grad_norm", update.grad_norm, 1.0)
    metrics.flush()  # the step's metrics, read from the device at once
    if update.applied:
        trainer.nonfinite_in_a_row = 0
    else:
        trainer.nonfinite_in_a_row += 1
        metrics.skipped += 1
        if dist.is_main:
            limit = config.train.max_nonfinite_steps
            print(
                f"warning: step {trainer.step + 1}: optimizer step skipped, the loss ({step_loss:g}) "
                f"or the gradient norm ({update.grad_norm:g}) is not finite; weights and optimizer "
                f"state unchanged ({trainer.nonfinite_in_a_row} in a row"
                + (f", the run stops at {limit})" if limit else ")"),
                file=sys.stderr,
                flush=True,
            )
    return trained_tokens


def _sum_in_order(values: list[torch.Tensor]) -> float:
    """Left to right in float64, as adding each value's float() would (one read of the device)."""
    total = 0.0
    for value in torch.stack(values).tolist():
        total += value
    return total


def check_nonfinite_steps(trainer: Trainer, run_dir=None) -> None:
    """Stop the run when ``train.max_nonfinite_steps`` optimizer steps in a row were skipped for a
    non-finite loss or gradient norm (the same count on every rank). Called after a step is
    logged and before it is checkpointed."""
    limit = trainer.config.train.max_nonfinite_steps
    if not limit or trainer.nonfinite_in_a_row < limit:
        return
    last = None
    if run_dir is not None:
        from rl.checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir)
    where = f"the last checkpoint is {last}" if last is not None else "no checkpoint was written"
    raise NonFiniteUpdateError(
        f"train.max_nonfinite_steps: {trainer.nonfinite_in_a_row} optimizer steps in a row up to "
        f"step {trainer.step} had a non-finite loss or gradient norm; each was skipped, so the "
        f"weights hold no inf or NaN, and {where}. Look for an inf or NaN reward or advantage, "
        "or lower train.learning_rate"
    )


def micro_batch_order(batch: TokenBatch, keep_groups: bool) -> list[int]:
    """Rows by decreasing length, so micro-batches carry little padding; with ``keep_groups``,
    whole groups by their longest row, so a micro-batch runs each prompt once."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    if not keep_groups or batch.group_ids is None:
        return sorted(range(len(batch)), key=lambda i: -lengths[i])
    groups = batch.group_ids.tolist()
    longest: dict[int, int] = {}
    for group, length in zip(groups, lengths, strict=True):
        longest[group] = max(longest.get(group, 0), length)
    return sorted(range(len(batch)), key=lambda i: (-longest[groups[i]], groups[i], -lengths[i]))


@torch.no_grad()
def reference_logps(trainer: Trainer, batch: TokenBatch) -> torch.Tensor:
    """Log-probs [B, T] under the reference policy: the frozen copy, or, with LoRA, the same
    model with its adapters disabled (the base weights the adapters started from)."""
    config = trainer.config
    chunk, temperature = config.train.micro_batch_size, config.rollout.temperature
    tokens, share = chunk_tokens(trainer), config.train.share_prompts
    routing = trainer.moe.quiet() if trainer.moe else None  # replayed, not measured
    if trainer.ref_model is not None:
        with autocast(trainer):
            return logps_in_chunks(
                trainer.ref_model, batch, chunk, temperature, tokens, share, routing
            )
    was_training = trainer.model.training
    trainer.model.eval()
    with trainer.model.disable_adapter(), autocast(trainer):
        logps = logps_in_chunks(trainer.model, batch, chunk, temperature, tokens, share, routing)
    trainer.model.train(was_training)
    return logps


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs (vLLM's GPU model runner draws each request's
    sampling seed from numpy's)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seed takes 32 bits
    torch.manual_seed(seed)
