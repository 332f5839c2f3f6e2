"""The SandboxFusion backend against a small stand-in server on 127.0.0.1.

The stand-in speaks the ``POST /run_code`` subset we use and runs the program as a plain
subprocess (it is a test double, not a sandbox); it can fail, stall, and count concurrency.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import get_reward
from rewards.code.remote import SandboxFusionBackend
from rewards.code.sandbox import Limits, make_payload


class StandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_first = 0  # answer HTTP 503 to this many requests first
        self.sandbox_error_first = 0  # answer status SandboxError to this many
        self.delay_s = 0.0
        self.tmpdir: str | None = None  # the programs' TMPDIR, to see what they leave behind

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            fail, server.fail_first = server.fail_first > 0, max(0, server.fail_first - 1)
            sandbox_error = not fail and server.sandbox_error_first > 0
            server.sandbox_error_first -= sandbox_error
        try:
            time.sleep(server.delay_s)
            if self.path != "/run_code" or fail:
                self.send_response(404 if self.path != "/run_code" else 503)
                self.end_headers()
                return
            if sandbox_error:
                reply = {"status": "SandboxError", "message": "pod evicted"}
            else:
                reply = {"status": "Success", "run_result": run(body, server.tmpdir)}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            with server.lock:
                server.in_flight -= 1


def run(body: dict, tmpdir: str | None = None) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", body["code"]],
            input=body["stdin"].encode(),
            capture_output=True,
            timeout=body["run_timeout"],
            env={"TMPDIR": tmpdir} if tmpdir else None,
        )
    except subprocess.TimeoutExpired:
        return {"status": "TimeLimitExceeded", "stdout": "", "stderr": "", "return_code": None}
    return {
        "status": "Finished",
        "stdout": done.stdout.decode(),
        "stderr": done.stderr.decode(),
        "return_code": done.returncode,
    }


@pytest.fixture
def server():
    stand_in = StandIn()
    thread = threading.Thread(target=stand_in.serve_forever, daemon=True)
    thread.start()
    yield stand_in
    stand_in.shutdown()
    stand_in.server_close()


ADD = {
    "type": "function",
    "entry_point": "add",
    "cases": [{"args": [1, 2], "expected": 3}, {"args": [2, 2], "expected": 4}],
}
RIGHT = "```python\ndef add(a, b):\n    return a + b\n```"
ANYTHING = "```python\nclass A:\n    def __eq__(s, o):\n        return True\ndef add(a, b):\n    return A()\n```"


def remote(completions, server, **options):
    logged: dict = {}
    scores = get_reward("code")(
        [""] * len(completions),
        completions,
        tests=[ADD] * len(completions),
        sandbox="remote",
        remote_url=server.url,
        log_extra=logged.__setitem__,
        **options,
    )
    return scores, logged["code_tests"]


def test_scores_and_the_verdict_stays_here(server, tmp_path):
    server.tmpdir = str(tmp_path)
    assert remote([RIGHT, ANYTHING, "no code"], server)[0] == [1.0, 0.0, 0.0]
    assert server.requests == 2  # no request for a completion without code
    # The harness makes its working directory there (no sandbox /tmp of ours to vanish with
    # it) and removes it: each run used to leave an aha-code-* directory on the server.
    assert list(tmp_path.iterdir()) == []


def test_transient_failures_are_retried(server):
    server.fail_first = 2
    server.sandbox_error_first = 1
    scores, summaries = remote([RIGHT], server)
    assert scores == [1.0], summaries
    assert server.requests == 4


def test_a_dead_server_scores_zero_and_never_raises(server):
    server.fail_first = 100
    scores, summaries = remote([RIGHT], server)
    assert scores == [0.0]
    assert "HTTP 503" in summaries[0]


def test_concurrency_is_bounded(server):
    server.delay_s = 0.2
    scores, _ = remote([RIGHT] * 6, server, workers=6, remote_concurrency=2)
    assert scores == [1.0] * 6
    assert server.max_in_flight == 2


def test_a_stalled_server_times_out():
    # A socket that accepts and never answers.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    limits = Limits(timeout_s=0.5)
    backend = SandboxFusionBackend(
        f"http://127.0.0.1:{listener.getsockname()[1]}",
        limits,
        retries=1,
        backoff_s=0.05,
        http_slack_s=0.3,
    )
    job = {
        "form": "function",
        "code": "def f(): return 1",
        "entry_point": "f",
        "cases": [{"args": []}],
    }
    started = time.monotonic()
    result = backend.run(make_payload(job, limits), wall_timeout=0.5)
    listener.close()
    assert result.error and "timed out" in result.error.lower()
    assert time.monotonic() - started < 5
