"""Held-out evaluation: pass@k by hand, majority vote, and `aha eval` on a tiny run."""

import json

import pytest
from conftest import ROOT

from rewards import get_reward
from rl.config import load_config
from rl.evaluate import evaluate, majority_correct, pass_at_k, run_eval
from rl.run import train
from rl.scoring import WeightedReward
from rollouts.record import Prompt, Rollout


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 0, 1, 0.0),
        (4, 4, 1, 1.0),
        (4, 1, 1, 0.25),  # pass@1 is the mean correctness
        (4, 1, 4, 1.0),  # one right among all four drawn
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    ],
)
def test_pass_at_k_matches_the_hand_computed_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answers", "correct", "expected"),
    [
        (["5", "5", "6", "7"], [True, True, False, False], True),
        (["6", "5", "6", None], [False, True, False, False], False),
        ([None, None], [False, False], False),
        (["3", None, None], [True, False, False], True),  # a silent majority does not vote
    ],
)
def test_majority_vote(answers, correct, expected):
    assert majority_correct(answers, correct) is expected


def test_aha_eval_on_a_run_folder_writes_samples_and_summary(tiny_overrides, tmp_path):
    config = load_config(
        ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "train.steps=1", "data.eval_size=0"]
    )
    summary = train(config, progress=False)
    results = run_eval(str(summary.run_dir), ["arithmetic"], n=3, limit=4, progress=False)
    metrics = results["arithmetic"]
    assert {"accuracy", "pass@3"} <= set(metrics)
    # digit_count reports no extracted answers: no majority vote that agrees with the grader
    assert "maj@3" not in metrics
    out = summary.run_dir / "eval" / "step-1"
    samples = [
        json.loads(line) for line in (out / "samples-arithmetic.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 12 and "rewards" in samples[0]
    saved = json.loads((out / "summary-arithmetic.json").read_text())
    assert saved["n"] == 3 and saved["prompts"] == 4


def test_training_evaluates_every_n_steps(tiny_overrides, tmp_path):
    config = load_config(
        ROOT / "configs" / "tiny.yaml", [*tiny_overrides, "train.steps=2", "data.eval_every=1"]
    )
    summary = train(config, progress=False)
    lines = (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    eval_steps = [json.loads(line)["step"] for line in lines if "eval/accuracy" in line]
    assert eval_steps == [0, 1, 2]  # before, every step, after (the last step once)


def test_sampled_eval_and_a_response_prefix_the_rewards_see(tiny_overrides, tmp_path):
    """data.eval_samples > 1 reports pass@1 with pass@k beside it; a response prefix
    ends every prompt's tokens and starts every completion the rewards (and logs) see."""
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *tiny_overrides,
            "train.steps=1",
            "data.eval_size=3",
            "data.eval_samples=2",
            "data.response_prefix=<think>",
        ],
    )
    summary = train(config, progress=False)
    lines = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    before = next(line for line in lines if line["step"] == 0 and "eval/accuracy" in line)
    assert "eval/pass@2" in before and "eval/maj@2" not in before  # digit_count: no answers
    samples = [json.loads(x) for x in (summary.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["completion"].startswith("<think>") for s in samples)


def test_a_response_prefix_ends_the_prompt_tokens():
    from rl.data import render_prompts
    from rl.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("tiny-random"))
    rows = [{"prompt": "1+1?", "answer": "2"}]
    plain, prefixed = (
        render_prompts(rows, tokenizer, "prompt", "answer", None, 512, "test", prefix)[0]
        for prefix in ("", "<think>")
    )
    prefix_ids = tokenizer.encode("<think>", add_special_tokens=False)
    assert prefixed.ids == plain.ids + prefix_ids
    assert prefixed.response_prefix == "<think>" and plain.response_prefix == ""


class Scripted:
    """A rollout engine that answers each prompt (by its gold answer) with given completions."""

    policy_version = 0

    def __init__(self, completions: dict[str, list[str]]) -> None:
        self.completions = completions

    def generate(self, prompts, n, sampling):
        return [
            Rollout(p, [1], text, None, "stop", 0)
            for p in prompts
            for text in self.completions[p.row["answer"]][:n]
        ]


def _prompts(answers):
    return [Prompt(i, f"question {i}", [1], {"answer": a}) for i, a in enumerate(answers)]


# Completions per gold answer -> correct per group, and whether its majority answer is right.
# The trained model writes "25 + 30 = 55 apples": only the `last_number` extraction the math
# reward is configured with reads 55, and the vote must read the same (maj@4 was 0.0 beside
# pass@1 0.496 when it used the default extraction).
GROUPS = {
    "55": (["25 + 30 = 55 apples"] * 3 + ["I think 54"], 3, True),
    "12": (["12", "13 cards", "so 13", "no idea"], 1, False),  # majority 13 is wrong
    "7": (["7", "seven", "?", "hmm"], 1, True),  # the only stated answer is the majority
    "9": (["8", "9", "9.0", "nothing"], 2, True),  # 9 and 9.0 vote together, against 8
    "3": (["1 + 1 = 2", "2", "4", "none"], 0, False),
}


@pytest.mark.parametrize("batch_size", [4, 64])  # one prompt per reward call; all in one
@pytest.mark.parametrize(
    "golds",
    [["55", "12", "7", "9", "3"], ["12", "3"], ["55"], ["3"]],
    ids=["all", "no-right-majority", "one", "nothing-right"],
)
def test_eval_metrics_agree_with_the_grader(golds, batch_size):
    n = 4
    engine = Scripted({gold: GROUPS[gold][0] for gold in golds})
    math_reward = WeightedReward("math", get_reward("math"), options={"order": ["last_number"]})
    metrics = evaluate(engine, _prompts(golds), [math_reward], None, n=n, batch_size=batch_size)
    metrics = metrics.metrics
    correct = [GROUPS[gold][1] for gold in golds]
    right_majorities = [GROUPS[gold][2] for gold in golds]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / (n * len(golds)))
    assert metrics[f"pass@{n}"] == pytest.approx(sum(c > 0 for c in correct) / len(golds))
    assert metrics[f"maj@{n}"] == pytest.approx(sum(right_majorities) / len(golds))
    # Consistent in any evaluation: maj@k is 0 only if no group's majority is right, and
    # neither pass@1 nor maj@k exceeds pass@k.
    assert (metrics[f"maj@{n}"] == 0) == (not any(right_majorities))
    assert metrics["accuracy"] <= metrics[f"pass@{n}"] >= metrics[f"maj@{n}"]
    assert metrics["reward/math/errors"] == 0


