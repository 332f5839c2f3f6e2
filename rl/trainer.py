"""The training loop. `train_step` is the algorithm: generate, score, advantages, update, sync."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rl import algorithms
from rl.batch import TokenBatch, collate, completion_logps
from rl.config import Config
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


def train_step(trainer: Trainer, prompts: list[Prompt]) -> dict[str, float]:
    """One GRPO-family step on a batch of prompts; returns the step's metrics."""
    config, timings = trainer.config, {}
    clock = time.perf_counter()

    rollouts = trainer.engine.generate(prompts, config.rollout.group_size, trainer.sampling)
    timings["timing_s/gen"], clock = time.perf_counter() - clock, time.perf_counter()

    reward_metrics, _ = score(rollouts, trainer.rewards, config.algorithm.reward_timeout_s)
    timings["timing_s/reward"], clock = time.perf_counter() - clock, time.perf_counter()

    advantage_metrics = assign_advantages(rollouts, config.rollout.group_size, config.algorithm)

    update_metrics = policy_update(
        trainer, collate(rollouts, trainer.tokenizer.pad_token_id, config.algorithm.mask_truncated)
    )
    timings["timing_s/update"], clock = time.perf_counter() - clock, time.perf_counter()

    trainer.step += 1
    trainer.engine.update_weights(trainer.model.named_parameters(), version=trainer.step)
    timings["timing_s/sync"] = time.perf_counter() - clock

    trainer.samples = [rollout_summary(r) for r in rollouts]
    return {
        **reward_metrics,
        **advantage_metrics,
        **rollout_metrics(rollouts),
        **update_metrics,
        **timings,
    }


def assign_advantages(rollouts: list[Rollout], group_size: int, algorithm) -> dict[str, float]:
    """Group the rewards [P, G], run the configured estimator, write each rollout's advantage."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64).view(-1, group_size)
    advantages = algorithms.ADVANTAGES[algorithm.advantage](rewards, scale=algorithm.scale_rewards)
    for rollout, advantage in zip(rollouts, advantages.flatten().tolist(), strict=True):
        rollout.advantage = advantage
    zero_std = (rewards.std(dim=1) < 1e-6).float().mean().item()
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        "frac_reward_zero_std": zero_std,
    }


def rollout_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    lengths = [len(r.completion_ids) for r in rollouts]
    return {
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": float(max(lengths)),
        "response_length/clip_ratio": sum(r.truncated for r in rollouts) / len(rollouts),
    }


def policy_update(trainer: Trainer, batch: TokenBatch) -> dict[str, float]:
    """One optimizer step over the batch in micro-batches (gradient accumulation).

    On-policy with one epoch, the old log-probs equal the current ones (detached), so the ratio
    is 1 and the clipped loss reduces to the policy gradient; the sampler's log-probs are used
    to measure the engine/trainer gap.
    """
    config, model = trainer.config, trainer.model
    algorithm = config.algorithm
    policy_loss = algorithms.POLICY_LOSSES[algorithm.policy_loss]
    aggregate = algorithms.LOSS_AGGREGATIONS[algorithm.loss_aggregation]
    kl_estimator = algorithms.KL_ESTIMATORS[algorithm.kl_estimator]
    num_tokens = int(batch.completion_mask.sum())
    totals: dict[str, float] = {}

    def add(name: str, value: float, weight: float) -> None:
        totals[name] = totals.get(name, 0.0) + value * weight

    model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    order = sorted(
        range(len(batch)), key=lambda i: -int(batch.attention_mask[i].sum())
    )  # similar lengths together
    for start in range(0, len(batch), config.train.micro_batch_size):
        micro = batch.select(order[start : start + config.train.micro_batch_size])
        mask = micro.completion_mask.to(next(model.parameters()).device)
        logps, entropy = completion_logps(
            model, micro, config.rollout.temperature, with_entropy=True
        )
        old_logps = logps.detach()
        per_token_loss, stats = policy_loss(
            logps,
            old_logps,
            micro.advantages.to(logps.device),
            mask,
            epsilon_low=algorithm.epsilon_low,
            epsilon_high=algorithm.epsilon_high,
        )
        if algorithm.beta > 0:
            ref_logps = reference_logps(trainer, micro)
            kl = kl_estimator(logps, ref_logps)
            per_token_loss = per_token_loss + algorithm.beta * kl
            add("kl", float((kl.detach() * mask).sum()), 1 / max(num_tokens, 1))
        loss = aggregate(
            per_token_loss,
            mask,
            num_sequences=len(batch),
            num_tokens=num_tokens,
            max_completion_length=config.rollout.max_tokens,
        )
        loss.backward()
        tokens_here = float(mask.sum())
        add("loss", float(loss.detach()), 1.0)
        add("entropy", float((entropy * mask).sum()), 1 / max(num_tokens, 1))
        for name, value in stats.items():
            add(name, float(value), tokens_here / max(num_tokens, 1))
        if micro.sampler_logps is not None:
            gap = (logps.detach() - micro.sampler_logps.to(logps.device)).abs() * mask
            add("sampling/logp_gap", float(gap.sum()), 1 / max(num_tokens, 1))
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], config.train.max_grad_norm
    )
    trainer.optimizer.step()
    trainer.scheduler.step()
    totals["grad_norm"] = float(grad_norm)
    totals["learning_rate"] = trainer.scheduler.get_last_lr()[0]
    totals["tokens"] = float(num_tokens)
    return totals


@torch.no_grad()
def reference_logps(trainer: Trainer, micro: TokenBatch) -> torch.Tensor:
    """Log-probs under the reference policy: the frozen copy, or the LoRA base with adapters off."""
    if trainer.ref_model is not None:
        return completion_logps(trainer.ref_model, micro, trainer.config.rollout.temperature)[0]
    with trainer.model.disable_adapter():
        return completion_logps(trainer.model, micro, trainer.config.rollout.temperature)[0]


def rollout_summary(rollout: Rollout) -> dict[str, Any]:
    messages = rollout.prompt.messages
    prompt_text = messages[-1]["content"] if isinstance(messages, list) else messages
    return {
        "prompt": prompt_text,
        "completion": rollout.completion,
        "answer": rollout.prompt.row.get("answer"),
        "rewards": rollout.rewards,
        "reward": rollout.reward,
        "advantage": rollout.advantage,
        "finish_reason": rollout.finish_reason,
        "completion_tokens": len(rollout.completion_ids),
        "policy_version": rollout.policy_version,
        "group": rollout.group,
    }


def evaluate(
    engine: RolloutEngine, prompts: list[Prompt], rewards: list[WeightedReward], max_tokens: int
) -> dict[str, float]:
    """Greedy held-out scores: each reward's mean, and `accuracy`, the share of prompts whose
    first reward (the task's correctness reward) is at least 1."""
    greedy = SamplingSettings(temperature=0.0, max_tokens=max_tokens)
    rollouts = engine.generate(prompts, 1, greedy)
    metrics, _ = score(rollouts, rewards, timeout_s=600)
    first = rewards[0].name
    correct = [1.0 if (r.rewards[first] or 0) >= 1 else 0.0 for r in rollouts]
    metrics = {k: v for k, v in metrics.items() if not k.endswith("/errors")}
    return {"accuracy": sum(correct) / len(correct), **metrics}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def is_finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for k, v in metrics.items() if k in ("loss", "grad_norm"))
