"""Where the harness runs: bubblewrap (default), a plain process (explicit opt-in), or remote.

Every backend runs ``harness.py`` with the run's payload on stdin and returns the driver's
report lines that carry the run's nonce. The verdict is made by the caller, in this process.

bubblewrap, started by root (the usual case on a training box):

* new pid, net, ipc, uts and cgroup namespaces; ``--new-session``; ``--die-with-parent``, so
  killing the outer bwrap (or the trainer dying) tears the whole pid namespace down;
* a root filesystem with only read-only ``/usr`` (and its ``/lib``, ``/bin`` links), the
  interpreter's prefix read-only at ``/opt/python``, fresh ``/proc`` and ``/dev``, and a private
  size-capped ``/tmp``: no ``/etc``, ``/root``, ``/work``, ``/home``, nor other runs' files;
* all capabilities dropped but SETUID/SETGID/KILL, which the driver needs to start the checker
  and the candidate under two uids of their own, a pair no other run of this process holds at
  the same time, so RLIMIT_NPROC (counted per uid, never applied to root) bounds this run only;
* a seccomp filter (:mod:`rewards.code.seccomp`) against new namespaces from inside;
* an empty environment (no ``LD_PRELOAD`` from vLLM) and rlimits set by the harness.

Started by another user, bubblewrap makes a user namespace instead (with ``--disable-userns``);
everything above holds except the uid split: the candidate shares the checker's uid, which
non-dumpable protects, and RLIMIT_NPROC then counts all of that user's processes.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rewards.code.seccomp import namespace_filter

# One self-contained program: the wire format, then the harness (whose import of it fails
# harmlessly in the sandbox, where there is no `rewards` package).
HARNESS_SOURCE = "\n".join(
    (Path(__file__).parent / name).read_text() for name in ("wire.py", "harness.py")
)

INSTALL_HINT = (
    "the `code` reward runs model-written code only inside bubblewrap, which is not installed. "
    "Install it with `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap`, "
    "or pass sandbox='remote' with remote_url=<SandboxFusion server>, or, only on a machine "
    "you are willing to lose, opt into sandbox='unsafe-local'"
)


class SandboxUnavailableError(RuntimeError):
    """No sandbox can be had, and the user did not opt into running code without one."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one candidate process (the checker gets ``check_*`` below)."""

    timeout_s: float = 4.0  # wall clock per stdio/function case, or per call in assert form
    total_timeout_s: float = 20.0  # wall clock for the assert form's whole check()
    cpu_s: int = 10
    address_space_mb: int = 1024  # the interpreter itself needs ~30 MB
    file_size_mb: int = 16
    open_files: int = 64
    processes: int = 16  # per uid, so per run: the candidate and everything it forks
    tmp_size_mb: int = 64
    max_output_bytes: int = 1 << 20

    def candidate(self) -> dict[str, int]:
        return {
            "cpu_s": self.cpu_s,
            "address_space_mb": self.address_space_mb,
            "file_size_mb": self.file_size_mb,
            "open_files": self.open_files,
            "processes": self.processes,
        }

    def checker(self) -> dict[str, int]:
        return {"cpu_s": self.cpu_s * 2, "address_space_mb": 2048, "file_size_mb": 1}


@dataclass
class RunResult:
    messages: list[dict[str, Any]] = field(default_factory=list)  # nonce-checked driver lines
    timed_out: bool = False  # the whole run hit its wall clock and was killed
    error: str | None = None  # the sandbox itself failed (not the candidate)
    sandbox: str = "bwrap"


class Backend(Protocol):
    name: str

    def run(self, payload: dict[str, Any], wall_timeout: float) -> RunResult: ...


def make_payload(job: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The driver's stdin: the job plus a fresh nonce, limits and the harness itself."""
    return {
        **job,
        "nonce": secrets.token_hex(16),
        "timeout": limits.timeout_s,
        "total_timeout": limits.total_timeout_s,
        "limits": limits.candidate(),
        "check_limits": limits.checker(),
        "max_output_bytes": limits.max_output_bytes,
        "harness": HARNESS_SOURCE,
    }


# What the candidate may see before it starts; everything else (the nonce, the check code,
# the cases) is sent after it has been forked. See harness.main.
PUBLIC_KEYS = ("form", "code", "prelude", "entry_point", "limits", "uids", "workdir")


def encode_payload(payload: dict[str, Any], kind: str = "M") -> bytes:
    """The driver's stdin: KIND, a 10-digit length, the public part, the secret part."""
    public = {k: payload.get(k) for k in PUBLIC_KEYS}
    secret = {k: v for k, v in payload.items() if k not in PUBLIC_KEYS}
    if kind == "M":
        head, tail = marshal.dumps(public), marshal.dumps(secret)
    else:
        head, tail = json.dumps(public).encode(), json.dumps(secret).encode()
    return kind.encode() + b"%010d" % len(head) + head + tail


def parse_report(stdout: bytes, nonce: str) -> list[dict[str, Any]]:
    """Driver lines carrying ``nonce``; anything else (forged, garbled) is dropped."""
    messages = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.pop("nonce", None) == nonce:
            messages.append(message)
    return messages


def wall_timeout(payload: dict[str, Any], limits: Limits) -> float:
    """Generous outer bound; the driver enforces the per-case limits itself."""
    if payload["form"] == "assert":
        return limits.total_timeout_s + 5.0
    return (limits.timeout_s + 0.5) * max(1, len(payload["cases"])) + 5.0


# Every sandbox process running now, so that exit can kill them (rewards.code.pool).
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def kill_running() -> None:
    """Kill every sandbox this process has running (their whole process groups)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)


def _run_process(
    argv: list[str],
    payload: dict[str, Any],
    timeout: float,
    pass_fds: tuple[int, ...] = (),
    **popen: Any,
) -> tuple[bytes, bytes, bool]:
    """Run ``argv`` with the payload on stdin; kill its whole process group at ``timeout``."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        pass_fds=pass_fds,
        **popen,
    )
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        # marshal: the driver reads it without importing json (trusted direction only).
        out, err = proc.communicate(encode_payload(payload, "M"), timeout=timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:  # the namespace's teardown closes every pipe; never wait on it for long
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = b"", b"sandbox did not exit after SIGKILL"
        return out, err, True
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)


