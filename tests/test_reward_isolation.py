"""A reward can neither poison the weights nor hang the trainer (issue 14, items 1 and 2).

Every case runs both ways a reward is called (rewards/isolation.py): user code from a file in
a worker process of its own, and a function of this process in a daemon thread per call.
"""

import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import FIXTURES, ROOT

from rewards import get_reward
from rewards.isolation import ProcessReward
from rl import scoring
from rl.scoring import RewardError, WeightedReward, score
from rollouts.record import Prompt, Rollout

PLUGIN = FIXTURES / "plugin_rewards.py"
COUNT = 4  # completions per batch


def batch(completions=("a1", "b22", "c333", "d")) -> list[Rollout]:
    prompt = Prompt(index=0, messages="What is 6 * 7?", ids=[1], row={"answer": "42"})
    return [Rollout(prompt, [1, 2], text, None, "stop", 0) for text in completions]


@pytest.fixture(autouse=True)
def report_again(monkeypatch):
    """Each failure is reported once per process: once per test here."""
    monkeypatch.setattr(scoring, "_reported", set())


@pytest.fixture
def make():
    """make(function, way, **options): a WeightedReward calling PLUGIN's function in a worker
    process ("process") or in this process ("thread"); workers are closed after the test."""
    workers: list[ProcessReward] = []

    def build(function, way, on_error="zero", timeout_s=60.0, **options):
        name = f"{PLUGIN}:{function}"
        fn = get_reward(name)
        if way == "process":
            fn = ProcessReward(name, fn)
            workers.append(fn)
        return WeightedReward(function, fn, 1.0, options, on_error, timeout_s)

    yield build
    for worker in workers:
        worker.close()


def healthy_math() -> WeightedReward:
    return WeightedReward("math", get_reward("math"), timeout_s=60.0)


WAYS = ["process", "thread"]

# value returned for the first completion -> the error's words ("" = not an error: its score)
BAD_VALUES = [
    (math.inf, "returned inf for completion 0 of 4"),
    (-math.inf, "returned -inf for completion 0 of 4"),
    ("1.5", "returned '1.5' (str, not a number) for completion 0 of 4"),
    ([1.0], "returned [1.0] (list, not a number) for completion 0 of 4"),
    ({"score": 1}, "returned {'score': 1} (dict, not a number) for completion 0 of 4"),
]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("value", "words"), BAD_VALUES)
def test_a_value_that_is_not_a_finite_number_scores_the_batch_zero(make, capsys, way, value, words):
    rollouts = batch()
    metrics, _ = score(rollouts, [make("first_is", way, value=value)])
    assert [r.rewards["first_is"] for r in rollouts] == [0.0] * COUNT
    assert [r.reward for r in rollouts] == [0.0] * COUNT
    assert metrics["reward/first_is/errors"] == COUNT
    err = capsys.readouterr().err
    assert f"warning: reward 'first_is': {words}, whose row is {{'prompt': 'What is 6 * 7?'" in err


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("value", "words"), BAD_VALUES)
def test_under_stop_a_bad_value_ends_the_run_naming_reward_and_row(make, way, value, words):
    with pytest.raises(RewardError) as caught:
        score(batch(), [make("first_is", way, on_error="stop", value=value)])
    message = str(caught.value)
    assert message.startswith(f"reward 'first_is' {words}, whose row is {{'prompt': 'What")
    assert "'completion': 'a1'" in message and "'answer': '42'" in message
    assert message.endswith("(algorithm.reward_error_policy=stop)") and "\n" not in message


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, None),  # NaN is "does not apply", as TRL's nansum reads it
        (None, None),
        (True, 1.0),
        (7, 7.0),
        (1e300, 1e300),  # large but finite is a score
    ],
)
def test_scores_that_are_numbers_or_none(make, way, value, expected):
    rollouts = batch()
    metrics, _ = score(rollouts, [make("first_is", way, value=value)])
    assert rollouts[0].rewards["first_is"] == expected
    assert rollouts[0].reward == (expected or 0.0)  # None counts 0 in the total
    assert metrics["reward/first_is/errors"] == 0


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("function", "options", "words"),
    [
        ("first_is", {"count": 1}, "returned 1 scores for 4 completions"),
        ("first_is", {"count": 5}, "returned 5 scores for 4 completions"),
        ("returns", {"value": "0.5"}, "returned str instead of a list of 4 scores"),
        ("returns", {"value": None}, "returned NoneType instead of a list of 4 scores"),
        ("broken", {}, "raised RuntimeError: this reward is broken on purpose"),
    ],
)
def test_a_wrong_count_or_an_exception_names_the_first_row(make, way, function, options, words):
    reward = make(function, way, on_error="stop", **options)
    with pytest.raises(RewardError) as caught:
        score(batch(), [reward])
    assert str(caught.value).startswith(
        f"reward '{function}' {words} on a batch whose first row is {{'prompt'"
    )


