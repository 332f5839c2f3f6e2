"""aha's built-in tools, named in ``rollout.tools`` as ``calculator`` and ``python``.

Neither runs model text in the trainer's process, and neither can hang it: the calculator
parses with the math reward's safe parser in a math checker worker (killed at its deadline),
``python`` runs the code in the code reward's bubblewrap sandbox with its limits. Each is made
for a deadline (``rollout.tool_timeout_s``, less a margin, so that a built-in answers "timed
out" itself before the turn loop gives up on it).
"""

from __future__ import annotations

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


def make_python(deadline_s: float) -> Callable[[str], str]:
    def python(code: str) -> str:
        """Run a Python program in a sandbox and see what it printed.

        Args:
            code: The program's source code; print what you want to see.

        Returns:
            Its exit status, standard output and standard error.
        """
        from rewards.code.reward import make_backend
        from rewards.code.sandbox import Limits, make_payload

        limits = Limits(timeout_s=deadline_s, total_timeout_s=deadline_s, max_output_bytes=1 << 16)
        backend = make_backend("bwrap", limits)
        job: dict[str, Any] = {"form": "stdio", "code": str(code), "cases": [""], "stderr": True}
        result = backend.run(make_payload(job, limits), deadline_s + 5.0)
        return run_report(result, deadline_s)

    return python


def run_report(result, deadline_s: float) -> str:
    """A sandbox run (rewards.code.sandbox.RunResult) as the python tool's text."""
    if result.error:
        raise RuntimeError(f"the sandbox failed: {result.error[:300]}")
    report = next((m for m in result.messages if m.get("case") == 0), None)
    if report is None or report.get("timed_out") or result.timed_out:
        status = f"timed out after {deadline_s:g} s"
    else:
        status = str(report.get("exit"))
    report = report or {}
    stderr = report.get("stderr") or ""
    if 'File "solution.py"' in stderr:  # a traceback: the harness's own frames are noise
        head, _, rest = stderr.partition('  File "solution.py"')
        stderr = head.split("\n")[0] + '\n  File "solution.py"' + rest
    return (
        f"exit status: {status}\nstdout:\n{report.get('stdout') or ''}\nstderr:\n{stderr}"
    ).rstrip("\n")


# name -> a factory taking the call's deadline in seconds
BUILTIN_TOOLS: dict[str, Callable[[float], Callable[..., Any]]] = {
    "calculator": make_calculator,
    "python": make_python,
}
