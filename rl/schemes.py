"""How the training processes share the model: one object per scheme, chosen once at set-up.

The training step (``rl/trainer.py``) never asks which scheme runs. It calls its scheme for the
few things that differ between them:

- ``prepare``: the policy (and reference) as the scheme holds them: as given, sharded by
  FSDP2, or handed to DeepSpeed's engine; ``prepare_frozen`` a teacher, as the reference;
- ``zero_grad``, ``before_forward``, ``backward``: around each micro-batch of an optimizer step;
- ``clip_and_step``: the gradients summed over the ranks, clipped to ``train.max_grad_norm`` and
  applied, unless the step's loss or gradient norm is not finite (then the step is skipped:
  the weights and the optimizer state are left exactly as they were, and the gradients are
  dropped); the gradients are freed right after, so they do not stay allocated through
  generation;
- ``whole_weights``: (name, whole tensor) of the policy, one parameter at a time, gathered from
  the ranks where no rank holds whole weights (FSDP2, ZeRO-3): the rollout engine's weight sync;
- ``full_state_dict``, ``full_optimizer_state``, ``load_optimizer_state``: rank 0's checkpoints
  and their resume, in one format whatever the scheme (a Hugging Face folder, the optimizer state
  keyed by parameter name where it is sharded).

The schemes: ``DataParallel`` (here: one process, or several each holding the whole model, with
the gradients summed by one all-reduce per optimizer step), ``FSDP2`` (``rl/sharded.py``) and
``DeepSpeedZeRO`` (ZeRO-2 and ZeRO-3, ``rl/zero.py``). ``choose`` picks one from what
``rl.distributed.init`` found in the launcher's environment.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rl.distributed import Distributed, sum_gradients

Named = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Update:
    """What an optimizer step did."""

    grad_norm: float  # the global gradient norm before clipping (inf or nan when not finite)
    applied: bool  # False: skipped, the weights and the optimizer state are unchanged


class DataParallel:
    """Every rank holds the whole model and the whole optimizer; each computes its share of the
    global loss (global normalisers), and the ranks' gradients are summed by one bucketed
    all-reduce per optimizer step (``rl.distributed.sum_gradients``): the one-process gradient.
    With one process nothing is communicated. The base of the other schemes."""

    name = "data parallel"
    # No rank holds whole weights: they are gathered for the engine and the checkpoints.
    partitioned_weights = False

    def __init__(self, dist: Distributed | None = None):
        self.dist = dist or Distributed()

    # ------------------------------------------------------------------ set-up

    def prepare(
        self,
        model,
        optimizer: torch.optim.Optimizer,
        ref_model=None,
        micro_batch_size: int = 1,
        max_grad_norm: float = 1.0,
    ):
        """(policy, reference) as this scheme trains them; the policy returned is always the
        model itself, never a wrapper."""
        return model, ref_model

    def prepare_frozen(self, model):
        """A frozen model that only scores (on-policy distillation's teacher), held as this
        scheme holds the reference: as given here."""
        return model

    def logps_chunk_tokens(self, configured: int) -> int:
        """``train.logps_chunk_tokens`` as this scheme can run it."""
        return configured

    # ------------------------------------------------------------------ one optimizer step

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def before_forward(self) -> None:
        """Called before each training micro-batch's forward."""

    def backward(self, loss: torch.Tensor, last: bool, discard: bool) -> None:
        """Backward of this rank's share of the loss. ``last``: the optimizer step's last
        micro-batch; ``discard`` (given with the last one): the step's loss is not finite on
        some rank, so the step must not reach the optimizer (the same on every rank)."""
        loss.backward()

    def clip_and_step(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: list[torch.nn.Parameter],
        max_norm: float,
        discard: bool,
    ) -> Update:
        sum_gradients(self.dist, parameters)  # one process: nothing
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return self._step_if_finite(optimizer, norm, discard)

    def _step_if_finite(self, optimizer, norm, discard: bool) -> Update:
        """The optimizer step, unless ``discard`` or the global gradient norm is not finite (the
        norm is the same on every rank, so is the decision); the gradients freed either way.
        Reading the norm is the step's one wait for the device: the decision is the host's."""
        grad_norm = float(norm)
        applied = not discard and math.isfinite(grad_norm)
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return Update(grad_norm, applied)

    # ------------------------------------------------------------------ whole weights

    def whole_weights(self, model: torch.nn.Module, trainable_only: bool = False) -> Named:
        """(name, whole tensor) of the model's parameters, one at a time, in the model's order,
        under the names the Hugging Face model has. Where weights are partitioned each tensor
        is a collective gather as it is drawn, so every rank must draw all of them, in step."""
        for name, p in model.named_parameters():
            if p.requires_grad or not trainable_only:
                yield canonical_name(name), p.detach()

    # ------------------------------------------------------------------ checkpoints

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model state dict on rank 0 (empty on the others) where no rank holds it;
        None where the model itself has it. Every rank must call it."""
        return None

    def full_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """The whole optimizer state on rank 0, keyed by parameter name, where it is sharded;
        None where ``optimizer.state_dict()`` is whole. Every rank must call it."""
        return None

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        """A checkpoint's optimizer state: a plain ``state_dict()`` (ids in parameter order),
        or one keyed by name (written under FSDP2 or DeepSpeed)."""
        if not keyed_by_name(state):
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )


def choose(dist: Distributed) -> DataParallel:
    """The scheme of ``rl.distributed.init``'s processes: DeepSpeed ZeRO, FSDP2, or plain data
    parallel (one process included)."""
    if dist.zero_stage:
        from rl.zero import DeepSpeedZeRO

        return DeepSpeedZeRO(dist)
    if dist.accelerator is not None:
        from rl.sharded import FSDP2

        return FSDP2(dist)
    return DataParallel(dist)


# ---------------------------------------------------------------------- helpers of the schemes


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' parts (FSDP2 activation checkpointing,
    torch.compile): the name the Hugging Face model and the rollout engines know."""
    for part in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(part, "")
    return name


def keyed_by_name(state: dict) -> bool:
    """Whether an optimizer state dict names its parameters (torch's distributed-checkpoint
    format) rather than numbering them."""
    return any(isinstance(key, str) for key in state.get("state", {})) or any(
        isinstance(key, str) for group in state.get("param_groups", []) for key in group["params"]
    )


def named_by_order(state: dict, names: list[str]) -> dict:
    """A plain ``state_dict()`` (parameters numbered in the optimizer's order) keyed by name."""
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
