"""The GPU path, on a CUDA machine (skipped elsewhere; CI has no GPU): the transformers engine's
decode loop and cache room, the chunked and shared-prompt log-probs with their gradients, and a
tiny training run under bf16 autocast (with and without gradient checkpointing) that logs MFU
and peak memory, an update that waits for the device no more per micro-batch than the model's
own forward and backward do; and, marked vllm, the
colocated vLLM with the GPU defaults (bfloat16, CUDA graphs) reloading weights under graphs
and through sleep levels 1 and 2, and a training run with it.

    .venv/bin/pytest -m "not vllm" tests/test_cuda.py          # on a GPU machine
    .venv/bin/pytest -m vllm tests/test_cuda.py                # vLLM: a process of its own
    AHA_TEST_DEVICE=cpu .venv/bin/pytest -m "not vllm" tests/test_cuda.py  # the same on the CPU
"""

import json
import os
import warnings

import pytest
import torch
from conftest import FIXTURES, ROOT
from numerics import BF16_LOGP_TOLERANCE, LOGP_TOLERANCE
from safetensors.torch import load_file
from test_batch_chunked import check_against_plain, rollouts
from test_hf_engine import (
    assert_greedy_is_decided,
    assert_sampler_logps_are_the_trainers,
    make_prompts,
)

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
    # float32 on the GPU too (TF32 is off by default: torch.backends.cuda.matmul.allow_tf32),
    # so the CPU's bound holds: cuBLAS's reductions are one more summation order
    assert_sampler_logps_are_the_trainers(model, tokenizer, rollouts, 0.7, LOGP_TOLERANCE)


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
    assert_greedy_is_decided(model, [ours])


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk_tokens, share_prompts", [(0, True), (4, False), (4, True)])
def test_chunked_and_shared_prompt_log_probs_equal_the_plain_ones(
    lora, chunk_tokens, share_prompts
):
    pad = load_tokenizer(resolve_model("tiny-random")).pad_token_id
    batch = collate(rollouts([(3, 9), (6, 2), (4, 5)], group_size=3), pad)
    check_against_plain(batch, lora, chunk_tokens, share_prompts, DEVICE)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient_checkpointing"])
def test_tiny_training_under_bf16_autocast_logs_mfu_and_peak_memory(tmp_path, checkpointing):
    run_dir = tmp_path / "run"
    reward = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"run_dir={run_dir}",
            reward,
            "train.bf16_autocast=true",
            "train.steps=2",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ],
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


# ---------------------------------------------------------------- vLLM on the GPU
# Marked vllm: run them in a pytest process of their own, `pytest -m vllm tests/test_cuda.py`
# (vLLM changes the process that starts it). One engine serves the tests below, as the trainer
# would start it on a GPU: bfloat16 (rollout.dtype's GPU default), CUDA graphs (enforce_eager's),
# sleep mode enabled.

needs_vllm_on_cuda = pytest.mark.skipif(
    DEVICE.type != "cuda",  # on a CPU, enforce_eager=false compiles for minutes
    reason="vLLM with CUDA graphs and sleep mode needs a CUDA GPU",
)


@pytest.fixture(scope="module")
def cuda_engine(tiny_folder, tiny_tokenizer):
    pytest.importorskip("vllm")
    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    engine = VLLMEngine(
        tiny_folder,
        tiny_tokenizer,
        VLLMSettings(
            dtype="bfloat16",
            enforce_eager=False,
            sleep_level=1,  # enables sleep mode; the level-2 test switches the level
            gpu_memory_utilization=0.2,
            max_model_len=512,
        ),
    )
    yield engine
    engine.close()


def _policies(tiny_folder):
    """The checkpoint's weights and a perturbed copy (a stand-in for an optimizer step), on the
    GPU in float32, as the trainer holds them."""
    from test_vllm_engine import perturbed

    original = load_policy(tiny_folder, "float32").to(DEVICE).eval()
    moved = perturbed(load_policy(tiny_folder, "float32"), scale=0.1).to(DEVICE).eval()
    return original, moved


def _mean_gap(engine_rollouts, model, tokenizer) -> float:
    """Mean |sampler log-prob - trainer log-prob| per completion token, at temperature 1."""
    from test_vllm_engine import trainer_logps

    theirs = trainer_logps(model, engine_rollouts, tokenizer.pad_token_id, 1.0)
    gaps = [
        abs(x - y)
        for rollout, row in zip(engine_rollouts, theirs, strict=True)
        for x, y in zip(rollout.sampler_logps, row, strict=True)
    ]
    return sum(gaps) / len(gaps)


