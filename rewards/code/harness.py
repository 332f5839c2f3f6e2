"""The program that runs inside the sandbox: a driver, and the candidate runner it starts.

Standard library only, and self-contained: the parent passes this file's source with
``python -I -S -c SOURCE`` (bubblewrap, local) or as the program (SandboxFusion), and the run's
payload on stdin (``M`` + marshal from our own parent, ``J`` + JSON from a remote client).
Nothing of the project is on the sandbox's disk.

Who decides what. The parent holds the expected outputs and decides every verdict; the driver
only reports what happened, on its stdout, each line tagged with a per-run random nonce the
candidate never sees. The candidate's code never runs in the driver's interpreter:

* ``stdio``: one fresh candidate process per case, stdin from a file, stdout read back and sent
  to the parent verbatim; the parent compares.
* ``function``: one candidate process serves calls; each result is turned into tagged JSON
  there and parsed in the driver into plain ``list``/``dict``/``int``/... values, so no object
  the candidate made ever reaches the parent, and ``==`` is never called on one.
* ``assert``: the row's ``check`` function runs in its own process, with a proxy in place of
  the candidate that forwards every call to the candidate process the same way. Only after
  ``check`` returns does that process write ``passed`` with the nonce. Replacing builtins,
  ``AssertionError``, the harness or ``sys.exit`` in the candidate's interpreter changes
  nothing in the checking one.

When the driver starts as root (the bubblewrap backend, inside its own pid namespace) the
check process drops to uid A and the candidate to uid B, so the candidate can neither signal
nor trace the checker, and rlimits such as RLIMIT_NPROC apply per sandbox slot. Otherwise the
driver and checker make themselves non-dumpable, which keeps a same-uid candidate (local or
remote backends) out of their memory and file descriptors.

Start-up time is most of a run's cost, so the hot path imports only C modules (the wire
format, :mod:`rewards.code.wire`, is prepended to this file to make the program): requests to
the candidate are marshal (trusted direction), replies are JSON read with ``_json``'s C scanner
(untrusted direction: marshal is not safe on hostile input), and processes are forked by hand.
"""

import marshal
import os
import resource
import select
import signal
import sys
import time

try:  # noqa: SIM105 - in the parent (tests); in the sandbox wire.py is the first half
    from rewards.code.wire import decode, dumps, encode, loads, plain_json
except ImportError:
    pass

MAX_REPLY = 16 * 1024 * 1024  # a longer reply from the candidate is a failure


# -- process hygiene --------------------------------------------------------------------------

LIMIT_NAMES = ("cpu_s", "address_space_mb", "file_size_mb", "open_files", "processes")


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
        if value is None or int(value) < 0:
            continue
        value = int(value) * (1 << 20 if key.endswith("_mb") else 1)
        # Lowering never fails; raising a limit we do not hold is skipped. (No contextlib:
        # every import costs start-up time in each sandboxed process.)
        try:  # noqa: SIM105
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def make_undumpable():
    """No ptrace, /proc/PID/mem or /proc/PID/fd for same-uid processes (PR_SET_DUMPABLE=0)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass


def drop_to(uid):
    """Become ``uid`` for good; the kernel also makes us non-dumpable on the way."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def spawn(argv, stdin_fd, stdout_fd, uid, stderr_fd=None):
    """Fork and exec ``argv`` in a new session, as ``uid`` if given; its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        _become_child(stdin_fd, stdout_fd, uid, stderr_fd)
        os.execv(argv[0], argv)
    finally:
        os._exit(127)


def _become_child(stdin_fd, stdout_fd, uid, stderr_fd=None):
    """In a fresh fork: own session, only these pipes (stderr: /dev/null) open, then ``uid``."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(stdin_fd, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(devnull if stderr_fd is None else stderr_fd, 2)
    os.closerange(3, 65536)  # the driver's stdin (the payload) and stdout (the report) too
    if uid is not None:
        drop_to(uid)


