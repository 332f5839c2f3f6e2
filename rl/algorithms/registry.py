"""The registries every variant registers itself in; a config names a key."""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
AdvantageFn = Callable[..., Tensor]
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
AggregationFn = Callable[..., Tensor]
SamplerCorrectionFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
TeacherAdvantageFn = Callable[..., Tensor]

ADVANTAGES: dict[str, AdvantageFn] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
LOSS_AGGREGATIONS: dict[str, AggregationFn] = {}
KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
SAMPLER_CORRECTIONS: dict[str, SamplerCorrectionFn] = {}
TEACHER_ADVANTAGES: dict[str, TeacherAdvantageFn] = {}


def _register(registry: dict, name: str):
    def decorate(fn):
        registry[name] = fn
        return fn

    return decorate


def register_advantage(name: str):
    return _register(ADVANTAGES, name)


def register_policy_loss(name: str):
    return _register(POLICY_LOSSES, name)


def register_loss_aggregation(name: str):
    return _register(LOSS_AGGREGATIONS, name)


def register_kl_estimator(name: str):
    return _register(KL_ESTIMATORS, name)


def register_sampler_correction(name: str):
    return _register(SAMPLER_CORRECTIONS, name)


def register_teacher_advantage(name: str):
    return _register(TEACHER_ADVANTAGES, name)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the unmasked entries (0 if none). Broadcasts [B, 1] over [B, T]."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def per_token(advantages: Tensor) -> Tensor:
    """Advantages shaped to multiply per-token values: a sequence's [B] as [B, 1] (broadcast
    over its tokens), per-token ones [B, T] as they are."""
    return advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
