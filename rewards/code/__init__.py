"""The ``code`` reward: model-written code run in a sandbox against the row's tests."""

from rewards.code.reward import code_reward, extract_code, parse_tests
from rewards.code.sandbox import Limits, SandboxUnavailableError, bwrap_available

__all__ = [
    "Limits",
    "SandboxUnavailableError",
    "bwrap_available",
    "code_reward",
    "extract_code",
    "parse_tests",
]
