"""Imports every built-in task module so that its @register_task runs."""

from rl.tasks import arithmetic  # noqa: F401
