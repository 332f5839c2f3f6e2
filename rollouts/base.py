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
    """Samples completions and receives new weights after each optimizer step.

    A training step calls ``generate`` (once, or more for dynamic sampling), then
    ``release_memory``, runs the update, then ``update_weights`` with every tensor. Evaluation
    calls ``generate`` alone, chunk after chunk."""

    policy_version: int

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingSettings) -> list[Rollout]:
        """n completions per prompt, grouped: rollouts[i*n:(i+1)*n] belong to prompts[i]."""
        ...

    def release_memory(self) -> None:
        """The update is next and a full ``update_weights`` follows it: free what the engine
        holds on the accelerator until then (vLLM's sleep mode). A no-op where that means
        nothing; an engine whose weights this discards must refuse to generate before the
        next ``update_weights``."""
        ...

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load the trainer's new weights (HF parameter names) and reset any cache.

        ``named_tensors`` is a stream, drawn once, in order: an engine puts each tensor where it
        goes as it comes and keeps none it does not need (under FSDP2 and ZeRO-3 each is
        gathered from all ranks as it is drawn; the trainer draws whatever an engine leaves)."""
        ...

    def close(self) -> None: ...
