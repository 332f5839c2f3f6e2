"""A backend that runs the harness on a SandboxFusion server (``POST /run_code``).

The same harness runs there as locally: the program is ``harness.py``, the payload goes on
stdin, and only report lines carrying this run's nonce count. The remote machine's isolation
is the server's business; ours is that its answers cannot forge a verdict (the nonce never
reaches the candidate's process, expected outputs never leave this process).

Concurrency is bounded by a semaphore shared by every thread using this backend; transport
errors, HTTP 5xx and ``SandboxError`` replies are retried with exponential backoff.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from rewards.code.sandbox import HARNESS_SOURCE, Limits, RunResult, encode_payload, parse_report


@dataclass
class SandboxFusionBackend:
    url: str  # e.g. http://127.0.0.1:8080 (the /run_code path is added)
    limits: Limits = field(default_factory=Limits)
    max_concurrency: int = 8
    retries: int = 3
    backoff_s: float = 0.5
    http_slack_s: float = 10.0  # on top of the run's own timeout, for queueing and transfer
    memory_limit_mb: int = -1  # SandboxFusion's own limit; -1 leaves the server's default
    name: str = "remote"
    local: bool = False  # takes no slot of the local sandbox pool: the server bounds its runs

    def __post_init__(self) -> None:
        self._slots = threading.Semaphore(self.max_concurrency)

    def request_body(self, payload: dict[str, Any], wall_timeout: float) -> dict[str, Any]:
        return {
            "code": HARNESS_SOURCE,
            "language": "python",
            "stdin": encode_payload(payload, "J").decode(),
            "run_timeout": wall_timeout,
            "compile_timeout": 10,
            "memory_limit_MB": self.memory_limit_mb,
            "files": {},
            "fetch_files": [],
        }

    def _post(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url.rstrip("/") + "/run_code",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def run(self, payload: dict[str, Any], wall_timeout: float) -> RunResult:
        payload = dict(payload, workdir=None, uids=None)
        body = self.request_body(payload, wall_timeout)
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with self._slots:
                    reply = self._post(body, wall_timeout + self.http_slack_s)
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code}"
                if error.code < 500:
                    break  # our request is wrong; asking again will not help
                continue
            except (OSError, ValueError) as error:  # refused, reset, timed out, bad JSON
                last_error = f"{type(error).__name__}: {error}"
                continue
            if reply.get("status") == "SandboxError":
                last_error = "SandboxError: " + str(reply.get("message"))[:300]
                continue
            run = reply.get("run_result") or {}
            messages = parse_report(str(run.get("stdout") or "").encode(), payload["nonce"])
            timed_out = run.get("status") == "TimeLimitExceeded"
            error = None if messages or timed_out else "remote run reported nothing"
            return RunResult(messages, timed_out, error, self.name)
        return RunResult(error=f"remote sandbox failed: {last_error}", sandbox=self.name)
