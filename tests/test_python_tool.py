"""The built-in ``python`` tool through the code reward's sandbox pool: what a call answers (exit
status, stdout, stderr, a timeout, a cut output), that tool calls of several trajectories and
the code reward's runs share the pool's bound, that hostile code stays contained, and that
nothing is left behind (a temp directory, a sandbox process) after a normal end, a timeout, the
trainer's exit or its kill."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from stand_ins import sandbox_processes

import rewards.code.pool as sandbox_pool
from rewards import get_reward
from rewards.code.pool import SandboxPool
from rollouts.agent.builtin_tools import OUTPUT_BYTES
from rollouts.agent.execute import Toolset, call_one, run_calls
from rollouts.agent.parsing import Call
from rollouts.agent.tools import ToolError, resolve_tools

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="the python tool runs in bubblewrap"
)

REPO = Path(__file__).resolve().parents[1]


def python_tool(deadline_s: float = 5.0):
    return resolve_tools(["python"], deadline_s)[0].fn


@pytest.fixture
def pool(monkeypatch):
    """A fresh process-wide pool of 2 slots, so that a test sees its own bound."""
    fresh = SandboxPool(2)
    monkeypatch.setattr(sandbox_pool, "_POOL", fresh)
    return fresh


# ------------------------------------------------------------------ what a call answers


CUT = OUTPUT_BYTES


@pytest.mark.parametrize(
    ("code", "start", "end"),
    [
        ("print(6 * 7)", "exit status: 0\nstdout:\n42\n\nstderr:", ""),
        ("import sys\nprint('no', file=sys.stderr)\nsys.exit(3)", "exit status: 3\nstdout:\n\nstderr:\nno", ""),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "exit status: -9 (killed by SIGKILL)\nstdout:\n\nstderr:", ""),
        # stdout past the cap: the program is stopped (its stderr then tells of a broken pipe)
        ("print('x' * 10**6)", f"exit status: stopped, its output passed {CUT} bytes\nstdout:\n" + "x" * CUT + f"\n[output cut at {CUT} bytes]\nstderr:", None),
        # stderr past the cap: the program runs to its end, its stderr is cut
        ("import sys\nsys.stderr.write('e' * 10**5)", "exit status: 0\nstdout:\n\nstderr:\n", "e" * CUT + f"\n[stderr cut at {CUT} bytes]"),
    ],
    ids=["ok", "nonzero_exit", "killed_by_a_signal", "huge_stdout", "huge_stderr"],
)  # fmt: skip
def test_a_call_answers_status_stdout_and_stderr_as_text(pool, code, start, end):
    """The text is ``start + end`` exactly (end None: anything may follow start)."""
    text = python_tool()(code)
    assert text.startswith(start), text[:300]
    if end is not None:
        assert text == start + end, text[-300:]


def test_a_full_pool_is_an_answer_not_an_exception(pool):
    # (A timeout's answer: tests/test_multiturn_tools.py::test_the_python_tool_times_out.)
    # Waiting for a free sandbox is part of the call's time: with every slot taken, the call
    # ends at its deadline with an error text from the turn loop's call_one.
    for _ in range(pool.size):
        pool._slots.acquire()
    try:
        result = call_one(
            Toolset({"python": python_tool(0.3)}, {}), Call("python", {"code": "print(1)"})
        )
    finally:
        for _ in range(pool.size):
            pool._slots.release()
    assert result.error
    assert result.content.startswith("error: python raised RuntimeError: the sandbox failed")
    assert "no sandbox free: all 2 were busy" in result.content


def test_without_bubblewrap_the_config_names_the_tool(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ToolError, match=r"rollout.tools.0: the built-in tool 'python' cannot run"):
        resolve_tools(["python"])


# ------------------------------------------------------------------ one bound for everyone


def test_trajectories_and_the_code_reward_share_the_pools_bound(pool):
    # Four trajectories call python at once while a code reward scores two completions in
    # another thread: six sandbox runs of at least 0.5 s each, never more than 2 at a time.
    tool = python_tool()
    batches = [
        (Toolset({"python": tool}, {}), [Call("python", {"code": f"import time\ntime.sleep(0.5)\nprint({i} * 11)"})])
        for i in range(4)
    ]  # fmt: skip
    tests = {"type": "stdio", "cases": [{"input": "", "output": "ok"}]}
    reward_done: list = []
    slow_ok = "```python\nimport time\ntime.sleep(0.5)\nprint('ok')\n```"
    reward = threading.Thread(
        target=lambda: reward_done.append(
            get_reward("code")([""] * 2, [slow_ok] * 2, tests=[tests] * 2, workers=2)
        )
    )
    reward.start()
    results = run_calls(batches, timeout_s=60.0)
    reward.join(60)
    assert [r[0].content for r in results] == [
        f"exit status: 0\nstdout:\n{i * 11}\n\nstderr:" for i in range(4)
    ]
    assert reward_done == [[1.0, 1.0]]
    # Each run holds its slot for >= 0.5 s and six runs wait: two do run at once.
    assert pool.most_running == 2
    assert pool.running == 0


# ------------------------------------------------------------------ contained


def test_hostile_code_through_the_tool_stays_contained(pool):
    # The patterns of test_sandbox_hostile.py, from one tool call: the host's files, writes
    # outside, the host's loopback, killing everything it can name, a fork left looping.
    token = secrets.token_hex(4)
    targets = [f"{REPO}/HACKED_{token}", f"/root/HACKED_{token}", f"/HACKED_{token}"]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    sibling = subprocess.Popen(["sleep", "30"])
    code = textwrap.dedent(
        f"""
        import os, signal, socket
        print('seen', [p for p in ('/work', '/root', '/etc/passwd', {str(REPO)!r}) if os.path.exists(p)])
        written = []
        for path in {targets!r}:
            try:
                open(path, 'w').write('owned')
                written.append(path)
            except OSError:
                pass
        print('written', written)
        try:
            socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1).close()
            print('connected')
        except OSError as error:
            print('network', type(error).__name__)
        if os.fork() == 0:
            while True:
                pass
        for target in (os.getppid(), 1, -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        print('still here')
        """
    )  # fmt: skip
    try:
        text = python_tool(2.0)(code)
        with pytest.raises(TimeoutError):
            server.accept()  # nobody reached the host's loopback
        assert sibling.poll() is None  # kill(-1) reached no host process
    finally:
        server.close()
        sibling.kill()
        sibling.wait()
    assert "seen []" in text and "written []" in text and "connected" not in text, text
    for path in targets:
        assert not Path(path).exists(), path
    assert sandbox_processes(os.getpid()) == []  # the looping fork went with its sandbox


# ------------------------------------------------------------------ nothing left behind


def test_calls_leave_no_temp_directory(pool, monkeypatch, tmp_path):
    # Anything of ours that made a temp file or directory would make it here.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tool = python_tool(1.0)
    tool("open('/tmp/scratch', 'w').write('x')\nprint(1)")  # the sandbox's own /tmp
    tool("import time\ntime.sleep(5)")  # timed out
    tool("print('y' * 10**6)")  # stopped at the cap
    assert list(tmp_path.iterdir()) == []
    assert sandbox_processes(os.getpid()) == []


TRAINER = """
import sys, threading
from rollouts.agent.builtin_tools import make_python
tool = make_python(60.0)  # what resolve_tools makes, without transformers' import time
threading.Thread(target=tool, args=("import os\\nos.fork()\\nwhile True: pass",), daemon=True).start()
print("started", flush=True)
sys.stdin.readline()  # the test says when to end, once the sandbox runs
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_a_call_in_flight_dies_with_the_trainer(end):
    # The trainer ends while a tool call runs in a daemon thread (the turn loop abandons a
    # call that misses its deadline): exit must not wait for it, and nothing of it survives.
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert trainer.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 20  # bounded waits for the host, not timings asserted
        while len(sandbox_processes(trainer.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sandbox_processes(trainer.pid)) >= 2  # the program and its fork run
        if end == "exit":
            trainer.stdin.write(b"\n")
            trainer.stdin.flush()
            assert trainer.wait(timeout=20) == 0
        else:
            trainer.kill()
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 10
    while sandbox_processes(trainer.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(trainer.pid) == []
