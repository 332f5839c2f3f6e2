"""Small stand-ins the tests share: a free TCP port, a JSON server on 127.0.0.1, and the
processes running in code sandboxes.

Tests that fake a vLLM server (a teacher that scores, a sampler that answers) only differ in
what they reply; the HTTP plumbing lives here once.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A port nobody listens on now (another program may take it before we do: callers retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Route = Callable[[str, str, dict[str, Any] | None], Any]


class JsonServer:
    """An HTTP server on a free local port whose every reply is ``route(method, path, payload)``
    as JSON (``None``: an empty 200 reply, as vLLM's /health gives). POST payloads are kept in
    ``requests``, in order. Use as a context manager, or call ``close()``."""

    def __init__(self, route: Route):
        outer = self
        self.requests: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def _reply(self, body: Any) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._reply(route("GET", self.path, None))

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                self._reply(route("POST", self.path, payload))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> JsonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SANDBOX_UID_BASE = 1_500_000_000  # rewards.code.sandbox.SANDBOX_UIDS: a pair per run from here


def sandbox_processes(of_pid: int | None = None) -> list[int]:
    """Host pids running under a sandbox uid: any, or those of the process ``of_pid`` (its uid
    pairs start at a base made from its pid, 1024 uids wide)."""
    low, high = SANDBOX_UID_BASE, 2**32
    if of_pid is not None:
        low = SANDBOX_UID_BASE + (of_pid % 100_000) * 1024
        high = low + 1024
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if low <= int(uid_line.split()[1]) < high:
            pids.append(int(status.parent.name))
    return pids
