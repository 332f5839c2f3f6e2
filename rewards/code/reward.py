"""The ``code`` reward: run the completion's last code block against the row's tests.

Tests (the ``tests`` column: a dict, or a JSON string of one) come in three forms:

* ``{"type": "stdio", "cases": [{"input": "...", "output": "..."}]}``: APPS / CodeContests.
* ``{"type": "function", "entry_point": "f", "cases": [{"args": [...], "expected": ...}]}``
  (a case may add ``"kwargs": {...}``); the result is compared as JSON, tuples as lists.
* ``{"type": "assert", "entry_point": "f", "code": "def check(candidate): ...",
  "prelude": "..."}``: HumanEval / MBPP. ``prelude`` (optional) runs before the candidate's
  code and before the check code, e.g. HumanEval's prompt with its imports and helpers.

Every verdict is made here, in the trainer's process, from plain data: stdout text, or JSON
values decoded from tagged JSON by the harness. See :mod:`rewards.code.harness` for why the
sandboxed code cannot forge one and :mod:`rewards.code.sandbox` for the isolation.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from rewards.code.pool import get_pool
from rewards.code.sandbox import (
    Backend,
    BwrapBackend,
    Limits,
    RunResult,
    SandboxUnavailableError,
    UnsafeLocalBackend,
)
from rewards.registry import register_reward
from rewards.text import completion_text

logger = logging.getLogger(__name__)

_FENCE = re.compile(
    r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S
)
_ALIASES = {"python": {"python", "py", "python3"}}


def extract_code(text: str, language: str | None = "python") -> str | None:
    """The last fenced code block tagged ``language`` (or untagged); None if there is none.

    ``language=None`` takes the last block whatever its tag. An unclosed fence (a truncated
    completion) is no block.
    """
    wanted = _ALIASES.get(language or "", {language}) if language else None
    blocks = [
        body
        for _, tag, body in _FENCE.findall(text)
        if wanted is None or not tag or tag.lower() in wanted
    ]
    return blocks[-1] if blocks else None


def parse_tests(spec: Any) -> dict[str, Any] | None:
    """The tests as a validated dict, or None if they are missing or malformed."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return None
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "stdio" and isinstance(spec.get("cases"), list) and spec["cases"]:
        return spec
    if kind == "function" and spec.get("entry_point") and isinstance(spec.get("cases"), list):
        return spec if spec["cases"] else None
    if kind == "assert" and spec.get("entry_point") and isinstance(spec.get("code"), str):
        return spec
    return None


def make_job(code: str, tests: dict[str, Any]) -> dict[str, Any]:
    """What the sandbox needs to know, and nothing it should not (no expected outputs)."""
    job: dict[str, Any] = {"form": tests["type"], "code": code, "prelude": tests.get("prelude")}
    if tests["type"] == "stdio":
        job["cases"] = [str(case.get("input", "")) for case in tests["cases"]]
    elif tests["type"] == "function":
        job["entry_point"] = tests["entry_point"]
        job["cases"] = [
            {"args": list(case.get("args", [])), "kwargs": dict(case.get("kwargs", {}))}
            for case in tests["cases"]
        ]
    else:
        job["entry_point"] = tests["entry_point"]
        job["check"] = tests["code"]
    return job


def compare_stdout(actual: str, expected: str, whitespace: str = "trailing") -> bool:
    """Judge stdout.

    ``trailing`` (default): every line compared after dropping its trailing whitespace; extra
    or missing lines fail (one final newline is not a line). ``exact``: byte for byte.
    ``tokens``: the same whitespace-separated tokens.
    """
    if whitespace == "exact":
        return actual == expected
    if whitespace == "tokens":
        return actual.split() == expected.split()
    actual_lines = [line.rstrip() for line in actual.replace("\r\n", "\n").splitlines()]
    expected_lines = [line.rstrip() for line in expected.replace("\r\n", "\n").splitlines()]
    return actual_lines == expected_lines