def test_weights_whose_sum_overflows_stop_in_either_policy(make):
    rewards = [make("first_is", "thread", value=1e308), make("first_is", "thread", value=1e308)]
    rewards[1].name = "again"
    with pytest.raises(RewardError, match="the weighted sum of the rewards .* overflows"):
        score(batch(), rewards)


@pytest.mark.parametrize("way", WAYS)
def test_a_hung_reward_is_let_go_and_a_healthy_one_keeps_scoring(make, way):
    """Twelve timed-out calls, more than the 8 threads of the old shared pool, which a hung
    reward filled so that every later call of the healthy math reward timed out as well."""
    if way == "process":
        hung = make("sleeps_forever", way, timeout_s=0.5)
    else:  # a function of this process: its thread cannot be killed, but is no pool slot
        release = threading.Event()

        def hangs(prompts, completions, **_):
            release.wait()
            return [0.0] * len(completions)

        hung = WeightedReward("sleeps_forever", hangs, timeout_s=0.5)
    user = make("digit_count", "process")
    pids = []
    for _ in range(12):
        rollouts = batch(["The answer is 42.", "41", "\\boxed{42}", "no idea"])
        metrics, _ = score(rollouts, [hung, healthy_math(), user])
        assert metrics["reward/sleeps_forever/errors"] == COUNT
        assert metrics["reward/math/errors"] == 0 and metrics["reward/digit_count/errors"] == 0
        assert [r.rewards["math"] for r in rollouts] == [1.0, 0.0, 1.0, 0.0]
        assert [r.rewards["digit_count"] for r in rollouts] == [2.0, 2.0, 2.0, 0.0]
        if way == "process":
            pids.append(hung.fn.pid)
    if way == "process":
        assert hung.fn.restarts == 12 and len(set(pids)) == 12  # a fresh worker each time
        for pid in pids[:-1]:  # killed and reaped: gone, not a zombie holding a slot
            assert not os.path.exists(f"/proc/{pid}")
    else:
        release.set()


def test_log_extra_and_log_metric_come_back_from_the_worker(make):
    rollouts = batch(["ab", "c", "def", "ghij"])
    metrics, log = score(rollouts, [make("logs", "process")])
    assert log.extra["lengths"] == [2, 1, 3, 4]  # numpy ints come back as plain ints
    assert log.answers["logs"] == ["a", "c", "d", "g"]  # the answers the reward graded
    assert metrics["fixture/mean_length"] == 2.5
    # Called directly, with TRL's signature, the hooks are replayed into the caller's.
    logged, measured = {}, {}
    reward = make("logs", "process").fn
    scores = reward(
        ["q"] * 2, ["ab", "c"], log_extra=logged.__setitem__, log_metric=measured.__setitem__
    )
    assert scores == [2.0, 1.0]
    assert logged == {"lengths": [2, 1], "extracted_answer": ["a", "c"]}
    assert measured == {"fixture/mean_length": 1.5}


@pytest.mark.parametrize("way", WAYS)
def test_an_async_reward_is_awaited(make, way):
    rollouts = batch(["ab", "c", "def", "ghij"])
    metrics, _ = score(rollouts, [make("async_length", way)])
    assert [r.rewards["async_length"] for r in rollouts] == [2.0, 1.0, 3.0, 4.0]


def test_a_hung_async_reward_of_this_process_is_cancelled():
    import asyncio

    cancelled = threading.Event()

    async def waits(prompts, completions, **_):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    reward = WeightedReward("waits", waits, timeout_s=0.2)
    metrics, _ = score(batch(), [reward])
    assert metrics["reward/waits/errors"] == COUNT
    assert cancelled.wait(60)  # its task on the shared loop was cancelled, not left waiting