def kill_session(pid):
    for kill in (os.killpg, os.kill):
        try:  # noqa: SIM105
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:  # noqa: SIM105
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def read_until(fd, deadline, cap):
    """Read a pipe to EOF, ``cap`` bytes or ``deadline``; (data, timed_out)."""
    chunks, size = [], 0
    while size < cap:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b"".join(chunks), True
        chunk = os.read(fd, min(65536, cap - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


# -- the candidate runner (its own process; the candidate's code runs here) -----------------


def _load(ns, code_path, prelude_path):
    for path in (prelude_path, code_path):
        if path:
            with open(path) as f:
                source = f.read()
            exec(compile(source, os.path.basename(path), "exec"), ns)


def candidate_main(mode, entry_point, code_path, prelude_path, *limit_values):
    """A fresh interpreter's entry point (``python -c HARNESS candidate ...``)."""
    limits = {LIMIT_NAMES[i]: value for i, value in enumerate(limit_values)}
    if mode == "stdio":
        set_limits(limits)
        sys.argv = ["solution.py"]
        _load({"__name__": "__main__", "__builtins__": __builtins__}, code_path, prelude_path)
        return
    serve(limits, entry_point, code_path, prelude_path)


def serve(limits, entry_point, code_path, prelude_path):
    """Load the candidate's code, then answer calls framed on fd 0 with JSON lines on fd 1."""
    set_limits(limits)
    # Private copies of the RPC pipes; fds 0 and 1 go to /dev/null and stderr so a print()
    # in the candidate's code cannot desynchronise the protocol by accident.
    rpc_in, rpc_out = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        _load(ns, code_path, prelude_path)
        fn = ns.get(entry_point)
        load_error = None if callable(fn) else "no function " + repr(entry_point)
    except BaseException as error:  # noqa: B036 - the candidate's SystemExit is a failure too
        load_error = "load: " + type(error).__name__ + ": " + str(error)[:500]
    pending = b""
    while True:
        while len(pending) < 4 or len(pending) < 4 + int.from_bytes(pending[:4], "big"):
            chunk = os.read(rpc_in, 65536)
            if not chunk:
                return
            pending += chunk
        size = int.from_bytes(pending[:4], "big")
        frame, pending = pending[4 : 4 + size], pending[4 + size :]
        try:
            if load_error:
                raise RuntimeError(load_error)
            args, kwargs = marshal.loads(frame)
            reply = {"ok": True, "value": encode(fn(*args, **kwargs))}
            line = dumps(reply)
        except BaseException as error:  # noqa: B036
            line = dumps({"ok": False, "error": type(error).__name__ + ": " + str(error)[:500]})
        os.write(rpc_out, (line + "\n").encode())


class Candidate:
    """The serving candidate process, seen from the driver or the checker."""

    def __init__(self, driver, fork=False):
        """``fork``: a child of the driver, cheap, only while the driver holds no secret."""
        to_child, self.request_fd = os.pipe()
        self.reply_fd, from_child = os.pipe()
        if fork:
            self.pid = os.fork()
            if self.pid == 0:
                try:
                    _become_child(to_child, from_child, driver.candidate_uid)
                    serve(driver.limits, driver.entry_point, driver.code_path, driver.prelude_path)
                finally:
                    os._exit(0)
        else:
            self.pid = spawn(driver.argv("serve"), to_child, from_child, driver.candidate_uid)
        os.close(to_child)
        os.close(from_child)

    def call(self, args, kwargs, timeout):
        """One call; the reply parsed into plain values, or an exception."""
        frame = marshal.dumps((tuple(args), dict(kwargs)))  # ValueError for non-plain args
        os.write(self.request_fd, len(frame).to_bytes(4, "big") + frame)
        deadline, buffer = time.monotonic() + timeout, b""
        while not buffer.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.reply_fd], [], [], remaining)[0]:
                raise TimeoutError("candidate call timed out")
            chunk = os.read(self.reply_fd, 65536)
            if not chunk:
                raise RuntimeError("candidate process exited")
            buffer += chunk
            if len(buffer) > MAX_REPLY:
                raise RuntimeError("candidate reply too long")
        reply = loads(buffer.split(b"\n", 1)[0].decode("utf-8"))
        if type(reply) is not dict or reply.get("ok") is not True:
            raise RuntimeError("candidate raised " + str(reply.get("error"))[:500])
        return decode(reply["value"])

    def close(self, driver):
        kill_session(self.pid)
        for fd in (self.request_fd, self.reply_fd):
            os.close(fd)
        driver.kill_stragglers()


