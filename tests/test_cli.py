"""The `aha` command: every --help answers fast, and bad input is one clear line."""

import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT

HELP_COMMANDS = [[], ["train"], ["config"], ["rewards"], ["rewards", "list"], ["tasks"]]


def aha(*args, cwd=ROOT, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "rl.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "aha")
def test_help(command):
    result = aha(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: aha" in result.stdout


def test_help_does_not_import_torch():
    code = "import sys; from rl.cli import main\ntry:\n main(['train', '--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip().endswith("False")


def test_lists():
    rewards = aha("rewards", "list")
    assert rewards.returncode == 0 and "math" in rewards.stdout and "format" in rewards.stdout
    tasks = aha("tasks")
    assert tasks.returncode == 0 and "arithmetic" in tasks.stdout


def test_config_prints_resolved_yaml():
    result = aha("config", "configs/tiny.yaml", "train.steps=5")
    assert result.returncode == 0 and "steps: 5" in result.stdout and "tiny-random" in result.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.steps=2"], "unknown key 'trian.steps'"),
        (["model.name=/no/such/model/folder"], "model.name"),
        (["rewards.0.name=not_a_reward"], "unknown reward 'not_a_reward'"),
        (["data.dataset=/no/such/data.jsonl"], "does not exist"),
        (["data.dataset={bad}/rows.jsonl"], "row 0 has no 'answer' column"),
        (["model.name=someone/not-cached-model"], "offline"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, overrides, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "What is 1+1?", "solution": "2"}\n')
    run_dir = tmp_path / "run"
    overrides = [o.replace("{bad}", str(tmp_path)) for o in overrides]
    result = aha("train", "configs/tiny.yaml", f"run_dir={run_dir}", *overrides)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("aha: error:")]
    assert len(errors) == 1
    assert not (run_dir / "checkpoints").exists()


def test_missing_config_file():
    result = aha("train", "no/such/config.yaml")
    assert result.returncode == 2 and "no/such/config.yaml does not exist" in result.stderr


def test_plugin_reward_by_path_is_listed_in_config(tmp_path):
    result = aha(
        "config",
        "configs/tiny.yaml",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count'}}]",
    )
    assert result.returncode == 0, result.stderr
