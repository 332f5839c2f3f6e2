"""setup.sh's CUDA check after installing the gpu extra (scripts/check_cuda.sh), with a fake
``nvidia-smi`` on PATH and a fake python that reports what torch would: no GPU, no driver, no
reinstall."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="a bash script")

NVIDIA_SMI = """#!/bin/sh
# nvidia-smi as a driver $FAKE_DRIVER for CUDA $FAKE_DRIVER_CUDA answers aha's three questions
case "$*" in
    -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
    *--query-gpu=driver_version*) echo "$FAKE_DRIVER" ;;
    *) printf '| NVIDIA-SMI %s   Driver Version: %s   CUDA Version: %s     |\\n' \\
        "$FAKE_DRIVER" "$FAKE_DRIVER" "$FAKE_DRIVER_CUDA" ;;
esac
"""
# What `python -c 'import torch; print(version, torch.version.cuda, is_available())'` prints
PYTHON = """#!/bin/sh
if [ -n "$FAKE_TORCH_ERROR" ]; then echo "$FAKE_TORCH_ERROR" >&2; exit 1; fi
echo "$FAKE_TORCH"
"""


def fake_bin(folder: Path, **scripts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run(command: list[str], cwd: Path, bin_dir: Path, **fake: str):
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_TORCH_ERROR": ""}
    env.update({f"FAKE_{key.upper()}": value for key, value in fake.items()})
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "torch_report, driver, driver_cuda, expected",
    [
        ("2.13.0+cu129 12.9 True", "575.51.03", "12.9", None),
        (  # the case the check exists for: a wheel newer than the driver
            "2.13.0+cu129 12.9 False",
            "535.104.05",
            "12.2",
            "torch 2.13.0+cu129 is built for CUDA 12.9, but the NVIDIA driver 535.104.05 "
            "supports CUDA 12.2 at most, so torch sees no GPU; update the driver to one for "
            "CUDA 12.9 or newer",
        ),
        (
            "2.13.0+cpu none False",
            "575.51.03",
            "12.9",
            "torch 2.13.0+cpu is a CPU build, so aha would train on the CPU of this GPU machine",
        ),
        (  # a new enough driver (12.10 > 12.9 as versions): something else hides the GPU
            "2.13.0+cu129 12.9 False",
            "580.10.01",
            "12.10",
            "torch 2.13.0+cu129 (CUDA 12.9) sees no GPU although nvidia-smi lists one (driver "
            "580.10.01, CUDA 12.10); check that this process may use it",
        ),
    ],
)
def test_check_cuda_says_what_to_do_in_one_line(
    tmp_path, torch_report, driver, driver_cuda, expected
):
    bin_dir = fake_bin(tmp_path / "bin", **{"nvidia-smi": NVIDIA_SMI, "python": PYTHON})
    done = run(
        ["bash", str(ROOT / "scripts" / "check_cuda.sh"), str(bin_dir / "python")],
        tmp_path,
        bin_dir,
        torch=torch_report,
        driver=driver,
        driver_cuda=driver_cuda,
    )
    if expected is None:
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
        return
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: " + expected), done.stderr
    assert done.stderr.count("\n") == 1  # one line


def test_check_cuda_reports_a_torch_that_does_not_import(tmp_path):
    bin_dir = fake_bin(tmp_path / "bin", **{"nvidia-smi": NVIDIA_SMI, "python": PYTHON})
    done = run(
        ["bash", str(ROOT / "scripts" / "check_cuda.sh"), str(bin_dir / "python")],
        tmp_path,
        bin_dir,
        torch_error="ImportError: libcudart.so.12: cannot open shared object file",
        driver="535.104.05",
        driver_cuda="12.2",
    )
    assert done.returncode == 1
    assert "torch does not import" in done.stderr and "libcudart.so.12" in done.stderr


@pytest.mark.parametrize("available, returncode", [("True", 0), ("False", 1)])
def test_setup_sh_stops_when_the_installed_gpu_extra_sees_no_gpu(tmp_path, available, returncode):
    """setup.sh itself, in a copy of the repository whose venv is already installed (its stamp
    is there, and pip fails if called): nvidia-smi lists a GPU, so the gpu extra is the one
    installed, and the check decides the exit status."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "pyproject.toml", "scripts/check_cuda.sh"):
        shutil.copy2(ROOT / name, repo / name)
    digest = hashlib.sha1((repo / "pyproject.toml").read_bytes()).hexdigest()[:12]
    fake_bin(
        repo / ".venv" / "bin",
        python=PYTHON,
        pip="#!/bin/sh\necho 'pip must not run' >&2\nexit 99\n",
    )
    (repo / ".venv" / f".aha-installed-gpu-{digest}").touch()
    bin_dir = fake_bin(
        tmp_path / "bin", **{"nvidia-smi": NVIDIA_SMI, "bwrap": "#!/bin/sh\nexit 0\n"}
    )
    done = run(
        ["bash", str(repo / "setup.sh")],
        repo,
        bin_dir,
        torch=f"2.13.0+cu129 12.9 {available}",
        driver="535.104.05",
        driver_cuda="12.2",
    )
    assert done.returncode == returncode, done.stderr
    assert "pip must not run" not in done.stderr
    assert ("update the driver" in done.stderr) == (returncode == 1)
