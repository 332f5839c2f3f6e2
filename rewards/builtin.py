"""Imports every built-in reward module so that its @register_reward runs."""

from rewards import environment, format_reward, math, reasoning_gym_reward, shaping  # noqa: F401
from rewards.code import reward as code_reward  # noqa: F401
