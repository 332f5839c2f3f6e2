"""Imports every built-in task module so that its @register_task runs."""

from rl.tasks import (  # noqa: F401
    arithmetic,
    humaneval,
    math_benchmarks,
    reasoning_gym_tasks,
)