class UidPairs:
    """Uid pairs for concurrent sandboxes; two runs at the same time never share one.

    Process-wide on purpose: two reward calls may run at once (train and eval threads, TRL's
    async rewards), and a fork bomb in one must not use up the other's RLIMIT_NPROC.
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._next = 0

    def acquire(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._next += 1
            return self.base + 2 * (self._next - 1)

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


# Far above any real account; offset by our pid so that trainers on one host rarely overlap.
SANDBOX_UIDS = UidPairs(1_500_000_000 + (os.getpid() % 100_000) * 1024)


@dataclass
class BwrapBackend:
    """One fresh bubblewrap sandbox per run."""

    limits: Limits = field(default_factory=Limits)
    python_prefix: str = sys.base_prefix
    uids: UidPairs = SANDBOX_UIDS
    name: str = "bwrap"

    def __post_init__(self) -> None:
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise SandboxUnavailableError(INSTALL_HINT)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        self.interpreter = f"/opt/python/bin/{version}"
        if not (Path(self.python_prefix) / "bin" / version).exists():
            raise SandboxUnavailableError(f"no {version} under {self.python_prefix}")
        self.seccomp = namespace_filter()

    def command(self, seccomp_fd: int | None) -> list[str]:
        argv = [self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
        if os.geteuid() == 0:
            argv += ["--cap-drop", "ALL"]
            for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL"):
                argv += ["--cap-add", cap]
        else:
            argv += ["--unshare-user", "--disable-userns"]
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "sbin"):
            path = Path("/") / name
            if path.is_symlink():
                argv += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                argv += ["--ro-bind", str(path), str(path)]
        argv += ["--perms", "0755", "--dir", "/opt", "--ro-bind", self.python_prefix, "/opt/python"]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "1777", "--size", str(self.limits.tmp_size_mb << 20), "--tmpfs", "/tmp"]
        argv += ["--chdir", "/tmp", "--clearenv", "--hostname", "sandbox"]
        argv += ["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp"]
        argv += ["--setenv", "LANG", "C.UTF-8", "--setenv", "LD_LIBRARY_PATH", "/opt/python/lib"]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        return argv + ["--", self.interpreter, "-I", "-S", "-c", HARNESS_SOURCE]

    def run(self, payload: dict[str, Any], wall_timeout: float) -> RunResult:
        payload = dict(payload, workdir="/tmp")
        base = self.uids.acquire() if os.geteuid() == 0 else None
        if base is not None:
            payload["uids"] = [base, base + 1]
        read_fd = None
        try:
            if self.seccomp is not None:
                read_fd, write_fd = os.pipe()
                os.write(write_fd, self.seccomp)  # a few hundred bytes: fits the pipe buffer
                os.close(write_fd)
            out, err, timed_out = _run_process(
                self.command(read_fd),
                payload,
                wall_timeout,
                pass_fds=(read_fd,) if read_fd is not None else (),
                env={"PATH": "/usr/sbin:/usr/bin:/bin"},  # nothing of ours, no LD_PRELOAD
            )
        except OSError as error:
            return RunResult(error=f"bwrap failed to start: {error}", sandbox=self.name)
        finally:
            if read_fd is not None:
                os.close(read_fd)
            if base is not None:
                # bwrap has exited; its pid namespace is gone or, after a kill, going.
                self.uids.release(base)
        messages = parse_report(out, payload["nonce"])
        error = None
        if not messages and not timed_out:
            error = "sandbox produced no report: " + err.decode("utf-8", "replace")[-500:]
        return RunResult(messages, timed_out, error, self.name)


@dataclass
class UnsafeLocalBackend:
    """Runs the harness as a plain child process: rlimits only, NO isolation. Opt-in."""

    limits: Limits = field(default_factory=Limits)
    name: str = "UNSANDBOXED"

    def run(self, payload: dict[str, Any], wall_timeout: float) -> RunResult:
        with tempfile.TemporaryDirectory(prefix="aha-code-") as workdir:
            payload = dict(payload, workdir=workdir, uids=None)
            argv = [sys.executable, "-I", "-S", "-c", HARNESS_SOURCE]
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # drops LD_PRELOAD
            out, err, timed_out = _run_process(argv, payload, wall_timeout, env=env, cwd=workdir)
        messages = parse_report(out, payload["nonce"])
        error = None if messages or timed_out else err.decode("utf-8", "replace")[-500:]
        return RunResult(messages, timed_out, error, self.name)


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


def limits_dict(limits: Limits) -> dict[str, Any]:
    return asdict(limits)
