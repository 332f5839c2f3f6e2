"""aha's built-in tools, named in ``rollout.tools`` as ``calculator`` and ``python``.

Neither runs model text in the trainer's process, and neither can hang it: the calculator
parses with the math reward's safe parser in a math checker worker (killed at its deadline),
``python`` runs the code in the code reward's bubblewrap sandbox with its limits, through the
sandbox pool the code reward's runs go through too (at most ``AHA_CODE_WORKERS`` sandboxes at
once in the process, whoever asks). Each is made for a deadline (``rollout.tool_timeout_s``,
less a margin, so that a built-in answers "timed out" itself before the turn loop gives up on
it).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from typing import Any


def make_calculator(deadline_s: float) -> Callable[[str], str]:
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: The expression, e.g. "12 * 34 + 5".
        """
        from rewards.math.pool import get_pool

        value, error = get_pool().calculate(str(expression), deadline_s)
        if value is None:
            raise ValueError(error)
        return value

    return calculator


OUTPUT_BYTES = 1 << 16  # of stdout, and of stderr: a longer one is cut (and the program stopped)


def make_python(deadline_s: float) -> Callable[[str], str]:
    """The ``python`` tool. Its calls share the code reward's sandbox pool (rewards.code.pool)
    and its limits (rewards.code.sandbox.Limits), but CPU time, which is the call's deadline
    when that is longer, so that a busy loop ends as "timed out", not as a signal. Raises
    SandboxUnavailableError here, when the config is checked, if bubblewrap is missing."""
    from rewards.code.pool import get_pool
    from rewards.code.reward import make_backend
    from rewards.code.sandbox import Limits

    defaults = Limits()
    limits = Limits(
        timeout_s=deadline_s,
        total_timeout_s=deadline_s,
        cpu_s=max(defaults.cpu_s, math.ceil(deadline_s)),
        max_output_bytes=OUTPUT_BYTES,
    )
    backend = make_backend("bwrap", limits)

    def python(code: str) -> str:
        """Run a Python program in a sandbox and see what it printed.

        Args:
            code: The program's source code; print what you want to see.

        Returns:
            Its exit status, standard output and standard error.
        """
        deadline = time.monotonic() + deadline_s  # waiting for a free sandbox counts too
        job: dict[str, Any] = {"form": "stdio", "code": str(code), "cases": [""], "stderr": True}
        return run_report(get_pool().run(backend, job, limits, deadline), deadline_s)

    return python


def run_report(result, deadline_s: float, cap: int = OUTPUT_BYTES) -> str:
    """A sandbox run (rewards.code.sandbox.RunResult) as the python tool's text; a failure of
    the sandbox itself (none free in time, bwrap broken) is raised, for the turn loop to
    answer as an error."""
    if result.error:
        raise RuntimeError(f"the sandbox failed: {result.error[:300]}")
    report = next((m for m in result.messages if m.get("case") == 0), None) or {}
    stdout = report.get("stdout") or ""
    stderr = report.get("stderr") or ""
    exit_code = report.get("exit")
    if not report or report.get("timed_out") or result.timed_out:
        status = f"timed out after {deadline_s:g} s"
    elif exit_code is None:  # the driver stopped it: its stdout reached the cap
        status = f"stopped, its output passed {cap} bytes"
        stdout += f"\n[output cut at {cap} bytes]"
    elif isinstance(exit_code, int) and exit_code < 0:
        status = f"{exit_code} ({_signal_name(-exit_code)})"
    else:
        status = str(exit_code)
    if 'File "solution.py"' in stderr:  # a traceback: the harness's own frames are noise
        head, _, rest = stderr.partition('  File "solution.py"')
        stderr = head.split("\n")[0] + '\n  File "solution.py"' + rest
    if report.get("stderr_cut"):
        stderr += f"\n[stderr cut at {cap} bytes]"
    return f"exit status: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}".rstrip("\n")


def _signal_name(number: int) -> str:
    try:
        return "killed by " + signal.Signals(number).name
    except ValueError:
        return f"killed by signal {number}"


# name -> a factory taking the call's deadline in seconds
BUILTIN_TOOLS: dict[str, Callable[[float], Callable[..., Any]]] = {
    "calculator": make_calculator,
    "python": make_python,
}
