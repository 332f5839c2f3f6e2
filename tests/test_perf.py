"""Throughput helpers: MFU's arithmetic and the CPU allocator setting."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rl.perf import model_flops_utilisation, peak_flops


def test_mfu_is_none_on_a_cpu_and_six_n_per_token_on_a_known_gpu(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert model_flops_utilisation(torch.nn.Linear(10, 10), 1000.0) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == 989e12
    weight = SimpleNamespace(numel=lambda: 110, device=torch.device("cuda"))
    on_gpu = SimpleNamespace(parameters=lambda: iter([weight]))
    assert model_flops_utilisation(on_gpu, 1000.0) == pytest.approx(6 * 110 * 1000.0 / 989e12)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("switch, applied", [(None, "True"), ("0", "False")])
def test_keep_freed_memory_applies_on_linux_unless_switched_off(switch, applied):
    env = {k: v for k, v in os.environ.items() if k != "AHA_KEEP_FREED_MEMORY"}
    if switch is not None:
        env["AHA_KEEP_FREED_MEMORY"] = switch
    code = "from rl.perf import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [applied]
