"""Model FLOPs utilisation: how much of the accelerator's peak the training step uses; and the
CPU allocator setting that keeps a CPU training step from paging its memory in again."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys

import torch

# Dense bf16 tensor-core peak FLOP/s by device name (vendor datasheets, without sparsity).
# MFU is reported against the bf16 peak, as is usual, whatever the training dtype. A key matches
# whole words of torch's device name ("NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB"), the longest
# key first, so a variant never takes its family's figure.
PEAK_BF16_FLOPS = {
    "H200": 989e12,  # SXM
    "H200 NVL": 835e12,  # PCIe card, lower clocks and power
    "GH200": 989e12,  # the Grace Hopper superchip's GPU is an H100/H200-class SXM part
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,  # how torch names the SXM part
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,  # an unknown H100 variant: the lowest
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None for CPUs and GPUs not in the table."""
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def peak_flops_by_name(name: str) -> float | None:
    """The table's figure for a device name: the longest key found as whole words in it ("H200
    NVL" before "H200"; "L4" not inside "L40"; "H200" not inside "GH200"), else None."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return PEAK_BF16_FLOPS[key]
    return None


def training_flops_per_token(model) -> float:
    """Matmul FLOPs of one token's forward and backward: 2 per parameter forward, 2 per
    parameter for the gradient with respect to the activations (every layer passes it down,
    frozen or not), and 2 more per *trainable* parameter for its weight gradient. So 6N for full
    fine-tuning (Kaplan et al. 2020), and 4N + 6 x the adapters' parameters for LoRA, whose
    frozen base computes no weight gradients. Attention's own FLOPs are left out, as usual, and
    so is recomputation under gradient checkpointing (MFU counts the model's work, not the
    hardware's)."""
    total = trainable = 0
    for parameter in model.parameters():
        # ZeRO-3 leaves each rank a partition; ds_numel is the whole parameter's size
        count = getattr(parameter, "ds_numel", None) or parameter.numel()
        total += count
        if getattr(parameter, "requires_grad", True):
            trainable += count
    return 4 * total + 2 * trainable


def model_flops_utilisation(model, tokens_per_second: float) -> float | None:
    """``training_flops_per_token`` x trained tokens per second / peak. ``tokens_per_second`` is
    per device and counts what the update's forwards and backwards ran (``update_tokens``: every
    completion token and each shared prompt once) over the update phase's time, so generation
    and the old/reference log-probs are not in it. None off GPUs."""
    device = next(model.parameters()).device
    peak = peak_flops(device)
    if peak is None:
        return None
    return training_flops_per_token(model) * tokens_per_second / peak


def reset_peak_memory(device: torch.device) -> None:
    """Start a step's peak-memory count (accelerators; a CPU process keeps one lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def step_perf(metrics: dict[str, float], model, world_size: int) -> dict[str, float]:
    """The step's ``perf/*`` metrics, per device, from its ``tokens``, ``update_tokens`` and
    timings: ``perf/throughput`` (completion tokens per second over the whole step),
    ``perf/update_throughput`` (tokens the update ran per second of ``timing_s/update``),
    ``perf/mfu`` (GPUs in the peak table), and the peak memory: ``perf/peak_memory_gib``, what
    torch allocated on the accelerator during the step, or on CPUs ``perf/peak_rss_gib``, the
    process's resident-set peak so far (everything in it: the rollout engine too)."""
    out = {"perf/throughput": metrics["tokens"] / metrics["timing_s/step"] / world_size}
    update_s = metrics.get("timing_s/update", 0.0)
    if update_s > 0 and "update_tokens" in metrics:
        update_throughput = metrics["update_tokens"] / update_s / world_size
        out["perf/update_throughput"] = update_throughput
        mfu = model_flops_utilisation(model, update_throughput)
        if mfu is not None:
            out["perf/mfu"] = mfu
    device = next(model.parameters()).device
    if device.type == "cuda":
        out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    elif sys.platform.startswith("linux"):
        import resource

        # ru_maxrss is in KiB on Linux
        out["perf/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A CPU training step allocates and frees the same large tensors every step (a [tokens, vocab]
    logits block, a [vocab, hidden] gradient: 100 MB each for SmolLM2). glibc serves every block
    over 32 MB with a fresh mmap and unmaps it on free, so each step page-faults all of them in
    again: filling a 113 MB gradient took ~120 ms where writing it takes ~10. With mmap off and
    no trimming, freed blocks go back to malloc's own free lists and the next step reuses them:
    ~8% off SmolLM2's step on the 2-core CPU (generation and update alike). The cost: the
    process keeps its peak memory until it exits (as jemalloc or tcmalloc, Intel's advice for
    PyTorch on CPUs, would). ``AHA_KEEP_FREED_MEMORY=0`` leaves malloc as it is.

    Returns whether the setting was applied (Linux with glibc only).
    """
    if os.environ.get("AHA_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
