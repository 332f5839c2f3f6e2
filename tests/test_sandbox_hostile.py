"""Hostile code is contained, scores 0 where it does not solve the task, and leaves no trace.

Probes use the function form to bring back what the code saw from inside the sandbox, so a
test can assert on the observation itself (which paths were writable, what connect() said),
and the host is checked afterwards (files, processes, a listening socket, a sibling process).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from stand_ins import sandbox_processes

from rewards import get_reward
from rewards.code.reward import run_jobs
from rewards.code.sandbox import BwrapBackend, Limits

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap",
)

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(timeout_s=2.0, total_timeout_s=4.0)


def probe(code: str, *args) -> dict:
    """Run ``solve(*args)`` from ``code`` in the sandbox; the driver's report for the call."""
    job = {
        "form": "function",
        "code": textwrap.dedent(code),
        "entry_point": "solve",
        "cases": [{"args": list(args)}],
    }
    (result,) = run_jobs([job], BwrapBackend(LIMITS), LIMITS, workers=1)
    return next(m for m in result.messages if m.get("case") == 0)


def score(code: str, tests: dict, **options) -> float:
    options.setdefault("timeout", 2.0)
    return get_reward("code")(
        [""], [f"```python\n{textwrap.dedent(code)}```"], tests=[tests], **options
    )[0]


def test_sees_no_project_root_or_host_files():
    seen = probe(
        """
        import os
        def solve():
            names = ['/work', '/root/.ssh', '/home', '/etc/shadow', '/etc/passwd', os.environ.get('HOME', '') + '/.cache']
            return {'exists': [p for p in names if os.path.exists(p)], 'root': sorted(os.listdir('/')),
                    'uid': os.getuid(), 'env': sorted(os.environ)}
        """
    )
    assert seen["ok"], seen
    value = seen["result"]
    assert value["exists"] == []
    assert set(value["root"]) <= {"bin", "dev", "lib", "lib64", "opt", "proc", "sbin", "tmp", "usr"}
    assert value["uid"] >= 1_500_000_000  # not root
    assert "LD_PRELOAD" not in value["env"]


def test_reading_shadow_or_the_repository_scores_zero():
    shadow = Path("/etc/shadow").read_text() if os.access("/etc/shadow", os.R_OK) else "x"
    pyproject = (REPO / "pyproject.toml").read_text()
    code = """
        def solve(path):
            for candidate in (path, '/proc/1/root' + path, '/proc/self/root' + path):
                try:
                    return open(candidate).read()
                except OSError:
                    pass
            return ''
        """
    tests = {
        "type": "function",
        "entry_point": "solve",
        "cases": [
            {"args": ["/etc/shadow"], "expected": shadow},
            {"args": [str(REPO / "pyproject.toml")], "expected": pyproject},
        ],
    }
    assert score(code, tests) == 0.0


def test_writes_outside_the_sandbox_fail_and_leave_nothing():
    token = secrets.token_hex(4)
    targets = [
        f"{REPO}/HACKED_{token}",
        f"/root/HACKED_{token}",
        f"/usr/HACKED_{token}",
        f"/opt/python/HACKED_{token}",
        f"/HACKED_{token}",
        f"/dev/shm/HACKED_{token}",
        f"/proc/sys/kernel/HACKED_{token}",
    ]
    seen = probe(
        """
        def solve(paths):
            written = []
            for path in paths:
                try:
                    with open(path, 'w') as f:
                        f.write('owned')
                    written.append(path)
                except OSError:
                    pass
            open('/tmp/HACKED_' + paths[0][-8:], 'w').write('private tmp only')
            return written
        """,
        targets,
    )
    assert seen == {"case": 0, "ok": True, "result": []}
    for path in [*targets, f"/tmp/HACKED_{token}"]:
        assert not Path(path).exists(), path


def test_no_network_even_to_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    seen = probe(
        """
        import socket
        def solve(port):
            outcomes = []
            for host in ('127.0.0.1', '10.0.2.2', '8.8.8.8'):
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    outcomes.append('connected')
                except OSError as error:
                    outcomes.append(type(error).__name__)
            return outcomes
        """,
        port,
    )
    with pytest.raises(TimeoutError):
        server.accept()  # nobody ever reached us
    server.close()
    assert seen["ok"] and "connected" not in seen["result"], seen


