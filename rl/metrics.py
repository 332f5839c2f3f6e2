"""The update's metrics: weighted means over the micro-batches of each optimizer step, averaged
over the update's optimizer steps, read from the device once per optimizer step."""

from __future__ import annotations

import torch


class Metrics:
    """Averages over the optimizer steps of one update (weighted means within a step); names
    ending in /min or /max keep the extreme. Values may be device tensors: they are kept as
    they come and read in ``flush`` all at once (once per optimizer step), instead of a wait for
    the device at each; the arithmetic is then the same, in float64, in the same order."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        self.extremes: dict[str, float] = {}
        self.pending: list[tuple[str, torch.Tensor | float, float]] = []
        self.skipped = 0  # optimizer steps skipped: a non-finite loss or gradient norm

    def add(self, name: str, value: torch.Tensor | float, weight: float) -> None:
        self.pending.append((name, value, weight))

    def flush(self) -> None:
        """Read the pending values from the device (one wait) and add them up."""
        tensors = [value for _, value, _ in self.pending if isinstance(value, torch.Tensor)]
        read = iter(_read_scalars(tensors))
        for name, value, weight in self.pending:
            self._add(name, next(read) if isinstance(value, torch.Tensor) else value, weight)
        self.pending = []

    def _add(self, name: str, value: float, weight: float) -> None:
        if name.endswith("/min") or name.endswith("/max"):
            pick = min if name.endswith("/min") else max
            self.extremes[name] = pick(self.extremes.get(name, value), value)
            return
        if name in ("loss", "grad_norm"):  # once per optimizer step: closes the step's sums
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.steps[name] = self.steps.get(name, 0) + 1
            return
        self.sums[name] = self.sums.get(name, 0.0) + value * weight

    def result(self) -> dict[str, float]:
        self.flush()
        steps = max(self.steps.get("loss", 1), 1)
        out = {name: total / steps for name, total in self.sums.items()}
        return {**out, **self.extremes}


def _read_scalars(tensors: list[torch.Tensor]) -> list[float]:
    """float() of each one-element tensor, with one copy from the device for all of them
    (float64 holds every float32, bfloat16 or integer value exactly)."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.stack(
        [t.detach().reshape(()).to(device=device, dtype=torch.float64) for t in tensors]
    ).tolist()
