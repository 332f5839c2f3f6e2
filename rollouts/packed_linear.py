"""Decode-step linear layers in MKL's packed weight layout, for the transformers engine on a CPU.

A decode step multiplies a handful of rows (one new token per sequence) by every weight matrix
of the model, and MKL's plain GEMM does that poorly: on the 2-core machine SmolLM2-135M's 211
matrix products for 8 rows take about 40 ms a step. With the weights reordered once into MKL's
packed format (what ``torch.compile`` uses on CPUs when it freezes weights), the same products
take about 28 ms, with the same results to float32 rounding. Other row counts (the prefill)
take the plain product.

A pack is a copy, so it must be remade whenever its weight changes. Trainable weights are
repacked at every ``generate`` call (``forget_trainable``): the optimizer changes them between
calls, and fused AdamW leaves no trace (it does not move the version counter). Frozen weights
(LoRA's base) are packed once and remade only if their version counter moves.

The packs cost memory: about twice the float32 weights while generating.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinears:
    """``with packed(model, rows):`` every plain float32 ``nn.Linear`` on the CPU runs MKL's
    packed GEMM for inputs of ``rows`` rows."""

    def __init__(self) -> None:
        # module -> (weight version, rows, packed weight)
        self._packs: dict[torch.nn.Linear, tuple[int, int, torch.Tensor]] = {}

    def forget_trainable(self) -> None:
        """Drop the packs of weights an optimizer may have changed since they were made."""
        self._packs = {m: p for m, p in self._packs.items() if not m.weight.requires_grad}

    @contextlib.contextmanager
    def __call__(self, model: torch.nn.Module, rows: int) -> Iterator[None]:
        patched = []
        try:
            for module in model.modules():
                if type(module) is torch.nn.Linear and _packable(module.weight):
                    # an instance attribute: this module only, removed on the way out
                    module.forward = self._forward(module, rows)
                    patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward
            # drop the packs of modules no longer in the model; keep the rest
            current = set(patched)
            self._packs = {m: p for m, p in self._packs.items() if m in current}

    def _forward(self, module: torch.nn.Linear, rows: int):
        weight, bias = module.weight, module.bias
        version, packed_rows, packed = self._packs.get(module, (-1, -1, None))
        if packed is None or version != weight._version or packed_rows != rows:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            self._packs[module] = (weight._version, rows, packed)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.numel() != rows * x.shape[-1] or x.dtype != torch.float32:
                return F.linear(x, weight, bias)
            return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)

        return forward


def _packable(weight: torch.Tensor) -> bool:
    return (
        type(weight) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor or other subclass
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
    )
