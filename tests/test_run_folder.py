"""The run folder under stops, damage and a second run (issue 14, items 3, 4, 6, 7, 8, 9, 11):
one run per folder, a resume that keeps the run's config, and checkpoints and logs that a kill
or a full disk leaves usable. End to end on the tiny model, from one finished 3-step run that
each test copies and then damages the way a kill, a disk or a user would."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, ROOT

import rl.trainer
from rl.checkpoint import RunFolderError, checkpoint_dirs, checkpoint_problem, latest_checkpoint
from rl.config import ConfigError, config_to_yaml, load_config
from rl.jsonl import read_jsonl
from rl.run import train
from rl.runfolder import open_run_folder
from rl.runlock import RunLock

TINY = ROOT / "configs" / "tiny.yaml"
REWARD = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step run (checkpoints step-2 and step-3, held-out evaluation before and
    after) and the number each step drew from numpy's global RNG just before it ran."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    draws = []
    with pytest.MonkeyPatch.context() as patch:
        _record_numpy_draws(patch, draws)
        train(load_config(TINY, [f"run_dir={run_dir}", REWARD, "train.steps=3"]), progress=False)
    return run_dir, draws


def _record_numpy_draws(patch, draws):
    real_step = rl.trainer.train_step

    def step(trainer, prompts, more_prompts=None):
        draws.append(int(np.random.randint(1 << 30)))
        return real_step(trainer, prompts, more_prompts)

    patch.setattr(rl.trainer, "train_step", step)


def copy_of(finished_run, tmp_path, stopped_after=None):
    """A copy of the finished run; ``stopped_after=2``: as a kill after step 3 was logged but
    before its checkpoint left it (summary.json not written yet)."""
    source, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    if stopped_after is not None:
        for checkpoint in checkpoint_dirs(run_dir):
            if int(checkpoint.name.split("-")[1]) > stopped_after:
                shutil.rmtree(checkpoint)
        (run_dir / "summary.json").unlink()
    return run_dir


def loss_steps(run_dir):
    return [
        m["step"] for m in read_jsonl(run_dir / "metrics.jsonl", torn_tail=False) if "loss" in m
    ]


def eval_steps(run_dir):
    return [
        m["step"]
        for m in read_jsonl(run_dir / "metrics.jsonl", torn_tail=False)
        if "eval/accuracy" in m
    ]


# ---------------------------------------------------------------- resume keeps the run's config


def test_resume_continues_to_the_runs_own_steps_past_a_torn_log_line(
    finished_run, tmp_path, capsys
):
    """tiny.yaml says steps: 2 and the run said 3: the config file given on the command line
    must not decide. A kill mid-write left half a line at the end of metrics.jsonl."""
    run_dir = copy_of(finished_run, tmp_path, stopped_after=2)
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 0.1, "rew')

    config = load_config(TINY, [f"resume={run_dir}"])
    summary = train(config, config_path=str(TINY), progress=False)

    assert summary.steps == 3
    assert loss_steps(run_dir) == [1, 2, 3]  # the whole file parses: the torn line is gone
    assert eval_steps(run_dir) == [0, 3]
    out, err = capsys.readouterr()
    assert "metrics.jsonl, line" in err and "dropped an incomplete last line" in err
    assert f"{TINY} is not read" in out


def test_a_resumed_run_draws_the_numpy_numbers_an_unstopped_run_draws(
    finished_run, tmp_path, monkeypatch
):
    """vLLM's GPU runner seeds each request from numpy's global RNG: its state must come back
    with the checkpoint, or a resumed run samples differently from one that never stopped."""
    _, unstopped = finished_run
    run_dir = copy_of(finished_run, tmp_path, stopped_after=2)
    np.random.seed(12345)  # whatever the process did before, the checkpoint's state must win
    resumed = []
    _record_numpy_draws(monkeypatch, resumed)
    train(load_config(None, [f"resume={run_dir}"]), progress=False)
    assert resumed == unstopped[2:]
    assert len(set(unstopped)) == 3  # (three different draws: a reseed would repeat the first)


def test_seed_everything_seeds_numpy():
    rl.trainer.seed_everything(7)
    first = np.random.random(4)
    rl.trainer.seed_everything(7)
    assert np.array_equal(np.random.random(4), first)
    assert np.array_equal(first, np.random.RandomState(7).random_sample(4))


def test_resuming_a_finished_run_logs_its_final_evaluation_once(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    logged = next(
        m
        for m in read_jsonl(run_dir / "metrics.jsonl")
        if m.get("step") == 3 and "eval/accuracy" in m
    )
    summary = train(load_config(None, [f"resume={run_dir}"]), progress=False)
    assert summary.steps == 3 and eval_steps(run_dir) == [0, 3]
    assert summary.eval_after["accuracy"] == logged["eval/accuracy"]
    # config.yaml is the run's definition, not how it was started: a copy starts a new run
    assert "resume: null" in (run_dir / "config.yaml").read_text()


def test_overrides_on_resume_are_applied_or_refused_by_key(finished_run):
    run_dir, _ = finished_run
    config = load_config(TINY, [f"resume={run_dir}", "train.steps=5", "data.eval_every=2"])
    assert (config.train.steps, config.data.eval_every) == (5, 2)
    assert config.resume == str(run_dir)
    saved = load_config(run_dir / "config.yaml", ["resume=null"])
    assert config.train.learning_rate == saved.train.learning_rate
    # restating the run's own value is no change
    load_config(None, [f"resume={run_dir}", f"train.learning_rate={saved.train.learning_rate}"])
    with pytest.raises(ConfigError, match=r"train\.learning_rate cannot change .* given 0\.5"):
        load_config(None, [f"resume={run_dir}", "train.learning_rate=0.5"])
    with pytest.raises(ConfigError, match="stays in its own folder"):
        load_config(None, [f"resume={run_dir}", "run_dir=/somewhere/else"])


def test_a_config_changed_behind_load_configs_back_is_refused_on_resume(finished_run, tmp_path):
    """The Python API: a Config whose resume was set by hand must not train with new values."""
    run_dir = copy_of(finished_run, tmp_path, stopped_after=2)
    config = load_config(None, [f"resume={run_dir}"])
    config.train.learning_rate = 0.5
    with pytest.raises(ConfigError, match="train.learning_rate"):
        train(config, progress=False)
    assert latest_checkpoint(run_dir).name == "step-2"


# ---------------------------------------------------------------- damaged checkpoints


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(
    finished_run, tmp_path, capsys
):
    run_dir = copy_of(finished_run, tmp_path)
    weights = run_dir / "checkpoints" / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    summary = train(load_config(None, [f"resume={run_dir}", "train.steps=4"]), progress=False)

    out = capsys.readouterr().out
    assert "step-3 is damaged (model.safetensors has" in out and "resuming from step-2" in out
    assert (run_dir / "checkpoints" / "step-3.corrupt").is_dir()
    assert summary.steps == 4 and loss_steps(run_dir) == [1, 2, 3, 4]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-3", "step-4"]
    assert all(checkpoint_problem(p) is None for p in checkpoint_dirs(run_dir))
    assert "steps: 4" in (run_dir / "config.yaml").read_text()  # the change is recorded


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])


def _without_manifest(checkpoint):
    (checkpoint / "manifest.json").unlink()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda c: None, None),
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has"),
        (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt is missing"),
        (lambda c: _truncate(c / "manifest.json"), "manifest.json is unreadable"),
        # checkpoints written before manifests: headers and zip directories tell
        (_without_manifest, None),
        (
            lambda c: (_without_manifest(c), _truncate(c / "model.safetensors")),
            "model.safetensors is cut short",
        ),
        (
            lambda c: (_without_manifest(c), _truncate(c / "trainer_state.pt")),
            "trainer_state.pt is cut short",
        ),
        (
            lambda c: (_without_manifest(c), (c / "state.json").unlink()),
            "state.json is missing",
        ),
    ],
    ids=[
        "intact",
        "cut-weights",
        "no-trainer-state",
        "cut-manifest",
        "old-intact",
        "old-cut-weights",
        "old-cut-trainer-state",
        "old-no-state",
    ],
)
def test_checkpoint_problem(finished_run, tmp_path, damage, problem):
    source, _ = finished_run
    checkpoint = tmp_path / "step-3"
    shutil.copytree(source / "checkpoints" / "step-3", checkpoint)
    damage(checkpoint)
    found = checkpoint_problem(checkpoint)
    assert found is None if problem is None else problem in found


def test_no_intact_checkpoint_is_one_line_and_changes_nothing(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    for checkpoint in checkpoint_dirs(run_dir):
        (checkpoint / "trainer_state.pt").unlink()
    with pytest.raises(RunFolderError, match="no checkpoint in .* is intact .*step-3: .*step-2:"):
        train(load_config(None, [f"resume={run_dir}"]), progress=False)
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2", "step-3"]


# ---------------------------------------------------------------- a kill during the first save


@pytest.mark.parametrize("how", ["fresh", "resume"])
def test_a_kill_during_the_first_checkpoint_leaves_no_run(finished_run, tmp_path, how, capsys):
    """What kill -9 in the first save leaves: config.yaml, logs of step 1, a partial
    .step-1.tmp and no checkpoint. It is not a run: a fresh start and a resume both start
    over, and step 1 is logged once."""
    run_dir = copy_of(finished_run, tmp_path)
    for checkpoint in checkpoint_dirs(run_dir):
        shutil.rmtree(checkpoint)
    partial = run_dir / "checkpoints" / ".step-1.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)

    if how == "fresh":
        config = load_config(TINY, [f"run_dir={run_dir}", REWARD, "train.steps=1"])
    else:
        config = load_config(None, [f"resume={run_dir}", "train.steps=1"])
    summary = train(config, progress=False)

    out = capsys.readouterr().out
    assert "Discarded" in out and ".step-1.tmp" in out
    assert "starting it over" in out or "starts over from step 0" in out
    assert summary.steps == 1 and loss_steps(run_dir) == [1]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-1"]
    assert not partial.exists()


# ---------------------------------------------------------------- one run per folder


def _hold_lock(run_dir):
    """Another process that holds the run folder's lock, as a live run does."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from rl.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_and_a_resume_of_a_live_run_are_refused(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path, stopped_after=2)
    holder = _hold_lock(run_dir)
    try:
        for overrides in ([f"resume={run_dir}"], [f"run_dir={run_dir}"]):
            config = load_config(None if "resume" in overrides[0] else TINY, overrides)
            with pytest.raises(RunFolderError, match=rf"is in use by pid {holder.pid} on "):
                train(config, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 drops the lock with the process: nothing stale is left in the way
    with RunLock(run_dir):
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    assert (run_dir / "run.lock").read_text() == ""  # emptied on release


def test_the_lock_is_taken_once_even_within_one_process(tmp_path):
    with RunLock(tmp_path), pytest.raises(Exception, match="in use by pid"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without locks (Lustre without -o flock): flock fails with ENOLCK."""

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("rl.runlock.fcntl.flock", flock)


def test_without_file_locks_a_live_holder_refuses_and_a_dead_one_is_stale(tmp_path, no_flock):
    import socket

    with RunLock(tmp_path), pytest.raises(Exception, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(ended.stdout)
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": 0}))
    with RunLock(tmp_path):  # a process of this host that has ended: stale, taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "since": 0}))
    with pytest.raises(Exception, match=f"delete {lock} once it has ended"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------- a disk that refuses writes


def test_a_full_disk_at_a_checkpoint_ends_the_run_in_one_line_and_it_resumes(
    tmp_path, monkeypatch, capsys
):
    import torch

    from rl.cli import main

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if ".step-2.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    code = main(
        ["train", str(TINY), f"run_dir={run_dir}", REWARD, "data.eval_size=0", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("aha: error:")]
    assert (
        f"could not write checkpoint {run_dir}/checkpoints/step-2: No space left on device" in line
    )
    assert "the previous checkpoint step-1 is intact" in line
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-1"]
    assert checkpoint_problem(run_dir / "checkpoints" / "step-1") is None
    assert not (run_dir / "checkpoints" / ".step-2.tmp").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert train(load_config(None, [f"resume={run_dir}"]), progress=False).steps == 2
    assert loss_steps(run_dir) == [1, 2]


def test_a_read_only_checkpoints_folder_fails_before_the_model_loads(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    real = type(run_dir).write_bytes

    def write_bytes(path, data):
        if path.parent.name == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(type(run_dir), "write_bytes", write_bytes)
    config = load_config(TINY, [f"run_dir={run_dir}"])
    with pytest.raises(RunFolderError, match=f"cannot write in {run_dir}/checkpoints: Permission"):
        open_run_folder(config, None)
    RunLock(run_dir).acquire().release()  # the refusal let go of the lock


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoints_folder_for_real(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints").chmod(0o555)
    with pytest.raises(RunFolderError, match="cannot write in"):
        open_run_folder(load_config(TINY, [f"run_dir={run_dir}"]), None)


def test_a_second_auto_named_run_in_the_same_second_gets_its_own_folder(tmp_path, monkeypatch):
    from datetime import datetime

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 1, 12, 0, 0)

    monkeypatch.setattr("rl.runfolder.datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    config = load_config(TINY)
    first, second = open_run_folder(config, "tiny.yaml"), open_run_folder(config, "tiny.yaml")
    first.lock.release()
    second.lock.release()
    assert [first.path.name, second.path.name] == ["tiny-20261201-120000", "tiny-20261201-120000-2"]


def test_a_config_yaml_from_before_the_machine_decided_fields_resumes(tmp_path):
    """Older config.yaml files say null where the machine now decides (rollout.dtype...): the
    value the machine picks on resume is no change the user asked for."""
    import yaml

    data = yaml.safe_load(config_to_yaml(load_config(TINY)))
    data["train"]["bf16_autocast"] = data["rollout"]["dtype"] = None
    data["rollout"]["enforce_eager"] = None
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_config(None, [f"resume={tmp_path}", "train.steps=4"]).train.steps == 4
