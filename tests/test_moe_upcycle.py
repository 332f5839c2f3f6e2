"""Sparse upcycling (rl/moe/upcycle.py): the embedded SmolLM2-135M made a 4-expert top-2
mixture of experts computes the dense model's function at step 0."""

import pytest
import torch

from rl.models import load_policy, resolve_model
from rl.moe.families import FAMILIES, routers
from rl.moe.upcycle import EXPERTS, TOP_K, upcycle


@pytest.fixture(scope="module")
def dense():
    return load_policy(resolve_model("smollm2-135m"), "float32").eval()


def test_the_upcycled_model_computes_the_dense_models_logits(dense):
    moe = upcycle(dense).eval()
    config = moe.config
    assert config.model_type == "mixtral"
    assert (config.num_local_experts, config.num_experts_per_tok) == (EXPERTS, TOP_K)
    found = routers(moe, FAMILIES["mixtral"])
    assert [layer for layer, _ in found] == list(range(dense.config.num_hidden_layers))
    # the routers are random, not zero: tokens spread over the experts from the first step
    assert all(router.weight.std() > 0 for _, router in found)

    # Compared in float64, where the function is the point and rounding is not. Each expert is
    # the dense MLP and the top-2 gates sum to 1, so each MoE layer is w1*MLP(x) + w2*MLP(x) =
    # MLP(x) up to float64 rounding (~1e-16 relative per operation; through 30 layers of dot
    # products over <= 1536 terms the logits, |z| < 100, move by ~1e-10 at the very worst).
    # transformers' routers compute their gates in float32 even in a float64 model: w1 + w2 =
    # 1 +- 2^-23 alone moves the logits by ~2e-5 (measured), so the hook below recomputes the
    # same gates in float64. A functional slip (gates not renormalised: w1 + w2 ~ 0.5-0.9; an
    # expert left uninitialised; gate and up halves swapped) moves the logits by 0.1 or more.
    # 1e-4, the figure, sits orders of magnitude from both. (In float32 throughout the
    # upcycled logits differ from the dense ones by ~5e-5, as much as the dense model's own
    # float32 logits differ from its float64 ones, ~6e-5: both measured on this machine.)
    def float64_gates(module, args, output):
        logits, _, index = output
        gates = torch.softmax(logits.double(), dim=-1).gather(1, index)
        return logits, gates / gates.sum(dim=-1, keepdim=True), index

    for _, router in found:
        router.register_forward_hook(float64_gates)
    dense64, moe64 = dense.double(), moe.double()
    moe64.set_experts_implementation("eager")  # torch's grouped GEMM has no float64 kernel
    ids = torch.randint(
        0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = dense64(input_ids=ids).logits
        logits = moe64(input_ids=ids).logits
    assert (logits - expected).abs().max().item() < 1e-4