# -- the driver ------------------------------------------------------------------------------


class Driver:
    """Runs one job. Built from the payload's public part; ``receive`` adds the secret part."""

    def __init__(self, public):
        self.payload = public
        self.limits = public["limits"]
        self.entry_point = public.get("entry_point") or "-"
        uids = public.get("uids")  # [checker, candidate] when started as root
        self.checker_uid, self.candidate_uid = uids if uids else (None, None)
        workdir = public.get("workdir")
        # made here (remote runs): removed by ``cleanup``, in this process only, never a fork's
        self.own_workdir = os.getpid() if not workdir else None
        if not workdir:
            import tempfile

            workdir = tempfile.mkdtemp(prefix="aha-code-")
        self.workdir = workdir
        self.code_path = self._write("solution.py", public["code"])
        self.prelude_path = self._write("prelude.py", public.get("prelude") or "")
        self.first = None  # a candidate forked before the secret part arrived

    def prefork(self):
        """Import the stdlib modules the code names, then fork the candidate: both the
        candidate and the checker (forked later) skip that start-up cost."""
        text = self.payload["code"] + "\n" + (self.payload.get("prelude") or "")
        for name in PREIMPORT:
            if "import " + name in text or "from " + name + " " in text:
                try:  # noqa: SIM105
                    __import__(name)
                except ImportError:
                    pass
        self.first = Candidate(self, fork=True)

    def receive(self, secret):
        self.payload = dict(self.payload, **secret)
        self.nonce = secret["nonce"]
        self.timeout = float(secret["timeout"])  # per case, or per call to the candidate
        self.total_timeout = float(secret.get("total_timeout") or self.timeout)

    def _write(self, name, text):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)  # owned by the driver: the candidate can read, not replace it
        return path

    def argv(self, mode):
        values = [str(self.limits.get(name, -1)) for name in LIMIT_NAMES]
        entry = self.entry_point
        return (
            [sys.executable, "-I", "-S", "-c", self.payload["harness"], "candidate", mode, entry]
            + [self.code_path, self.prelude_path]
            + values
        )

    def cleanup(self):
        """Remove the working directory if it was made here. A sandbox's own /tmp vanishes
        with it; a remote server's does not, and every run used to leave one behind."""
        if self.own_workdir == os.getpid():
            import shutil

            os.chdir("/")
            shutil.rmtree(self.workdir, ignore_errors=True)

    def emit(self, message):
        message["nonce"] = self.nonce
        os.write(1, (dumps(message) + "\n").encode())

    def kill_stragglers(self):
        if self.candidate_uid is not None:
            # Root in our own pid namespace: kill(-1) reaches every straggler (forks that left
            # the session) but not us or the namespace's init.
            try:  # noqa: SIM105
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass

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
        os.chdir(self.workdir)
        # stderr (the python tool's): a file, read back capped once the case is over
        err_path = os.path.join(self.workdir, "stderr.txt") if self.payload.get("stderr") else None
        for index, text in enumerate(self.payload["cases"]):
            stdin_fd = os.open(self._write("input.txt", text), os.O_RDONLY)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            err_fd = os.open(err_path, flags, 0o600) if err_path else None
            out_r, out_w = os.pipe()
            pid = spawn(self.argv("stdio"), stdin_fd, out_w, self.candidate_uid, err_fd)
            os.close(stdin_fd)
            os.close(out_w)
            if err_fd is not None:
                os.close(err_fd)
            deadline = time.monotonic() + self.timeout
            out, timed_out = read_until(out_r, deadline, cap)
            exit_code = None
            while (
                not timed_out and len(out) < cap
            ):  # stdout closed: wait for the exit status until the deadline
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exit_code = os.waitstatus_to_exitcode(status)
                    break
                timed_out = time.monotonic() > deadline
                time.sleep(0.001)
            os.close(out_r)
            if exit_code is None:
                kill_session(pid)
            self.kill_stragglers()
            report = {
                "case": index,
                "stdout": out.decode("utf-8", "replace"),
                "timed_out": timed_out,
                "exit": exit_code,
            }
            if err_path:
                with open(err_path, "rb") as f:
                    err = f.read(cap + 1)
                report["stderr"] = err[:cap].decode("utf-8", "replace")
                report["stderr_cut"] = len(err) > cap
            self.emit(report)

    def run_function(self):
        candidate, self.first = self.first, None
        for index, case in enumerate(self.payload["cases"]):
            if candidate is None:
                candidate = Candidate(self)
            try:
                value = candidate.call(case.get("args", []), case.get("kwargs", {}), self.timeout)
                self.emit({"case": index, "ok": True, "result": plain_json(value)})
            except Exception as error:
                self.emit({"case": index, "ok": False, "error": str(error)[:500]})
                candidate.close(self)  # a failed call leaves the server in an unknown state
                candidate = None
        if candidate is not None:
            candidate.close(self)

    def run_assert(self):
        candidate, self.first = self.first or Candidate(self), None
        checker = os.fork()
        if checker == 0:
            self.check_child(candidate)  # never returns
        deadline = time.monotonic() + self.total_timeout
        while time.monotonic() < deadline:
            if os.waitpid(checker, os.WNOHANG)[0]:
                break
            time.sleep(0.001)
        else:
            kill_session(checker)
            self.emit({"case": 0, "passed": False, "error": "timed out"})
        candidate.close(self)

    def check_child(self, candidate):
        """The checking process: runs the row's check() against a proxy, then reports."""
        try:
            if self.checker_uid is not None:
                drop_to(self.checker_uid)
            else:
                make_undumpable()
            set_limits(self.payload.get("check_limits", {}))
            timeout = self.timeout

            def proxy(*args, **kwargs):
                return candidate.call(args, kwargs, timeout)

            ns = {"__name__": "check", "__builtins__": __builtins__}
            exec(compile(self.payload.get("prelude") or "", "prelude.py", "exec"), ns)
            # As in HumanEval's own harness, the entry point's name means the solution under
            # test (HumanEval/33's check calls it by name, not only as ``candidate``).
            ns[self.payload["entry_point"]] = proxy
            exec(compile(self.payload["check"], "check.py", "exec"), ns)
            ns["check"](proxy)
            self.emit({"case": 0, "passed": True})
            os._exit(0)
        except BaseException as error:  # noqa: B036
            try:
                self.emit({"case": 0, "passed": False, "error": repr(error)[:500]})
            finally:
                os._exit(1)