def test_killing_the_parent_reaches_nothing_outside():
    sibling = subprocess.Popen(["sleep", "30"])
    try:
        code = """
            import os, signal
            for target in (os.getppid(), 1, -1, 0):
                for kill in (os.kill, os.killpg):
                    try:
                        kill(target, signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
            def solve():
                return 'alive'
            """
        tests = {
            "type": "function",
            "entry_point": "solve",
            "cases": [{"args": [], "expected": "dead"}],
        }
        assert score(code, tests) == 0.0
        assert sibling.poll() is None  # a host process of ours survived kill(-1)
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("infinite_loop", "def solve():\n    while True:\n        pass\n"),
        ("infinite_loop_at_import", "while True:\n    pass\n"),
        (
            "sleep_forever_ignoring_signals",
            "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ndef solve():\n    time.sleep(10**6)\n",
        ),
        ("memory_bomb", "def solve():\n    return len(bytearray(1 << 36))\n"),
        (
            "memory_creep",
            "def solve():\n    chunks = []\n    while True:\n        chunks.append(bytearray(1 << 26))\n",
        ),
        (
            "disk_fill_one_file",
            "def solve():\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n            f.write(b'x' * (1 << 20))\n",
        ),
        (
            "disk_fill_many_files",
            "def solve():\n    i = 0\n    while True:\n        open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 20))\n        i += 1\n",
        ),
        (
            "threads_bomb",
            "import threading, time\ndef solve():\n    while True:\n        threading.Thread(target=time.sleep, args=(60,)).start()\n",
        ),
    ],
)
def test_resource_bombs_are_contained(name, code):
    tests = {
        "type": "function",
        "entry_point": "solve",
        "cases": [{"args": [], "expected": "never"}],
    }
    started = time.monotonic()
    assert score(code, tests, timeout=1.5) == 0.0
    assert time.monotonic() - started < 15, name
    assert sandbox_processes() == []


@pytest.mark.slow
def test_fork_bomb_is_contained_inside_its_own_pid_namespace():
    # Belt and braces: the test itself runs in an outer pid namespace (`unshare --pid`), so
    # even a sandbox that failed could not take the machine down; killing the outer
    # namespace's init (at the timeout) kills everything in it.
    # A second run at the same time forks too: the bomb must not use up its process limit.
    script = textwrap.dedent(
        """
        import time
        from rewards import get_reward
        bomb = "```python\\nimport os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n```"
        forker = "```python\\nimport os, time\\ntime.sleep(0.5)\\ndef f():\\n    for _ in range(4):\\n        pid = os.fork()\\n        if pid == 0:\\n            os._exit(0)\\n        os.waitpid(pid, 0)\\n    return 1\\n```"
        tests = {"type": "assert", "entry_point": "f", "code": "def check(c):\\n    assert c() == 1\\n"}
        started = time.monotonic()
        scores = get_reward("code")([""] * 2, [bomb, forker], tests=[tests] * 2, timeout=2.0, total_timeout=3.0, workers=2)
        print(scores, time.monotonic() - started)
        """
    )
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is needed for the outer pid namespace")
    done = subprocess.run(
        [unshare, "--pid", "--fork", "--kill-child", sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    scores, seconds = done.stdout.split("]")
    assert scores == "[0.0, 1.0"
    assert float(seconds) < 20
    assert sandbox_processes() == []
    subprocess.run(["true"], check=True)  # the host can still fork


def test_one_runs_failure_never_touches_another():
    # Run A writes a file in its /tmp and hogs CPU; run B, in parallel, must not see the file
    # and must still pass; a crashing run C must not change either.
    tests = {"type": "function", "entry_point": "solve", "cases": [{"args": [], "expected": False}]}
    writer = "import os, time\nopen('/tmp/shared', 'w').write('x')\ndef solve():\n    t = time.time()\n    while time.time() - t < 1.5:\n        pass\n    return os.path.exists('/tmp/nothing')\n"
    reader = (
        "import os, time\ntime.sleep(0.5)\ndef solve():\n    return os.path.exists('/tmp/shared')\n"
    )
    crasher = "import os\nos.abort()\n"
    completions = [f"```python\n{code}```" for code in (writer, reader, crasher)]
    scores = get_reward("code")([""] * 3, completions, tests=[tests] * 3, workers=3)
    assert scores == [1.0, 1.0, 0.0]


def test_a_thread_pool_caller_is_fine():
    # Rewards may be called from a worker thread (signal.alarm would not work there).
    tests = {"type": "function", "entry_point": "solve", "cases": [{"args": [], "expected": 1}]}
    out: list = []
    worker = threading.Thread(
        target=lambda: out.append(score("def solve():\n    return 1\n", tests))
    )
    worker.start()
    worker.join(30)
    assert out == [1.0]


def test_sandboxes_die_with_the_trainer():
    # The trainer is killed mid-run (OOM killer, Ctrl-C twice): no sandboxed process survives.
    script = textwrap.dedent(
        """
        from rewards import get_reward
        tests = {"type": "function", "entry_point": "f", "cases": [{"args": [], "expected": 1}]}
        loop = "```python\\nimport os\\nos.fork()\\ndef f():\\n    while True:\\n        pass\\n```"
        print("started", flush=True)
        get_reward("code")([""] * 2, [loop] * 2, tests=[tests] * 2, timeout=60.0, workers=2)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert trainer.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 10
        while len(sandbox_processes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sandbox_processes()) >= 2  # the candidates are running
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []
