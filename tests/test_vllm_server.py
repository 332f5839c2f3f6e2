"""Server mode on this machine: a CPU ``vllm serve`` on 127.0.0.1 with the tiny model.

What runs here: a generation round trip, and a weight update round trip through
``server_mode=reload`` (safetensors in a shared folder + the dev-mode ``/collective_rpc``
``reload_weights``). TRL's NCCL broadcast (``server_mode=nccl``) needs CUDA and is not tested.
The server starts in 40-90 s on 2 cores (multi-process, eager), hence ``slow``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from numerics import LOGP_TOLERANCE
from stand_ins import free_port

from rl.batch import collate, completion_logps
from rl.models import load_policy
from rollouts.base import SamplingSettings
from rollouts.record import Prompt

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# fp32 on both sides, vLLM's kernels against the trainer's: LOGP_TOLERANCE (tests/numerics.py)


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    """``vllm serve`` as ``trl vllm-serve`` starts it, minus the NCCL weight-transfer engine."""
    from rollouts.server import wait_for_server

    port = free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("LD_PRELOAD", None)
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    command = [
        sys.executable,
        "-m",  # `vllm serve` (and so `trl vllm-serve`) dies on vllm-cpu: no "vllm" dist metadata
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--logprobs-mode",
        "processed_logprobs",
        "--generation-config",
        "vllm",
    ]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout_s=240, alive=lambda: process.poll() is None)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[Prompt]:
    out = []
    for index, question in enumerate(["What is 7 + 5?", "Ana has 3 apples."]):
        ids = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append(Prompt(index, question, list(ids), {}))
    return out


def gap_to_trainer(model, rollouts, pad_id: int) -> float:
    """Largest |trainer - server| log-prob of greedy samples (greedy: temperature 1 scores)."""
    batch = collate(rollouts, pad_id)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, 1.0)
    mask = batch.completion_mask.bool()
    return float((logps - batch.sampler_logps).abs()[mask].max())


def test_generation_round_trip(server, tiny_tokenizer, prompts):
    from rollouts.server import ServerEngine

    engine = ServerEngine(server, tiny_tokenizer, mode="frozen")
    rollouts = engine.generate(prompts, 3, SamplingSettings(temperature=1.0, max_tokens=16))
    assert [r.group for r in rollouts] == [0, 0, 0, 1, 1, 1]
    for rollout in rollouts:
        assert 1 <= len(rollout.completion_ids) <= 16
        assert len(rollout.sampler_logps) == len(rollout.completion_ids)
        assert rollout.completion == tiny_tokenizer.decode(
            rollout.completion_ids, skip_special_tokens=True
        )
        if rollout.finish_reason == "stop":
            assert rollout.completion_ids[-1] == tiny_tokenizer.eos_token_id


def test_a_teacher_on_the_server_scores_as_the_trainer_does(server, tiny_tokenizer, tiny_folder):
    """On-policy distillation's server teacher (before any test changes the server's weights):
    its /tokenize renders the chat prompts as the student's ids, and vLLM's prompt log-probs of
    prompt + completion, cut at each completion, are the trainer's at temperature 1."""
    from rl.distill.on_policy import ServerTeacher
    from rollouts.server import ServerEngine, served_model, tokenize_on_server

    prompts = []
    for index, question in enumerate(["What is 7 + 5?", "Ana has 3 apples and gets 4."]):
        messages = [{"role": "user", "content": question}]
        ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        prompts.append(Prompt(index, messages, list(ids), {}))
    assert tokenize_on_server(server, prompts, tiny_tokenizer) == [p.ids for p in prompts]
    engine = ServerEngine(server, tiny_tokenizer, mode="frozen")
    rollouts = engine.generate(prompts, 2, SamplingSettings(temperature=1.0, max_tokens=12))
    batch = collate(rollouts, tiny_tokenizer.pad_token_id)
    served = ServerTeacher(server, served_model(server)).logps(None, batch)
    model = load_policy(tiny_folder, "float32").eval()
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, 1.0)
    mask = batch.completion_mask.bool()
    assert float((served - logps).abs()[mask].max()) < LOGP_TOLERANCE
    assert served[~mask].abs().sum() == 0


def test_weight_update_round_trip_by_reload(server, tiny_tokenizer, prompts, tiny_folder, tmp_path):
    from rollouts.server import ServerEngine

    engine = ServerEngine(server, tiny_tokenizer, mode="reload", sync_dir=str(tmp_path))
    greedy = SamplingSettings(temperature=0.0, max_tokens=12)
    model = load_policy(tiny_folder, "float32").eval()
    assert (
        gap_to_trainer(model, engine.generate(prompts, 1, greedy), tiny_tokenizer.pad_token_id)
        < LOGP_TOLERANCE
    )

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    stale = engine.generate(prompts, 1, greedy)
    assert gap_to_trainer(model, stale, tiny_tokenizer.pad_token_id) > 0.05  # 0.05 vs 0.02 weights

    engine.update_weights(model.named_parameters(), version=1)
    fresh = engine.generate(prompts, 1, greedy)
    assert gap_to_trainer(model, fresh, tiny_tokenizer.pad_token_id) < LOGP_TOLERANCE
    assert all(r.policy_version == 1 for r in fresh)


def test_frozen_server_refuses_weights(server, tiny_tokenizer, tiny_folder):
    from rollouts.server import ServerEngine, ServerError

    engine = ServerEngine(server, tiny_tokenizer, mode="frozen")
    with pytest.raises(ServerError, match="frozen"):
        engine.update_weights(load_policy(tiny_folder, "float32").named_parameters(), version=1)
