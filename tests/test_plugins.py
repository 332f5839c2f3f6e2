"""Reward plugins from an installed package's `aha.rewards` entry points: listed with their
description, trained with, and a failing one handled by algorithm.reward_error_policy."""

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, aha_command

from rl.config import load_config
from rl.run import train
from rl.scoring import RewardError

PACKAGE = "aha-plugin-fixture"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "aha-plugin-fixture"
version = "0.0.1"

[project.entry-points."aha.rewards"]
fixture_length = "aha_plugin_fixture:length_reward"
fixture_broken = "aha_plugin_fixture:broken_reward"

[tool.setuptools]
py-modules = ["aha_plugin_fixture"]
"""

MODULE = '''\
def length_reward(prompts, completions, **kwargs):
    """Completion length / 100: a plugin reward that varies on a tiny random model."""
    return [len(c if isinstance(c, str) else c[0]["content"]) / 100 for c in completions]


def broken_reward(prompts, completions, **kwargs):
    """Raises on every batch, on purpose."""
    raise ValueError("plugin bug")
'''


def pip(*args):
    return subprocess.run(
        [sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The package installed into this environment (no network, no build isolation), then
    uninstalled: a plain install, since a new .pth of an editable one is not seen until restart."""
    source = tmp_path_factory.mktemp("plugin")
    (source / "pyproject.toml").write_text(PYPROJECT)
    (source / "aha_plugin_fixture.py").write_text(textwrap.dedent(MODULE))
    pip("uninstall", "-y", PACKAGE)  # a leftover of an interrupted run
    done = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    assert done.returncode == 0, done.stderr[-2000:]
    importlib.invalidate_caches()
    yield PACKAGE
    pip("uninstall", "-y", PACKAGE)
    sys.modules.pop("aha_plugin_fixture", None)


def run(tmp_path, rewards, *overrides):
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            f"rewards={json.dumps([{'name': r} for r in rewards])}",
            "train.steps=1",
            "data.eval_size=0",
            "tracking.backends=[]",
            *overrides,
        ],
    )
    return train(config, progress=False)


def test_rewards_list_shows_the_plugin_with_its_description(plugin):
    done = subprocess.run([*aha_command(), "rewards", "list"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("fixture_length")]
    assert "Completion length / 100: a plugin reward that varies" in line


def test_training_with_the_plugin_and_a_failing_one_scored_zero(plugin, tmp_path, capsys):
    summary = run(tmp_path, ["fixture_length", "fixture_broken"])
    lines = (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    (metrics,) = [json.loads(x) for x in lines if "loss" in x]
    assert metrics["reward/fixture_length/mean"] > 0
    assert metrics["reward/fixture_broken/errors"] == 8  # prompts_per_step * group_size
    assert metrics["reward/fixture_broken/mean"] == 0
    err = capsys.readouterr().err
    assert (
        "reward 'fixture_broken': raised ValueError: plugin bug on a batch whose first row" in err
    )


def test_the_stop_policy_ends_the_run_naming_the_reward_and_the_row(plugin, tmp_path):
    with pytest.raises(RewardError) as caught:
        run(tmp_path, ["fixture_length", "fixture_broken"], "algorithm.reward_error_policy=stop")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("reward 'fixture_broken' raised ValueError: plugin bug")
    assert (
        "first row is {'prompt': '" in message
        and "'completion':" in message
        and "'answer':" in message
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
