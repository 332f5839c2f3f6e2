"""The program that runs inside the sandbox: a driver, and the candidate runner it starts.

Standard library only, and self-contained: the parent passes this file's source with
``python -I -S -c SOURCE`` (bubblewrap, local) or as the program (SandboxFusion), and the run's
payload as one JSON object on stdin. Nothing of the project is on the sandbox's disk.

Who decides what. The parent holds the expected outputs and decides every verdict; the driver
only reports what happened, on its stdout, each line tagged with a per-run random nonce the
candidate never sees. The candidate's code never runs in the driver's interpreter:

* ``stdio``: one fresh candidate process per case, stdin from a file, stdout read back and sent
  to the parent verbatim; the parent compares.
* ``function``: one candidate process serves calls; each result is turned into tagged JSON
  there and decoded in the driver into plain ``list``/``dict``/``int``/... values, so no object
  the candidate made ever reaches the parent, and ``==`` is never called on one.
* ``assert``: the row's ``check`` function runs in its own process, with a proxy in place of
  the candidate that forwards every call to the candidate process the same way. Only after
  ``check`` returns does that process write ``passed`` with the nonce. Replacing builtins,
  ``AssertionError``, the harness or ``sys.exit`` in the candidate's interpreter changes
  nothing in the checking one.

When the driver starts as root (the bubblewrap backend, inside its own pid namespace) the
check process drops to uid A and the candidate to uid B, so the candidate can neither signal
nor trace the checker, and rlimits such as RLIMIT_NPROC apply per sandbox slot. Everywhere
the driver and checker also make themselves non-dumpable, which keeps a same-uid candidate
(local or remote backends) out of their memory and file descriptors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time

MAX_LINE = 16 * 1024 * 1024  # a longer RPC reply is treated as a failure


# -- tagged JSON: exact builtin types only, so decoding yields plain values -----------------


def encode(obj, depth=0):
    """Plain data as JSON-able values; tuples, sets, bytes, complex and odd floats tagged."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    t = type(obj)
    if obj is None or t is bool or t is int or t is str:
        return obj
    if t is float:
        return obj if math.isfinite(obj) else {"__f": repr(obj)}
    if t is list:
        return [encode(x, depth + 1) for x in obj]
    if t is tuple:
        return {"__t": [encode(x, depth + 1) for x in obj]}
    if t is dict:
        return {"__d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in obj.items()]}
    if t is set or t is frozenset:
        return {"__s" if t is set else "__fs": [encode(x, depth + 1) for x in obj]}
    if t is bytes:
        return {"__b": obj.hex()}
    if t is complex:
        return {"__c": [obj.real, obj.imag]}
    raise TypeError("cannot send a value of type " + t.__name__)


def decode(obj):
    """Inverse of :func:`encode`; anything else is an error, never a foreign object."""
    t = type(obj)
    if obj is None or t in (bool, int, float, str):
        return obj
    if t is list:
        return [decode(x) for x in obj]
    if t is dict and len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__t":
            return tuple(decode(x) for x in value)
        if tag == "__d":
            return {decode(k): decode(v) for k, v in value}
        if tag == "__s":
            return {decode(x) for x in value}
        if tag == "__fs":
            return frozenset(decode(x) for x in value)
        if tag == "__b":
            return bytes.fromhex(value)
        if tag == "__c":
            return complex(float(value[0]), float(value[1]))
        if tag == "__f" and value in ("inf", "-inf", "nan"):
            return float(value)
    raise ValueError("malformed value")


def plain_json(obj):
    """A decoded value as JSON (tuples become lists, sets sorted lists) for the parent."""
    if isinstance(obj, (list, tuple)):
        return [plain_json(x) for x in obj]
    if isinstance(obj, (set, frozenset)):
        items = [plain_json(x) for x in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, dict):
        return {str(k): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, (bytes, complex)):
        return repr(obj)
    return obj


# -- process hygiene --------------------------------------------------------------------------


def set_limits(limits):
    """Hard rlimits (soft = hard), so code cannot raise them again."""
    table = {
        "cpu_s": resource.RLIMIT_CPU,
        "address_space_mb": resource.RLIMIT_AS,
        "file_size_mb": resource.RLIMIT_FSIZE,
        "open_files": resource.RLIMIT_NOFILE,
        "processes": resource.RLIMIT_NPROC,
    }
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for key, which in table.items():
        value = limits.get(key)
        if value is None:
            continue
        value = int(value) * (1 << 20 if key.endswith("_mb") else 1)
        # Lowering never fails; raising a limit we do not hold is skipped.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (value, value))


def make_undumpable():
    """No ptrace, /proc/PID/mem or /proc/PID/fd for same-uid processes (PR_SET_DUMPABLE=0)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass


def drop_to(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# -- the candidate runner (its own process; the candidate's code runs here) -----------------


def _load(ns, config):
    for path in (config.get("prelude_path"), config["code_path"]):
        if path:
            with open(path) as f:
                source = f.read()
            exec(compile(source, os.path.basename(path), "exec"), ns)


def candidate_main(config):
    set_limits(config["limits"])
    if config["mode"] == "stdio":
        sys.argv = ["solution.py"]
        _load({"__name__": "__main__", "__builtins__": __builtins__}, config)
        return
    # serve: private copies of the RPC pipes; fds 0 and 1 go to /dev/null and stderr so a
    # print() in the candidate's code cannot desynchronise the protocol by accident.
    rpc_in = os.fdopen(os.dup(0), "rb")
    rpc_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        _load(ns, config)
        fn = ns.get(config["entry_point"])
        load_error = None if callable(fn) else "no function " + repr(config["entry_point"])
    except BaseException as error:  # noqa: B036 - the candidate's SystemExit is a failure too
        load_error = "load: " + type(error).__name__ + ": " + str(error)[:500]
    while True:
        line = rpc_in.readline(MAX_LINE)
        if not line:
            return
        try:
            if load_error:
                raise RuntimeError(load_error)
            request = json.loads(line)
            args = decode(request["args"])
            kwargs = decode(request["kwargs"])
            reply = {"ok": True, "value": encode(fn(*args, **kwargs))}
        except BaseException as error:  # noqa: B036
            reply = {"ok": False, "error": type(error).__name__ + ": " + str(error)[:500]}
        os.write(rpc_out, (json.dumps(reply) + "\n").encode())


# -- the driver ------------------------------------------------------------------------------


class Driver:
    def __init__(self, payload):
        self.payload = payload
        self.nonce = payload["nonce"]
        self.timeout = float(payload["timeout"])  # per case, or per call to the candidate
        self.total_timeout = float(payload.get("total_timeout") or self.timeout)
        self.uids = payload.get("uids")  # [checker, candidate] when started as root
        self.workdir = payload.get("workdir") or tempfile.mkdtemp(prefix="aha-code-")
        self.config = {
            "limits": payload["limits"],
            "entry_point": payload.get("entry_point") or "",
            "code_path": self._write("solution.py", payload["code"]),
            "prelude_path": self._write("prelude.py", payload.get("prelude") or ""),
        }

    def _write(self, name, text):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)  # owned by the driver: the candidate can read, not replace it
        return path

    def emit(self, message):
        message["nonce"] = self.nonce
        os.write(1, (json.dumps(message) + "\n").encode())

    def spawn(self, mode, stdin=subprocess.PIPE, stdout=subprocess.PIPE):
        config = dict(self.config, mode=mode)
        kwargs = {}
        if self.uids:
            kwargs = {"user": self.uids[1], "group": self.uids[1], "extra_groups": []}
        return subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                self.payload["harness"],
                "candidate",
                json.dumps(config),
            ],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
            **kwargs,
        )

    def kill(self, proc):
        for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            with contextlib.suppress(OSError):
                target()
        proc.wait()
        if self.uids:
            # Root in our own pid namespace: kill(-1) reaches every straggler (forks that left
            # the process group) but not us or the namespace's init.
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)

    def run(self):
        form = self.payload["form"]
        if form == "stdio":
            self.run_stdio()
        elif form == "function":
            self.run_function()
        else:
            self.run_assert()
        self.emit({"done": True})

    def run_stdio(self):
        cap = int(self.payload.get("max_output_bytes", 1 << 20))
        for index, text in enumerate(self.payload["cases"]):
            input_path = self._write("input.txt", text)
            with open(input_path, "rb") as stdin:
                proc = self.spawn("stdio", stdin=stdin)
            out, timed_out = read_until(proc.stdout, time.monotonic() + self.timeout, cap)
            if not timed_out:
                try:
                    proc.wait(timeout=max(0.0, 0.2))
                except subprocess.TimeoutExpired:
                    timed_out = True
            exit_code = proc.poll()
            self.kill(proc)
            self.emit(
                {
                    "case": index,
                    "stdout": out.decode("utf-8", "replace"),
                    "timed_out": timed_out,
                    "exit": exit_code,
                }
            )

    def run_function(self):
        proc = None
        for index, case in enumerate(self.payload["cases"]):
            if proc is None:
                proc = self.spawn("serve")
            try:
                value = call(proc, case.get("args", []), case.get("kwargs", {}), self.timeout)
                self.emit({"case": index, "ok": True, "result": plain_json(value)})
            except Exception as error:
                self.emit({"case": index, "ok": False, "error": str(error)[:500]})
                self.kill(proc)  # a failed call leaves the server in an unknown state
                proc = None
        if proc is not None:
            self.kill(proc)

    def run_assert(self):
        proc = self.spawn("serve")
        checker = os.fork()
        if checker == 0:
            self.check_child(proc)  # never returns
        deadline = time.monotonic() + self.total_timeout
        status = None
        while time.monotonic() < deadline:
            pid, status = os.waitpid(checker, os.WNOHANG)
            if pid:
                break
            time.sleep(0.002)
        else:
            os.kill(checker, signal.SIGKILL)
            os.waitpid(checker, 0)
            self.emit({"case": 0, "passed": False, "error": "timed out"})
        self.kill(proc)

    def check_child(self, proc):
        """The checking process: runs the row's check() against a proxy, then reports."""
        try:
            if self.uids:
                drop_to(self.uids[0])
            make_undumpable()
            set_limits(self.payload.get("check_limits", {}))
            timeout = self.timeout

            def candidate(*args, **kwargs):
                return call(proc, list(args), kwargs, timeout)

            ns = {"__name__": "check", "__builtins__": __builtins__}
            exec(compile(self.payload.get("prelude") or "", "prelude.py", "exec"), ns)
            # As in HumanEval's own harness, the entry point's name means the solution under
            # test (HumanEval/33's check calls it by name, not only as ``candidate``).
            ns[self.payload["entry_point"]] = candidate
            exec(compile(self.payload["check"], "check.py", "exec"), ns)
            ns["check"](candidate)
            self.emit({"case": 0, "passed": True})
            os._exit(0)
        except BaseException as error:  # noqa: B036
            try:
                self.emit({"case": 0, "passed": False, "error": repr(error)[:500]})
            finally:
                os._exit(1)


def read_until(stream, deadline, cap):
    """Read a pipe to EOF, ``cap`` bytes or ``deadline``; (data, timed_out)."""
    chunks, size = [], 0
    fd = stream.fileno()
    while size < cap:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return b"".join(chunks), True
        chunk = os.read(fd, min(65536, cap - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


def call(proc, args, kwargs, timeout):
    """One call to the serving candidate; the reply decoded into plain values."""
    request = json.dumps({"args": encode(list(args)), "kwargs": encode(dict(kwargs))})
    os.write(proc.stdin.fileno(), (request + "\n").encode())
    deadline = time.monotonic() + timeout
    buffer = b""
    while not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout.fileno()], [], [], remaining)[0]:
            raise TimeoutError("candidate call timed out")
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise RuntimeError("candidate process exited")
        buffer += chunk
        if len(buffer) > MAX_LINE:
            raise RuntimeError("candidate reply too long")
    reply = json.loads(buffer.split(b"\n", 1)[0])
    if type(reply) is not dict or reply.get("ok") is not True:
        raise RuntimeError("candidate raised " + str(reply.get("error"))[:500])
    return decode(reply["value"])


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "candidate":
        candidate_main(json.loads(sys.argv[2]))
        return
    payload = json.loads(sys.stdin.buffer.read())
    make_undumpable()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    Driver(payload).run()


if __name__ == "__main__":
    main()
