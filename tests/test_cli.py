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


# ---------------------------------------------------------------- issue 14: arguments and one line


def error_line(capsys):
    """The one `aha: error:` line of a command run in-process, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("aha: error:")]
    return line


@pytest.mark.parametrize(
    ("argv", "config", "overrides"),
    [
        # the README's form: overrides after options
        (
            ["eval", "m", "--dataset", "x", "--limit", "20", "rollout.max_tokens=512"],
            None,
            ["rollout.max_tokens=512"],
        ),
        (["eval", "m", "a=1", "--n", "2", "b=2", "--dataset", "x"], None, ["a=1", "b=2"]),
        (["train", "c.yaml", "--no-progress", "a=1"], "c.yaml", ["a=1"]),
        (["train", "c.yaml", "a=1", "--no-progress", "b=2"], "c.yaml", ["a=1", "b=2"]),
        (["train", "resume=runs/x", "train.steps=4"], None, ["resume=runs/x", "train.steps=4"]),
        (["config", "train.steps=3"], None, ["train.steps=3"]),  # the defaults, one key changed
    ],
)
def test_overrides_are_taken_wherever_they_stand(argv, config, overrides):
    from rl.cli import _parse, _parser

    args = _parse(_parser(), argv)
    assert args.overrides == overrides
    assert getattr(args, "config", None) == config


@pytest.mark.parametrize("argv", [["train", "c.yaml", "--bogus"], ["view", "r", "a=1"]])
def test_unknown_arguments_are_still_refused(argv, capsys):
    from rl.cli import _parse, _parser

    with pytest.raises(SystemExit):
        _parse(_parser(), argv)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_config_with_only_overrides_prints_the_defaults_with_them(capsys):
    from rl.cli import main

    assert main(["config", "train.steps=3"]) == 0
    assert "  steps: 3\n" in capsys.readouterr().out


def test_train_without_a_config_file_says_it_comes_first(capsys):
    from rl.cli import main

    assert main(["train", "train.steps=3"]) == 2
    assert "a CONFIG file comes first" in error_line(capsys)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file", "is a file, not a folder"),
        ("file/run", "cannot create"),
        ("/proc/aha-run-folder-test", "cannot create /proc/aha-run-folder-test"),
    ],
)
def test_a_run_dir_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, where, message):
    from rl.cli import main

    (tmp_path / "file").write_text("not a folder")
    run_dir = where if where.startswith("/") else tmp_path / where
    assert main(["train", "configs/tiny.yaml", f"run_dir={run_dir}"]) == 2
    assert message in error_line(capsys)


def test_an_empty_dataset_file_is_one_line_in_train_and_eval(tmp_path, capsys):
    from rl.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    run_dir = f"run_dir={tmp_path / 'run'}"
    assert main(["train", "configs/tiny.yaml", run_dir, f"data.dataset={empty}"]) == 2
    assert f"{empty} is empty" in error_line(capsys)
    assert main(["eval", "tiny-random", "--dataset", str(empty)]) == 2
    assert f"{empty} is empty" in error_line(capsys)


def test_a_malformed_dataset_line_is_named_by_its_number(tmp_path):
    from rl.data import DataError, load_rows

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2}\n{"prompt": "c\n')
    with pytest.raises(DataError, match=r"rows.jsonl, line 3: not JSON"):
        load_rows(str(rows), "train")


def test_a_yaml_error_names_its_line(tmp_path):
    from rl.config import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1, 2\nmodel:\n  name: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "-1"], "--temperature: must be 0 (greedy) or more, got -1"),
        (["--limit", "-1"], "--limit: must be at least 1"),
        (["--limit", "0"], "--limit: must be at least 1"),
        (["--n", "0"], "--n: must be at least 1, got 0"),
    ],
)
def test_eval_refuses_bad_numbers_in_one_line(capsys, options, message):
    from rl.cli import main

    # the override after the options is accepted (the README's form) and the number refused
    argv = ["eval", "tiny-random", "--dataset", "arithmetic", *options, "rollout.max_tokens=4"]
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_eval_of_a_run_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    from rl.cli import main
    from rl.config import config_to_yaml, load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_to_yaml(load_config("configs/tiny.yaml")))
    assert main(["eval", str(run_dir), "--dataset", "arithmetic"]) == 2
    line = error_line(capsys)
    assert "no intact checkpoint to score" in line and "aha eval tiny-random" in line


def test_plot_out_an_existing_file_and_plot_of_a_missing_folder(tmp_path, capsys):
    from rl.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    taken = tmp_path / "taken.png"
    taken.write_text("a file")
    assert main(["plot", str(run_dir), "--out", str(taken)]) == 2
    assert f"--out: {taken} is a file" in error_line(capsys)
    missing = tmp_path / "missing"
    assert main(["plot", str(missing)]) == 2
    assert "no metrics.jsonl" in error_line(capsys)
    assert not missing.exists()
