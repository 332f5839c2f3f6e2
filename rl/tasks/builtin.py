"""Imports every built-in task module so that its @register_task runs."""

from rl.tasks import arithmetic, math_benchmarks, reasoning_gym_tasks  # noqa: F401
from rl.tasks import humaneval  # noqa: F401