@needs_vllm_on_cuda
@pytest.mark.vllm
def test_vllm_samples_from_pushed_weights_under_cuda_graphs_and_sleep_mode(
    cuda_engine, tiny_folder, tiny_tokenizer
):
    """Decode runs from captured CUDA graphs, which read the weights' storage: the in-place
    reload must write into it. After a push, the sampler's log-probs are the pushed weights'
    (within bf16 rounding), not the start weights'. The same holds after a level-1 sleep with
    no push (weights offloaded and restored), and after a level-2 sleep and a push; a level-2
    sleep without a push refuses to generate."""
    import dataclasses

    engine, tokenizer = cuda_engine, tiny_tokenizer
    prompts = make_prompts(tokenizer)
    sampling = SamplingSettings(temperature=1.0, max_tokens=24)
    original, moved = _policies(tiny_folder)

    engine.update_weights(moved.named_parameters(), version=1)
    rollouts = engine.generate(prompts, 4, sampling)
    to_moved, to_original = (_mean_gap(rollouts, m, tokenizer) for m in (moved, original))
    # bf16 rounding is the same for both comparisons (~7e-3 a token, tests/numerics.py); the
    # weights' difference (0.1 against 0.02) is not
    assert to_moved < to_original / 5, (to_moved, to_original)
    assert to_moved < BF16_LOGP_TOLERANCE  # bf16 sampling's gap; the engines docs on logp_gap

    free_before, total = torch.cuda.mem_get_info()
    engine.release_memory()  # level 1: weights to CPU RAM, KV cache freed
    freed = torch.cuda.mem_get_info()[0] - free_before
    # vLLM took 0.2 of the GPU; for a tiny model nearly all of it is KV cache (its weights are
    # kilobytes, its activation peak and graphs well under a GiB), so at least half comes back
    assert freed > 0.1 * total, (freed, total)
    rollouts = engine.generate(prompts, 4, sampling)  # no push: the offloaded weights return
    assert _mean_gap(rollouts, moved, tokenizer) < _mean_gap(rollouts, original, tokenizer) / 5

    engine.settings = dataclasses.replace(engine.settings, sleep_level=2)
    engine.release_memory()
    with pytest.raises(RuntimeError, match="discarded the weights"):
        engine.generate(prompts, 1, sampling)
    engine.update_weights(original.named_parameters(), version=2)
    rollouts = engine.generate(prompts, 4, sampling)
    assert _mean_gap(rollouts, original, tokenizer) < _mean_gap(rollouts, moved, tokenizer) / 5
    assert {r.policy_version for r in rollouts} == {2}


@needs_vllm_on_cuda
@pytest.mark.vllm
def test_training_with_vllm_on_the_gpu_defaults_and_sleep_level_2(
    cuda_engine, tmp_path, tiny_overrides
):
    """`aha train configs/tiny.yaml rollout.engine=vllm rollout.sleep_level=2` with the GPU
    defaults (bf16 autocast, bfloat16 vLLM, CUDA graphs), evaluation before and after: every
    generation samples from the trainer's weights, so the gap stays at bf16's level."""
    cuda_engine.close()  # one engine per process at a time: the run starts its own
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *tiny_overrides,
            "rollout.engine=vllm",
            "rollout.sleep_level=2",
            "rollout.gpu_memory_utilization=0.2",
            "algorithm.dynamic_sampling=true",  # refill rounds generate again before the sleep
        ],
    )
    assert (config.rollout.dtype, config.rollout.enforce_eager) == ("bfloat16", False)
    assert config.train.bf16_autocast is True
    summary = train(config, progress=False)
    lines = [
        json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["sampling/logp_gap"] < BF16_LOGP_TOLERANCE for m in steps)
    assert summary.eval_before is not None and summary.eval_after is not None


def count_syncs(run) -> int:
    """The host's waits for the device while ``run()`` runs (torch's sync debug mode warns at
    each synchronising call: a blocking copy, .item(), a boolean-mask index...)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch's sync debug mode is CUDA's")
def test_the_update_waits_for_the_device_no_more_per_micro_batch_than_the_model(tmp_path):
    """The optimizer step's own code (inputs, loss pieces, metrics) adds no wait per
    micro-batch: its metrics are read once per optimizer step. One more micro-batch costs the
    waits the log-probs' forward and backward have themselves (transformers' own checks)."""
    from rl import setup
    from rl.metrics import Metrics
    from rl.trainer import (
        assign_advantages,
        chunk_tokens,
        collect_rollouts,
        completion_logps,
        optimizer_step,
    )

    reward = f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]"
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", reward])
    parts = setup.build(config)
    trainer = parts.trainer
    rollouts, _, _ = collect_rollouts(trainer, parts.train_prompts[:2], None, {})
    assign_advantages(rollouts, config.rollout.group_size, config.algorithm)
    batch = collate(rollouts, trainer.tokenizer.pad_token_id)  # 8 sequences

    def step(micro: int) -> int:
        config.train.micro_batch_size = micro
        return count_syncs(lambda: optimizer_step(trainer, batch, Metrics()))

    def bare(micro: int) -> int:
        def run():
            for start in range(0, len(batch), micro):
                rows = batch.select(list(range(start, start + micro)))
                logps, _ = completion_logps(
                    trainer.model, rows, 1.0, True, chunk_tokens(trainer), True
                )
                logps.sum().backward()

        return count_syncs(run)

    step(4), bare(4)  # first calls: lazy initialisations
    per_micro_batch = (step(2) - step(4)) / 2  # 4 micro-batches against 2
    per_bare_micro_batch = (bare(2) - bare(4)) / 2
    assert per_micro_batch <= per_bare_micro_batch
