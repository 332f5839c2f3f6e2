"""`aha distill` end to end on tiny models: generate, sft, then `aha train` and `aha eval` on
the student (full weights and LoRA); a teacher on a vLLM server (a stand-in HTTP server); SFT
under `accelerate launch` with 1 and 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from stand_ins import JsonServer, free_port
from test_distill import DIGITS, TINY, run_aha, sample_rows

from rl.config import load_config
from rl.distill.traces import read_dataset, write_dataset


@pytest.mark.slow
def test_generate_then_sft_then_rl_and_eval_on_the_student(tmp_path, capsys):
    from rl.evaluate import run_eval
    from rl.models import resolve_model
    from rl.run import train

    traces = tmp_path / "traces"
    code, err = run_aha(
        capsys,
        "distill",
        "generate",
        TINY,
        "teacher=tiny-random",
        f"out={traces}",
        "samples=3",
        DIGITS,
        "distill.max_prompts=4",
        "distill.keep_truncated=true",  # the random model seldom ends a 16-token reply
    )
    assert code == 0, err
    summary = json.loads((traces / "summary.json").read_text())
    assert summary["prompts"] == 4 and summary["traces"] == 12
    rows = read_dataset(traces).to_list()
    assert len(rows) == summary["kept"] > 0
    assert sum(int(n) * c for n, c in summary["kept_per_prompt"].items()) == len(rows)
    assert all(
        r["reward"] >= 1.0 and [m["role"] for m in r["messages"]][-1] == "assistant" for r in rows
    )
    assert summary["tokens_kept"] == sum(r["completion_tokens"] for r in rows)

    run = tmp_path / "sft"
    sft = [
        "distill",
        "sft",
        TINY,
        f"data={traces}",
        "train.micro_batch_size=2",
        "distill.batch_size=4",
    ]
    code, err = run_aha(capsys, *sft, "student=tiny-random", f"out={run}", "train.steps=2")
    assert code == 0, err
    assert load_config(run / "config.yaml").model.name == "tiny-random"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    checkpoint = run / "checkpoints" / "step-2"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state == {"step": 2, "stage": "sft", "data": str(traces)}
    before = load_file(resolve_model("tiny-random") / "model.safetensors")
    after = load_file(checkpoint / "model.safetensors")
    assert all(not torch.equal(before[name], after[name]) for name in before)

    # RL from the student (R1's cold start), and the student's evaluation
    config = load_config(TINY, [f"run_dir={tmp_path / 'rl'}", f"model.name={checkpoint}", DIGITS])
    assert train(config, progress=False).steps == 2
    results = run_eval(str(run), ["arithmetic"], limit=2, progress=False)
    assert 0.0 <= results["arithmetic"]["accuracy"] <= 1.0
    assert (run / "eval" / "step-2" / "summary-arithmetic.json").is_file()

    # a whole checkpoint by rl/checkpoint.py's measure (its manifest), as aha eval required
    from rl.checkpoint import checkpoint_problem

    assert checkpoint_problem(checkpoint) is None and (checkpoint / "manifest.json").is_file()

    # resume continues the SFT run (TRL's optimizer state); each command refuses the other's run
    code, err = run_aha(capsys, "distill", "sft", f"resume={run}", "train.steps=3")
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    optimizer = torch.load(run / "checkpoints" / "step-3" / "optimizer.pt", weights_only=False)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {3.0}
    code, err = run_aha(capsys, "train", f"resume={run}")
    assert code == 2 and err.count("\n") == 1 and "aha distill sft" in err
    code, err = run_aha(capsys, "distill", "sft", f"resume={tmp_path / 'rl'}", f"data={traces}")
    assert code == 2 and err.count("\n") == 1 and "written by `aha train`" in err
    assert (tmp_path / "rl" / "checkpoints" / "step-2").is_dir()  # refused, and left as it was


@pytest.mark.slow
def test_a_lora_student_loads_in_eval_and_starts_rl(tmp_path, capsys, monkeypatch):
    """With model.lora the checkpoint is the adapter; `aha eval` loads it onto the base, and
    model.name=checkpoint merges it into the base (once) for RL."""
    from rl.evaluate import run_eval
    from rl.models import resolve_model
    from rl.run import train

    monkeypatch.setenv("AHA_CACHE", str(tmp_path / "cache"))  # the merged model is built here
    data = tmp_path / "traces"
    write_dataset(sample_rows(), {}, data)
    run = tmp_path / "sft"
    code, err = run_aha(
        capsys,
        "distill",
        "sft",
        TINY,
        f"data={data}",
        f"out={run}",
        "model.lora.enabled=true",
        "train.steps=2",
        "train.micro_batch_size=2",
        "distill.batch_size=2",
    )
    assert code == 0, err
    checkpoint = run / "checkpoints" / "step-2"
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items())
    from peft import get_peft_model_state_dict

    from rl.setup import load_frozen_policy, load_run

    model, _, _ = load_frozen_policy(*load_run(run))  # what `aha eval RUN_DIR` scores
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(adapter)
    assert all(torch.equal(loaded[name], adapter[name]) for name in adapter)
    assert run_eval(str(run), ["arithmetic"], limit=1, progress=False)["arithmetic"] is not None

    merged = resolve_model(str(checkpoint))
    base = load_file(resolve_model("tiny-random") / "model.safetensors")
    weights = load_file(merged / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], weights[name])}
    assert changed and all("proj" in name for name in changed)  # LoRA's target modules only
    config = load_config(TINY, [f"run_dir={tmp_path / 'rl'}", f"model.name={checkpoint}", DIGITS])
    assert train(config, progress=False).steps == 2


def FakeVLLMServer(tokenizer) -> JsonServer:
    """The three endpoints ServerEngine calls (/health, /v1/models, /v1/completions), answering
    each prompt's j-th sample with "<answer> 7...7 </answer>" (j+1 sevens, the first two
    alike) and the end-of-sequence token: a teacher too big for this machine, in miniature."""
    replies = [" <answer> 7 </answer>", " <answer>  7 </answer>", " <answer> 77 </answer>"]
    ids = [
        tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in replies
    ]

    def route(method, path, payload):
        if method == "GET":
            return {"data": [{"id": "tiny-random"}]} if path == "/v1/models" else None
        n = payload["n"]
        choices = [
            {
                "index": i * n + j,
                "token_ids": ids[j % 3],
                "finish_reason": "stop",
                "logprobs": {"token_logprobs": [-0.5] * len(ids[j % 3])},
            }
            for i in range(len(payload["prompt"]))
            for j in range(n)
        ]
        return {"choices": choices}

    return JsonServer(route)


def test_a_teacher_on_a_server_is_sampled_frozen_with_no_model_loaded(tmp_path, tiny_tokenizer):
    from rl.data import load_prompts
    from rl.distill.generate import generate
    from rl.distill.teacher import load_teacher

    server = FakeVLLMServer(tiny_tokenizer)
    try:
        config = load_config(TINY, [DIGITS, "distill.max_prompts=2", "distill.samples=3"])
        teacher = load_teacher(config, server.url)
        assert teacher.on_server and teacher.model is None
        assert (teacher.config.rollout.server_url, teacher.config.rollout.server_mode) == (
            server.url,
            "frozen",
        )
        summary = generate(config, server.url, tmp_path / "traces", progress=False)
    finally:
        server.close()
    prompts = load_prompts("arithmetic", "train", tiny_tokenizer, config.data, [], 0, 2)
    assert server.requests[0]["prompt"] == [p.ids for p in prompts]  # the RL prompt tokens
    assert summary["traces"] == 6 and summary["passed"] == 6
    assert summary["kept"] == 4 and summary["dropped"] == {"duplicate": 2}
    rows = read_dataset(tmp_path / "traces").to_list()
    assert [r["messages"][-1]["content"] for r in rows] == [
        " <answer> 7 </answer>",
        " <answer> 77 </answer>",
    ] * 2
    assert [r["rewards"] for r in rows] == [{DIGITS.split("'")[1]: v} for v in (1.0, 2.0, 1.0, 2.0)]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
    reason="accelerate's launcher is not installed",
)
def test_accelerate_launch_one_and_two_processes_make_the_same_first_step(tmp_path):
    """SFTTrainer under `accelerate launch`: 1 process, and 2 data-parallel CPU processes
    (gloo; --multi_gpu as for `aha train`) with the same 4-sequence batch. Rank 0 alone writes."""
    data = tmp_path / "traces"
    write_dataset(sample_rows() * 2, {}, data)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first_losses = []
    for processes in (1, 2):
        run = tmp_path / f"run-{processes}"
        command = [launcher, "launch", "--num_processes", str(processes), "--num_machines", "1"]
        command += ["--multi_gpu"] if processes > 1 else []
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(free_port()), "-m", "rl.cli", "distill", "sft"]
        command += [TINY, f"data={data}", f"out={run}", "train.steps=2"]
        command += ["train.micro_batch_size=1", "distill.batch_size=4", "--no-progress"]
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert done.stdout.count("Run folder:") == 1
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        rng = sorted(p.name for p in (run / "checkpoints" / "step-2").glob("rng_state*.pth"))
        assert len(rng) == processes  # TRL's per-rank RNG state, for resume=
        first_losses.append(metrics[0]["loss"])
    # Each row's forward is the same (micro-batches of 1, no padding); only the order of the
    # sum over the batch's ~60 reply tokens differs: float32, at most 60 * 2^-24 ~ 4e-6 relative.
    assert first_losses[1] == pytest.approx(first_losses[0], rel=1e-5)