PREIMPORT = (
    "typing",
    "collections",
    "math",
    "itertools",
    "functools",
    "heapq",
    "bisect",
    "string",
    "re",
    "fractions",
    "decimal",
    "hashlib",
    "statistics",
)


def read_exact(fd, size):
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("payload truncated")
        data += chunk
    return data


def read_rest(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def parse(kind, data):
    """``M``: marshal (our own parent, trusted); ``J``: JSON (remote clients)."""
    return marshal.loads(data) if kind == b"M" else loads(data.decode("utf-8"))


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "candidate":
        candidate_main(*sys.argv[2:])
        return
    # The payload comes in two parts: KIND, a 10-digit length, the public part (code, limits),
    # then the secret part (nonce, check code, cases). The candidate is forked between the
    # two reads, so the secret was never in any memory it inherits.
    kind = read_exact(0, 1)
    public = parse(kind, read_exact(0, int(read_exact(0, 10))))
    if not public.get("uids"):
        make_undumpable()  # as root, the candidate runs under another uid instead
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    driver = Driver(public)
    try:
        if public["form"] in ("function", "assert"):
            driver.prefork()
        driver.receive(parse(kind, read_rest(0)))
        driver.run()
    finally:
        driver.cleanup()


if __name__ == "__main__":
    main()
