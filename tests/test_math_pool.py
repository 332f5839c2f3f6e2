"""The checker pool: hard timeouts from any thread, crashed workers replaced, light workers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.math.pool import CheckerPool, _worker_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_timeout_from_a_thread_then_the_pool_goes_on() -> None:
    pool = CheckerPool(size=1)
    try:
        results: list = []
        # Not the main thread: signal.alarm could not work here, the pipe deadline does.
        thread = threading.Thread(
            target=lambda: results.append(pool.check("5", "9^{9^{9^{9}}}", {}, timeout_s=1.5))
        )
        start = time.monotonic()
        thread.start()
        thread.join(timeout=60)
        assert results and results[0].why == "timeout" and not results[0].equal
        assert time.monotonic() - start < 30  # the timeout plus one worker start-up, not a hang
        assert pool.replaced == 1
        assert pool.check("x^2", "x\\cdot x", {}, timeout_s=10).equal
    finally:
        pool.close()


@pytest.mark.slow
def test_crashed_worker_is_replaced() -> None:
    pool = CheckerPool(size=1)
    try:
        assert pool.check("1/2", "\\frac{2}{4}", {}, timeout_s=10).equal
        pool._all[0].process.kill()  # a worker dies between items (OOM killer, segfault)
        pool._all[0].process.wait()
        assert pool.check("1/2", "\\frac{2}{4}", {}, timeout_s=10).why == "crash"
        assert pool.check("1/2", "\\frac{2}{4}", {}, timeout_s=10).equal
    finally:
        pool.close()


def test_worker_env_drops_ld_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libfoo.so")
    env = _worker_env()
    assert "LD_PRELOAD" not in env and env["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_workers_are_light_and_survive_spawn_and_ld_preload() -> None:
    # What vLLM does to the trainer process before rewards run: spawn start method, LD_PRELOAD.
    script = (
        "import multiprocessing, os, sys\n"
        "multiprocessing.set_start_method('spawn', force=True)\n"
        "os.environ['LD_PRELOAD'] = '/nonexistent/libfoo.so'\n"
        "from rewards import get_reward\n"
        "print(get_reward('math')(None, ['\\\\boxed{\\\\frac{\\\\sqrt2}{2}}'], answer=['\\\\frac{1}{\\\\sqrt{2}}']))\n"
        "from rewards.math.pool import _worker_env\n"
        "import subprocess\n"
        "probe = 'import sys, rewards.math.worker, rewards.math.equivalence; print(\"torch\" in sys.modules)'\n"
        "print(subprocess.run([sys.executable, '-c', probe], env=_worker_env(), capture_output=True, text=True).stdout)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[1.0]", "False"]