def test_without_the_graders_answers_there_is_no_majority_vote():
    """A reward that reports no extracted answers gets no maj@k (not a number from another
    extraction); one that does (log_extra(ANSWER_COLUMN, ...)) gets its own answers counted."""
    plugins = ROOT / "tests" / "fixtures" / "plugin_rewards.py"
    engine = Scripted({"x": ["aa", "ab", "ba", "bb"]})
    silent = WeightedReward("digits", get_reward(f"{plugins}:digit_count"))
    metrics = evaluate(engine, _prompts(["x"]), [silent], None, n=4).metrics
    assert "maj@4" not in metrics and metrics["pass@4"] == 0.0
    # `logs` scores the length (2: correct for all) and answers with the first letter
    telling = WeightedReward("logs", get_reward(f"{plugins}:logs"))
    metrics = evaluate(engine, _prompts(["x"]), [telling], None, n=4).metrics
    assert metrics["maj@4"] == 1.0 and metrics["fixture/mean_length"] == 2.0


def test_the_evaluation_uses_the_rewards_timeout():
    """The held-out evaluation used to wait 600 s whatever algorithm.reward_timeout_s said."""
    import threading

    release = threading.Event()

    def hangs(prompts, completions, **_):
        release.wait()

    engine = Scripted({"55": GROUPS["55"][0]})
    hung = WeightedReward("hangs", hangs, timeout_s=0.2)
    metrics = evaluate(engine, _prompts(["55", "55"]), [hung], None, n=4, batch_size=4).metrics
    release.set()
    assert metrics["reward/hangs/errors"] == 8  # two calls of 4, each timed out
    assert metrics["accuracy"] == 0.0 and "maj@4" not in metrics
