"""The rollout-engine interface: every engine returns the same `Rollout` records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rollouts.record import Prompt, Rollout


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # 0: greedy (evaluation)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)


class RolloutEngine(Protocol):
    """Samples completions and receives new weights after each optimizer step."""

    policy_version: int

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        """n completions per prompt, grouped: rollouts[i*n:(i+1)*n] belong to prompts[i]."""
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load the trainer's new weights (HF parameter names) and reset any cache."""
        ...

    def close(self) -> None: ...
