"""Whether this machine exposes a GPU, decided from device files alone (no torch import).

The CLI asks it before anything imports DeepSpeed, whose accelerator probe warns on every
machine without a GPU unless ``DS_ACCELERATOR=cpu`` names the CPU accelerator. Setting that on
a GPU machine would be worse than the warning: DeepSpeed would run ZeRO on the CPU. So the
answer errs towards "a GPU is here": any device file a GPU driver creates counts.

Device files rather than ``torch.cuda.is_available()``: importing torch costs seconds that
``aha tasks``, ``aha plot`` and the like never otherwise pay, and asking CUDA initialises the
driver. Where the files exist but CUDA does not work (a driver too old for the wheel),
DeepSpeed's own probe finds that out and picks the CPU accelerator with its warning.
"""

from __future__ import annotations

from pathlib import Path

# NVIDIA: /dev/nvidia0, /dev/nvidia1, ... (a container given GPU 3 has only /dev/nvidia3, next
# to /dev/nvidiactl, which exists without any GPU too); WSL2: /dev/dxg; AMD ROCm: /dev/kfd.
GPU_DEVICE_PATTERNS = ("nvidia[0-9]*", "dxg", "kfd")


def gpu_device_files(dev: Path = Path("/dev")) -> bool:
    """True when ``dev`` holds a GPU's device file."""
    return any(next(dev.glob(pattern), None) is not None for pattern in GPU_DEVICE_PATTERNS)
