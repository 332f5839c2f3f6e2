"""Model FLOPs utilisation: how much of the accelerator's peak the training step uses."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak FLOP/s by device name (vendor datasheets, without sparsity).
# MFU is reported against the bf16 peak, as is usual, whatever the training dtype.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,  # how torch names the SXM part
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,  # an unknown H100 variant: the lowest
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None for CPUs and GPUs not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # longest key first, so "H100 PCIe" wins over "H100" and "A10G" over "A10"
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def model_flops_utilisation(model, tokens_per_second: float) -> float | None:
    """6 x trainable-or-not parameters x trained tokens per second / peak (Kaplan et al. 2020's
    6N per token for forward and backward). ``tokens_per_second`` is per device and counts the
    completion tokens over the whole step, generation included, so this is the training share of
    the step's work: a lower bound on what the GPU does. None off GPUs."""
    device = next(model.parameters()).device
    peak = peak_flops(device)
    if peak is None:
        return None
    # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return 6 * parameters * tokens_per_second / peak