def test_one_worker_serves_every_call_and_a_crashed_one_is_replaced(make, capsys):
    counting = make("counts_calls", "process")
    for expected in (1.0, 2.0, 3.0):  # imports paid once: the same process counts up
        rollouts = batch()
        score(rollouts, [counting])
        assert rollouts[0].rewards["counts_calls"] == expected
    crashing = make("exits", "process")
    for _ in range(2):
        metrics, _ = score(batch(), [crashing])
        assert metrics["reward/exits/errors"] == COUNT
    assert "reward 'exits': raised its worker process exited (exit code 3)" in (
        capsys.readouterr().err
    )
    assert crashing.fn.restarts == 2


def test_a_hung_thread_does_not_keep_the_interpreter_from_exiting():
    script = textwrap.dedent(
        """
        import threading
        from rl.scoring import WeightedReward, score
        from rollouts.record import Prompt, Rollout

        def hangs(prompts, completions, **_):
            threading.Event().wait()

        prompt = Prompt(0, "q", [1], {})
        rollouts = [Rollout(prompt, [1], "a", None, "stop", 0)]
        metrics, _ = score(rollouts, [WeightedReward("hangs", hangs, timeout_s=0.2)])
        print("errors", metrics["reward/hangs/errors"])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "errors 1.0"


def test_a_worker_ends_itself_when_the_trainer_is_killed(tmp_path):
    """kill -9 runs no exit handler: the worker notices its parent is gone and ends."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from rewards.isolation import ProcessReward
        reward = ProcessReward({str(PLUGIN) + ":sleeps_forever"!r})
        print(reward.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    worker = int(done.stdout.split()[0])
    # The watchdog looks twice a second; wait for the pid to go (the cap only bounds a failure).
    for _ in range(600):
        if not _alive(worker):
            break
        threading.Event().wait(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if text.encode() in handle.read() and _alive(int(entry)):
                    found.append(int(entry))
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.mark.parametrize("policy", ["zero", "stop"])
def test_aha_train_ends_although_a_reward_never_returns(tmp_path, policy):
    """The run used to finish ("Steps: 2") and never exit; under stop it printed the error
    and stayed alive. The held-out evaluation ran before and after with the 600 s it used to
    allow itself, longer than this test waits."""
    plugin = tmp_path / "hung_reward.py"  # its own path: its workers are found by it below
    plugin.write_text(PLUGIN.read_text())
    command = [
        sys.executable,
        "-m",
        "rl.cli",
        "train",
        "configs/tiny.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count'}}, "
        f"{{name: '{plugin}:sleeps_forever'}}]",
        "algorithm.reward_timeout_s=1",
        f"algorithm.reward_error_policy={policy}",
        "tracking.backends=[]",
        "--no-progress",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert not _processes_mentioning(str(plugin))  # no worker outlives the run
    errors = [line for line in done.stderr.splitlines() if line.startswith("aha: error:")]
    if policy == "zero":
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Steps: 2" in done.stdout and not errors
        assert f"warning: reward '{plugin}:sleeps_forever': took longer than" in done.stderr
    else:
        assert done.returncode != 0
        (line,) = errors
        assert line.startswith(
            f"aha: error: reward '{plugin}:sleeps_forever' took longer than "
            "algorithm.reward_timeout_s=1 on a batch whose first row is {'prompt': "
        )
        assert "Traceback" not in done.stderr


def test_ctrl_c_ends_a_run_whose_reward_hangs(tmp_path):
    """Ctrl-C in the middle of a hung call ends the run with the usual line, and takes the
    reward's worker with it."""
    import signal

    plugin = tmp_path / "hung_reward.py"
    plugin.write_text(PLUGIN.read_text())
    command = [
        sys.executable,
        "-m",
        "rl.cli",
        "train",
        "configs/tiny.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"rewards=[{{name: '{plugin}:sleeps_forever'}}]",
        "algorithm.reward_timeout_s=3600",
        "tracking.backends=[]",
        "--no-progress",
    ]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        for line in process.stdout:  # the held-out evaluation is the first reward call
            if line.startswith("Held-out evaluation before training"):
                break
        # Generation of 4 prompts and then the hung call: wait until the worker holds the
        # batch (its process reads the request; no timing is asserted, only the outcome).
        threading.Event().wait(5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "aha: error: interrupted" in err
    assert not _processes_mentioning(str(plugin))
