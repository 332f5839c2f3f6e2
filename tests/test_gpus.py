"""rl.gpus: whether a GPU is here, from device files, for the CLI's DS_ACCELERATOR default."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from rl.gpus import gpu_device_files


@pytest.mark.parametrize(
    "files, gpu",
    [
        ([], False),
        (["nvidiactl", "nvidia-uvm", "null"], False),  # the driver is loaded, no GPU is given
        (["nvidiactl", "nvidia0"], True),
        (["nvidiactl", "nvidia-uvm", "nvidia3"], True),  # a container given the host's GPU 3
        (["dxg"], True),  # WSL2
        (["kfd", "dri"], True),  # AMD ROCm
    ],
)
def test_gpu_device_files(tmp_path, files, gpu):
    for name in files:
        (tmp_path / name).touch()
    assert gpu_device_files(tmp_path) is gpu


def test_the_cli_names_the_cpu_accelerator_only_without_a_gpu_device():
    """`aha` sets DS_ACCELERATOR=cpu exactly when gpu_device_files() says no GPU (and keeps a
    value the user exported)."""
    code = (
        "import os, sys; from rl import cli; from rl.gpus import gpu_device_files; "
        "cli.main(['tasks']); print(gpu_device_files(), os.environ.get('DS_ACCELERATOR'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    gpu, accelerator = done.stdout.split()[-2:]
    assert accelerator == ("None" if gpu == "True" else "cpu")
    env["DS_ACCELERATOR"] = "cuda"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.split()[-1] == "cuda"
