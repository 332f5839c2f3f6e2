import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a fast 2-step run on the tiny random model with a reward that varies."""
    return [
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]",
    ]


def aha_command() -> list[str]:
    return [sys.executable, "-m", "rl.cli"]
