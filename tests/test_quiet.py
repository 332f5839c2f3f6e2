"""rl/quiet.py: the third-party lines known to be harmless are dropped, each precisely (a look-alike
with another message still shows), and AHA_VERBOSE=1 keeps them all. The lines are those the
main job printed (vLLM 0.32, torch 2.13 on a CPU)."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT

from rl import quiet

REDUCE_OP = (
    "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead"
)
TRITON = "Triton not available, find_triton_kernels = []"
NUMA = (
    b"[W1203 07:35:26.952112576 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for "
    b"memory allocation on the NUMA nodes (0). Memory allocations will be strictly bound to these "
    b"NUMA nodes. (function init_cpu_memory_env)\n"
)


@pytest.fixture
def not_verbose(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_VARIABLE, raising=False)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)


def test_the_known_warning_is_dropped_and_others_are_not(not_verbose):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet.quiet_third_parties()
        quiet.quiet_third_parties()  # again: no second copy of the filter
        warnings.warn(REDUCE_OP, FutureWarning, stacklevel=1)
        warnings.warn(REDUCE_OP, UserWarning, stacklevel=1)  # another category
        warnings.warn("`torch.distributed.something` is deprecated", FutureWarning, stacklevel=1)
        filters = [f for f in warnings.filters if f[1] and f[1].pattern.startswith("`torch")]
    assert [type(w.message) for w in shown] == [UserWarning, FutureWarning]
    assert len(filters) == 1


def test_the_known_log_record_is_dropped_and_others_are_not(not_verbose, caplog):
    quiet.quiet_third_parties()
    quiet.quiet_third_parties()
    logger = logging.getLogger("torch._library.triton")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger="torch._library.triton"):
        logger.warning(TRITON)
        logger.warning("Triton kernel failed to compile")
    assert [r.getMessage() for r in caplog.records] == ["Triton kernel failed to compile"]


def test_vllm_logs_errors_only_unless_the_user_says_otherwise(not_verbose, monkeypatch):
    quiet.quiet_third_parties()

    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    quiet.quiet_third_parties()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"


@pytest.mark.parametrize(
    ("line", "known"),
    [
        (NUMA, True),
        (NUMA.replace(b"MEMBIND", b"INTERLEAVE"), True),
        (b"[W1203 utils.cpp:70] Warning: NUMA node 1 has no memory (function init)\n", False),
        (b"RuntimeError: NUMA binding: Using MEMBIND policy failed\n", False),
        (b"Loading safetensors checkpoint shards: 100% Completed\r", False),
    ],
)
def test_known_stderr_lines(line, known):
    assert quiet.is_known_stderr_line(line) is known


# A child writes straight to file descriptor 2, as C++ does: the NUMA line between two others,
# the second split across writes and the last without a newline.
WRITER = f"""
import os, sys
from rl import quiet
with quiet.known_stderr_dropped():
    os.write(2, b"before\\n" + {NUMA!r} + b"af")
    os.write(2, b"ter\\n")
    print("from python", file=sys.stderr)
    os.write(2, b"progress 50%\\r" + {NUMA!r} + b"end")
print("restored", file=sys.stderr)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_known_lines_written_to_file_descriptor_2_are_dropped(verbose):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    if verbose:
        env[quiet.VERBOSE_VARIABLE] = "1"
    done = subprocess.run(
        [sys.executable, "-c", WRITER], capture_output=True, env=env, timeout=60, check=True
    )
    others = b"before\nafter\nfrom python\nprogress 50%\r"
    if verbose:
        assert done.stderr == b"before\n" + NUMA + b"after\nfrom python\nprogress 50%\r" + NUMA + (
            b"endrestored\n"
        )
    else:
        assert done.stderr == others + b"endrestored\n"


@pytest.mark.slow
@pytest.mark.vllm
def test_a_run_with_vllm_prints_none_of_the_known_lines(tmp_path, tiny_overrides):
    """`aha train` with vLLM on the tiny model: the lines it printed before rl/quiet.py (vLLM's
    FutureWarnings, torch's Triton notice, vLLM's NUMA note) are gone from its stderr."""
    pytest.importorskip("vllm")
    from conftest import aha_command

    command = [*aha_command(), "train", str(ROOT / "configs" / "tiny.yaml"), *tiny_overrides]
    command += ["rollout.engine=vllm", "rollout.kv_cache_gb=1", "train.steps=1"]
    command += ["data.eval_size=2", "--no-progress"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (quiet.VERBOSE_VARIABLE, "VLLM_LOGGING_LEVEL")
    }
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Steps: 1" in done.stdout
    for known in ("reduce_op", "Triton not available", "NUMA binding"):
        assert known not in done.stderr, done.stderr