def json_equal(actual: Any, expected: Any, float_tol: float = 1e-9) -> bool:
    """Equality of plain JSON values; bools are not numbers, floats within ``float_tol``."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        if isinstance(expected, int) and isinstance(actual, int):
            return actual == expected
        return math.isclose(actual, expected, rel_tol=float_tol, abs_tol=float_tol)
    if isinstance(expected, list | tuple) and isinstance(actual, list):
        return len(actual) == len(expected) and all(
            json_equal(a, e, float_tol) for a, e in zip(actual, expected, strict=True)
        )
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == {str(k) for k in expected} and all(
            json_equal(actual[str(k)], v, float_tol) for k, v in expected.items()
        )
    return type(actual) is type(expected) and actual == expected


def judge(
    tests: dict[str, Any], result: RunResult, whitespace: str = "trailing", float_tol: float = 1e-9
) -> list[str]:
    """One mark per case: ``P`` passed, ``F`` failed, ``T`` timed out, ``E`` error / no report."""
    by_case = {m["case"]: m for m in result.messages if isinstance(m.get("case"), int)}
    kind = tests["type"]
    count = 1 if kind == "assert" else len(tests["cases"])
    marks = []
    for index in range(count):
        message = by_case.get(index)
        if message is None:
            marks.append("T" if result.timed_out else "E")
        elif kind == "stdio":
            case = tests["cases"][index]
            ok = not message.get("timed_out") and message.get("exit") == 0
            ok = ok and compare_stdout(
                str(message.get("stdout")), str(case.get("output", "")), whitespace
            )
            marks.append("P" if ok else "T" if message.get("timed_out") else "F")
        elif kind == "function":
            expected = tests["cases"][index].get("expected")
            ok = message.get("ok") is True and json_equal(
                message.get("result"), expected, float_tol
            )
            timed_out = "timed out" in str(message.get("error", ""))
            marks.append("P" if ok else "T" if timed_out else "F")
        else:
            timed_out = "timed out" in str(message.get("error", ""))
            marks.append("P" if message.get("passed") is True else "T" if timed_out else "F")
    return marks


def score(marks: Sequence[str], binary: bool = False) -> float:
    passed = sum(mark == "P" for mark in marks) / len(marks) if marks else 0.0
    return float(passed == 1.0) if binary else passed


def make_backend(
    sandbox: str, limits: Limits, remote_url: str | None = None, remote_concurrency: int = 8
) -> Backend:
    """``bwrap`` (default), ``remote`` (SandboxFusion at ``remote_url``) or ``unsafe-local``."""
    if sandbox == "bwrap":
        return BwrapBackend(limits)
    if sandbox == "remote":
        if not remote_url:
            raise SandboxUnavailableError("sandbox='remote' needs remote_url=http://host:port")
        from rewards.code.remote import SandboxFusionBackend

        return SandboxFusionBackend(remote_url, limits, max_concurrency=remote_concurrency)
    if sandbox == "unsafe-local":
        logger.warning("code reward: running model-written code WITHOUT a sandbox (unsafe-local)")
        return UnsafeLocalBackend(limits)
    raise ValueError(f"unknown sandbox {sandbox!r}; use bwrap, remote or unsafe-local")


def run_jobs(
    jobs: Sequence[dict[str, Any] | None], backend: Backend, limits: Limits, workers: int
) -> list[RunResult | None]:
    """Run every job in its own sandbox, ``workers`` submitting at a time, through the
    process-wide sandbox pool (:mod:`rewards.code.pool`); None jobs are skipped.

    Any exception becomes that run's error, never another run's.
    """
    return get_pool().run_jobs(jobs, backend, limits, workers)


@register_reward("code")
def code_reward(
    prompts: list,
    completions: list,
    tests: list | None = None,
    language: str | None = "python",
    binary: bool = False,
    whitespace: str = "trailing",
    float_tol: float = 1e-9,
    timeout: float = 4.0,
    total_timeout: float = 20.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    sandbox: str = "bwrap",
    remote_url: str | None = None,
    remote_concurrency: int = 8,
    log_extra: Callable[[str, list], None] | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    **_: Any,
) -> list[float | None]:
    """Fraction of the row's `tests` the last code block passes, run in a sandbox (1/0 if binary).

    Rows without tests score None; a completion without a code block, or whose run failed in
    any way (timeout, crash, sandbox error), scores 0 for the cases it did not pass. The one
    exception raised is :class:`SandboxUnavailableError`, on the first call, when bubblewrap
    is missing and ``sandbox`` was not set to ``remote`` or ``unsafe-local``: a configuration
    error, which must stop the run rather than train on unsandboxed or missing rewards.
    Per-case marks (P pass, F fail, T timeout, E no report) go to ``log_extra("code_tests")``.
    """
    if tests is None:
        return [None] * len(completions)
    if isinstance(language, list):  # a dataset column named `language`, not our option
        language = "python"
    limits = Limits(timeout_s=timeout, total_timeout_s=total_timeout, address_space_mb=memory_mb)
    backend = make_backend(sandbox, limits, remote_url, remote_concurrency)
    specs = [parse_tests(spec) for spec in tests]
    codes = [extract_code(completion_text(c), language) for c in completions]
    jobs = [
        make_job(code, spec) if spec is not None and code is not None else None
        for code, spec in zip(codes, specs, strict=True)
    ]
    results = run_jobs(jobs, backend, limits, workers or get_pool().size)

    scores: list[float | None] = []
    summaries: list[str] = []
    ran: list[list[str]] = []
    for spec, code, result in zip(specs, codes, results, strict=True):
        if spec is None:
            scores.append(None)
            summaries.append("no tests")
        elif code is None or result is None:
            scores.append(0.0)
            summaries.append("no code block")
        else:
            marks = judge(spec, result, whitespace, float_tol)
            ran.append(marks)
            scores.append(score(marks, binary))
            note = f" ({result.error[:200]})" if result.error else ""
            summaries.append(f"[{result.sandbox}] {''.join(marks)}{note}")
            if result.error:
                logger.warning("code reward: sandbox error: %s", result.error[:500])
    if log_extra is not None:
        log_extra("code_tests", summaries)
    if log_metric is not None and completions:
        log_metric("code/no_block_frac", codes.count(None) / len(completions))
        if ran:
            log_metric("code/timeout_frac", sum("T" in marks for marks in ran) / len(ran))
    return scores
