import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# trackio fixes its data folder when it is first imported, by whichever test that is: one folder
# for the whole session, set before any import, keeps its databases out of the home folder.
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="aha-tests-trackio-")
TRACKIO_DIR = Path(os.environ["TRACKIO_DIR"])


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a fast 2-step run on the tiny random model with a reward that varies."""
    return [
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]",
    ]


def aha_command() -> list[str]:
    return [sys.executable, "-m", "rl.cli"]


@pytest.fixture(scope="module")
def tiny_folder():
    """The tiny random model's folder (built on first use, no download)."""
    from rl.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_folder):
    from rl.models import load_tokenizer

    return load_tokenizer(tiny_folder)
