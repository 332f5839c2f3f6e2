"""A bfloat16 vLLM fed float32 trainer weights (rollout.dtype, the GPU default), on the CPU.

Run in their own pytest process: ``pytest -m vllm`` (vLLM changes the calling process).
"""

from __future__ import annotations

import pytest
import torch
from numerics import BF16_LOGP_TOLERANCE
from test_vllm_engine import max_gap, perturbed, trainer_logps

from rl.models import load_policy
from rollouts.base import SamplingSettings
from rollouts.record import Prompt

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def bf16_engine(tiny_folder, tiny_tokenizer):
    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    engine = VLLMEngine(
        tiny_folder,
        tiny_tokenizer,
        VLLMSettings(dtype="bfloat16", kv_cache_gb=1, max_model_len=512),
    )
    yield engine
    engine.close()


def test_the_weight_sync_casts_float32_weights_to_the_engines_bfloat16(
    bf16_engine, tiny_folder, tiny_tokenizer
):
    """vLLM loads the float32 checkpoint into bfloat16 at start; pushing the same float32
    tensors later must round them the same way (torch's copy_ rounds to nearest even in both
    paths), so the log-probs come back bit for bit: the same bf16 weights through the same
    kernels on the same single sequence. A push of other weights in between shows the reload
    did take effect."""
    ids = tiny_tokenizer.encode("What is 7 + 5? The answer is", add_special_tokens=False)
    prompt = Prompt(0, "q", list(ids), {})
    fixed = bf16_engine.generate([prompt], 2, SamplingSettings(temperature=1.0, max_tokens=12))
    start = [bf16_engine.sequence_logps(r.prompt.ids, r.completion_ids) for r in fixed]

    model = load_policy(tiny_folder, "float32").eval()
    assert next(model.parameters()).dtype == torch.float32
    bf16_engine.update_weights(perturbed(load_policy(tiny_folder, "float32")).named_parameters(), 1)
    moved = [bf16_engine.sequence_logps(r.prompt.ids, r.completion_ids) for r in fixed]
    bf16_engine.update_weights(model.named_parameters(), 2)
    back = [bf16_engine.sequence_logps(r.prompt.ids, r.completion_ids) for r in fixed]

    assert max_gap(moved, start) > 0.05
    assert back == start

    # Against the float32 trainer the gap is bf16's rounding (measured: 0.004 at most, 6e-4 on
    # average): within BF16_LOGP_TOLERANCE, 7 standard deviations of it (tests/numerics.py), and
    # under the > 0.05 that other weights show above.
    theirs = trainer_logps(model, fixed, tiny_tokenizer.pad_token_id, 1.0)
    assert max_gap(back, theirs) < BF16_LOGP_TOLERANCE
