"""Held-out evaluation: pass@k by hand, majority vote, and `aha eval` on a tiny run."""

import json

import pytest
from conftest import ROOT

from rl.config import load_config
from rl.evaluate import majority_correct, pass_at_k, run_eval
from rl.run import train


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
    assert {"accuracy", "pass@3", "maj@3"} <= set(metrics)
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
    """data.eval_samples > 1 reports pass@1 with pass@k and maj@k beside it; a response prefix
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
    assert {"eval/pass@2", "eval/maj@2"} <= set(before)
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
