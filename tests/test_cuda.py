"""The GPU path, on a CUDA machine (skipped elsewhere; CI has no GPU): the transformers engine's
decode loop and cache room, the chunked and shared-prompt log-probs with their gradients, and a
tiny training run under bf16 autocast that logs MFU and peak memory.

    .venv/bin/pytest tests/test_cuda.py                        # on a GPU machine
    AHA_TEST_DEVICE=cpu .venv/bin/pytest tests/test_cuda.py    # the same checks on the CPU
"""

import json
import os

import pytest
import torch
from conftest import FIXTURES, ROOT
from safetensors.torch import load_file
from test_batch_chunked import check_against_plain, rollouts
from test_hf_engine import assert_sampler_logps_are_the_trainers, make_prompts

from rl.batch import collate
from rl.checkpoint import latest_checkpoint
from rl.config import load_config
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.run import train
from rollouts.base import SamplingSettings
from rollouts.hf_engine import TransformersEngine

DEVICE = torch.device(os.environ.get("AHA_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


@pytest.fixture(scope="module")
def tiny():
    folder = resolve_model("tiny-random")
    return load_policy(folder, "float32").to(DEVICE).eval(), load_tokenizer(folder)


def test_the_engine_samples_with_the_trainers_log_probs(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollouts = TransformersEngine(model, tokenizer).generate(
        make_prompts(tokenizer), 4, SamplingSettings(temperature=0.7, max_tokens=24)
    )
    assert len({tuple(r.completion_ids) for r in rollouts}) > 1  # it samples
    assert_sampler_logps_are_the_trainers(model, tokenizer, rollouts, 0.7, atol=1e-4)


def test_greedy_decoding_equals_generate(tiny):
    model, tokenizer = tiny
    prompt = make_prompts(tokenizer)[1]
    settings = SamplingSettings(temperature=0.0, max_tokens=16)
    ours = TransformersEngine(model, tokenizer).generate([prompt], 1, settings)[0]
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.tensor([prompt.ids], device=DEVICE),
            attention_mask=torch.ones(1, len(prompt.ids), dtype=torch.long, device=DEVICE),
            do_sample=False,
            max_new_tokens=16,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt.ids) :]
    assert ours.completion_ids == theirs.tolist()[: len(ours.completion_ids)]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk_tokens, share_prompts", [(0, True), (4, False), (4, True)])
def test_chunked_and_shared_prompt_log_probs_equal_the_plain_ones(
    lora, chunk_tokens, share_prompts
):
    pad = load_tokenizer(resolve_model("tiny-random")).pad_token_id
    batch = collate(rollouts([(3, 9), (6, 2), (4, 5)], group_size=3), pad)
    check_against_plain(batch, lora, chunk_tokens, share_prompts, DEVICE)


def test_tiny_training_under_bf16_autocast_logs_mfu_and_peak_memory(tmp_path):
    run_dir = tmp_path / "run"
    reward = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={run_dir}", reward, "train.bf16_autocast=true", "train.steps=2"],
    )
    train(config, progress=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["update_tokens"] > m["tokens"] > 0 and m["perf/update_throughput"] > 0
        assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
        if DEVICE.type == "cuda":
            assert m["perf/peak_memory_gib"] > 0
            if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
                assert 0 < m["perf/mfu"] < 1
    before = load_file(resolve_model("tiny-random") / "model.safetensors")
    after = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    assert all(not torch.equal(before[name], after[name]) for name in before)
