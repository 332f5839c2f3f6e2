"""`aha distill`: which traces are kept, the dataset on disk, the SFT data (only the reply is
trained, the prompt and response prefix masked on a batch the trainer's own collator makes),
and the command line's one-line errors. Whole runs: tests/test_distill_runs.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch  # noqa: F401  (before any test captures stderr: see run_aha)
from conftest import FIXTURES, ROOT

from rl.cli import main
from rl.config import DistillConfig, load_config
from rl.data import DataError
from rl.distill.traces import (
    Trace,
    read_dataset,
    select_traces,
    trace_row,
    write_dataset,
)

TINY = str(ROOT / "configs" / "tiny.yaml")
DIGITS = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"


def trace(sample, score=1.0, text=None, tokens=5, truncated=False, prompt=0):
    return Trace(prompt, sample, text or f"reply {prompt}-{sample}", score, tokens, truncated)


# ---------------------------------------------------------------- which traces are kept

NAN = math.nan
SELECTION_CASES = [
    # (settings, traces, kept (prompt, sample), dropped counts)
    (
        {},
        [trace(0, 1.0), trace(1, 0.0), trace(2, 1.5), trace(3, NAN), trace(4, 0.999)],
        [(0, 0), (0, 2)],
        {"below_min_reward": 3},
    ),
    (
        {"min_reward": 0.5},
        [trace(0, 0.5), trace(1, 0.49)],
        [(0, 0)],
        {"below_min_reward": 1},
    ),
    (  # duplicates: the same text up to whitespace; the first sampled stays
        {},
        [trace(0, text="a b"), trace(1, text=" a  b\n"), trace(2, text="a c")],
        [(0, 0), (0, 2)],
        {"duplicate": 1},
    ),
    (  # a failing trace does not claim its text: a later passing copy is kept
        {},
        [trace(0, 0.0, text="same"), trace(1, 1.0, text="same")],
        [(0, 1)],
        {"below_min_reward": 1},
    ),
    (
        {},
        [trace(0, truncated=True), trace(1)],
        [(0, 1)],
        {"truncated": 1},
    ),
    (
        {"keep_truncated": True},
        [trace(0, truncated=True), trace(1)],
        [(0, 0), (0, 1)],
        {},
    ),
    (
        {"min_tokens": 1, "max_tokens": 10},
        [trace(0, tokens=0), trace(1, tokens=1), trace(2, tokens=10), trace(3, tokens=11)],
        [(0, 1), (0, 2)],
        {"too_short": 1, "too_long": 1},
    ),
    (  # max_tokens 0: no limit
        {"max_tokens": 0},
        [trace(0, tokens=100_000)],
        [(0, 0)],
        {},
    ),
    (  # shortest: fewest tokens, the first sampled on a tie
        {"keep": "shortest"},
        [trace(0, tokens=7), trace(1, tokens=3), trace(2, tokens=3), trace(3, tokens=9)],
        [(0, 1)],
        {"not_chosen": 3},
    ),
    (  # shortest among the passing, deduplicated ones: sample 2 is a copy of 1, sample 0 fails
        {"keep": "shortest"},
        [
            trace(0, 0.0, tokens=1),
            trace(1, text="x", tokens=5),
            trace(2, text="x", tokens=4),
            trace(3, text="y", tokens=6),
        ],
        [(0, 1)],
        {"below_min_reward": 1, "duplicate": 1, "not_chosen": 1},
    ),
    (
        {"keep": "first"},
        [trace(0, 0.0), trace(1), trace(2)],
        [(0, 1)],
        {"below_min_reward": 1, "not_chosen": 1},
    ),
    (  # prompts are independent; one with no passing trace adds nothing; order is restored
        {"keep": "first"},
        [
            trace(1, prompt=2),
            trace(0, 0.0, prompt=1),
            trace(0, prompt=2),
            trace(0, prompt=0),
            trace(1, 0.0, prompt=1),
        ],
        [(0, 0), (2, 0)],
        {"below_min_reward": 2, "not_chosen": 1},
    ),
]


@pytest.mark.parametrize(("settings", "traces", "kept", "dropped"), SELECTION_CASES)
def test_select_keeps_exactly_the_passing_traces(settings, traces, kept, dropped):
    chosen, counts = select_traces(traces, DistillConfig(**settings))
    assert [(t.prompt, t.sample) for t in chosen] == kept
    assert {k: v for k, v in counts.items() if v} == dropped
    assert len(chosen) + sum(counts.values()) == len(traces)  # every trace accounted for


def test_the_compared_reward_is_the_first_or_the_total():
    from rl.distill.generate import trace_score
    from rollouts.record import Prompt, Rollout

    rollout = Rollout(Prompt(0, "q", [1], {}), [2], "a", None, "stop", 0)
    rollout.rewards, rollout.reward = {"math": 1.0, "format": 0.0}, 1.2
    assert trace_score(rollout, "math", "first") == 1.0
    assert trace_score(rollout, "math", "total") == 1.2
    rollout.rewards["math"] = None  # "does not apply": never passes
    assert math.isnan(trace_score(rollout, "math", "first"))


# ---------------------------------------------------------------- the dataset on disk


def sample_rows():
    system = {"role": "system", "content": "Think first."}
    return [
        trace_row(
            [system, {"role": "user", "content": "1+1?"}],
            "<think> one and one </think> <answer> 2 </answer>",
            1.2,
            {"math": 1.0, "format": 1.0},
            0,
            14,
            2,
        ),
        trace_row(
            [system, {"role": "user", "content": "2+5?"}],
            "<think> ünïcode \n lines </think> <answer> 7 </answer>",
            1.0,
            {"math": 1.0, "format": NAN},  # NaN is stored as null
            3,
            9,
            None,
        ),
    ]


def test_the_dataset_round_trips_through_datasets(tmp_path):
    import datasets

    out = tmp_path / "traces"
    rows = sample_rows()
    write_dataset(rows, {"kept": 2}, out)
    expected = [dict(row, rewards=dict(row["rewards"])) for row in rows]
    expected[1]["rewards"]["format"] = None
    assert expected[0]["answer"] == "2" and expected[1]["answer"] is None
    from_disk = datasets.load_from_disk(str(out))
    from_json = datasets.load_dataset("json", data_files=str(out / "traces.jsonl"), split="train")
    assert from_disk.to_list() == expected
    assert from_json.to_list() == expected
    assert read_dataset(out).to_list() == expected
    assert read_dataset(out / "traces.jsonl").to_list() == expected
    assert json.loads((out / "summary.json").read_text()) == {"kept": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["traces"]  # no work folder left behind


def test_a_dataset_is_never_overwritten_and_bad_data_is_one_line(tmp_path):
    from rl.config import ConfigError

    out = tmp_path / "traces"
    write_dataset(sample_rows(), {}, out)
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        write_dataset(sample_rows(), {}, out)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1?"}\n')
    with pytest.raises(DataError, match="no 'messages' column"):
        read_dataset(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match="is not a dataset folder"):
        read_dataset(tmp_path / "nothing-here")


# ---------------------------------------------------------------- the SFT rows


def test_sft_rows_are_the_rl_prompt_tokens_then_the_reply_and_its_end(tiny_tokenizer):
    """The prompt part is what RL samples after (rl.data.load_prompts' ids, response prefix
    included); the rest is the reply after the prefix, tokenized alone, and the EOS token."""
    from rl.data import load_prompts
    from rl.distill.sft import tokenize_traces

    config = load_config(TINY, ["data.response_prefix=<think>"])
    (prompt,) = load_prompts("arithmetic", "train", tiny_tokenizer, config.data, [], 0, 1)
    reply = "<think> 3 and 4 </think> <answer> 7 </answer>"
    row = trace_row(prompt.messages, reply, 1.0, {}, 0, 0)
    (tokens,) = tokenize_traces([row], tiny_tokenizer, config.data, "test")
    completion = tiny_tokenizer.encode(
        " 3 and 4 </think> <answer> 7 </answer>", add_special_tokens=False
    )
    assert tokens["input_ids"] == [*prompt.ids, *completion, tiny_tokenizer.eos_token_id]
    assert tokens["completion_mask"] == [0] * len(prompt.ids) + [1] * (len(completion) + 1)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "1+1?"}], "must be a conversation that ends"),
        (
            [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
            "does not start with data.response_prefix='<think>'",
        ),
        ([{"role": "assistant", "content": "<think>"}], "must be a conversation that ends"),
    ],
)
def test_bad_sft_rows_name_the_row(tiny_tokenizer, messages, message):
    from rl.distill.sft import tokenize_traces

    config = load_config(TINY, ["data.response_prefix=<think>"])
    good = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think> 4"}]
    with pytest.raises(DataError, match=f"test: row 1: .*{message}"):
        tokenize_traces(
            [{"messages": good}, {"messages": messages}], tiny_tokenizer, config.data, "test"
        )


@pytest.mark.slow
def test_sft_trains_only_the_reply_on_a_collated_batch(tmp_path, tiny_tokenizer):
    """TRL's own collator on TRL's own prepared dataset: every prompt and response-prefix token,
    and the padding, has label -100; the reply and its end token keep their ids."""
    from rl.distill.sft import build_trainer

    data = tmp_path / "traces"
    rows = sample_rows()
    write_dataset(rows, {}, data)
    config = load_config(TINY, ["data.response_prefix=<think>"])
    trainer = build_trainer(config, data, tmp_path / "run")
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(examples)
    prefix = tiny_tokenizer.encode("<think>", add_special_tokens=False)
    for i, row in enumerate(rows):
        prompt = tiny_tokenizer.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) + prefix
        length = int(batch["attention_mask"][i].sum())
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == -100).all()  # the prompt, prefix included
        assert (labels[len(prompt) : length] == ids[len(prompt) : length]).all()
        assert (labels[length:] == -100).all()  # padding
        reply = row["messages"][-1]["content"].removeprefix("<think>")
        assert tiny_tokenizer.decode(labels[len(prompt) : length]) == reply + "<|im_end|>"


# ---------------------------------------------------------------- the command line


def run_aha(capsys, *args) -> tuple[int, str]:
    """`aha ARGS` in this process: its exit code and stderr. (torch is imported with the module:
    imported first under capsys, its log handlers would keep the capture's closed stream and
    print "Logging error" tracebacks into later tests' stderr.)"""
    code = main([*args, "--no-progress"])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_no_trace_kept_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "traces"
    code, err = run_aha(
        capsys,
        "distill",
        "generate",
        TINY,
        "teacher=tiny-random",
        f"out={out}",
        "samples=2",
        DIGITS,
        "distill.max_prompts=2",
        "distill.min_reward=1000",
    )
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("aha: error: no trace kept: 0 of 4 teacher traces (2 prompts x 2)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", TINY, "out=/tmp/x"], "needs teacher="),
        (["generate", TINY], "needs teacher= and out="),
        (
            ["generate", TINY, "teacher=tiny-random", "out=/tmp/x", "distill.keep=best"],
            "distill.keep",
        ),
        (["generate", TINY, "teacher=tiny-random", "out=/tmp/x", "samples=0"], "distill.samples"),
        (["generate", "teacher=tiny-random", "out=/tmp/x"], "a CONFIG file comes first"),
        (["sft", TINY, "out=/tmp/x"], "data: name the traces"),
        (["sft", TINY, "data=/tmp/x"], "out: name the run folder"),
    ],
)
def test_missing_or_bad_arguments_are_one_line(capsys, args, message):
    code, err = run_aha(capsys, "distill", *args)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_generate_refuses_to_run_in_several_processes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch / torchrun set it
    code, err = run_aha(
        capsys, "distill", "generate", TINY, "teacher=tiny-random", f"out={tmp_path / 'x'}"
    )
    assert code == 2 and err.count("\n") == 1 and "runs in one process" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_help_and_the_generate_side_do_not_import_trl():
    bare = subprocess.run(
        [sys.executable, "-m", "rl.cli", "distill"], cwd=ROOT, capture_output=True, text=True
    )
    assert bare.returncode == 0 and "usage: aha distill" in bare.stdout, bare.stderr
    for command in (["distill"], ["distill", "generate"], ["distill", "sft"]):
        done = subprocess.run(
            [sys.executable, "-m", "rl.cli", *command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and "usage: aha distill" in done.stdout
    code = "import sys, rl.distill.generate, rl.distill.teacher; print('trl' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
