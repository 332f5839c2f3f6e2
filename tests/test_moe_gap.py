"""The pieces of ``python -m rl.benchmarks.moe_gap`` that decide its figures: the experts'
documented perturbation and the gap statistics (the vLLM run itself is the benchmark)."""

import torch

from rl.benchmarks.moe_gap import diverge_experts, gap_statistics


def test_gap_statistics_by_hand():
    trainer = torch.tensor([[0.0, -1.0], [-2.0, 0.0]])
    sampler = torch.tensor([[0.5, -1.0], [-1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the 9.0 is padding: not counted
    stats = gap_statistics(trainer, sampler, mask)
    # |gaps| 0.5, 0, 1; the 99th percentile interpolates between the sorted 0.5 and 1 at 0.98
    assert stats == {"mean": 0.5, "p99": 0.99, "max": 1.0, "tokens": 3}


def test_experts_that_start_as_copies_diverge_by_sigma_and_come_back_at_zero():
    torch.manual_seed(0)
    one = torch.randn(1, 100, 100) * 3.0
    originals = {"experts.down_proj": one.repeat(2, 1, 1)}  # two copies of one expert
    experts = {"experts.down_proj": originals["experts.down_proj"].clone()}
    diverge_experts(experts, originals, sigma=0.1, seed=1)
    moved = experts["experts.down_proj"] - originals["experts.down_proj"]
    rms = one.pow(2).mean().sqrt()
    for e in range(2):
        # 10^4 standard normal draws: their rms is 1 within about 1 / sqrt(2 * 10^4) = 0.7%
        # (one standard deviation); 5% is 7 of them
        assert abs(moved[e].pow(2).mean().sqrt() / (0.1 * rms) - 1) < 0.05
    assert not torch.equal(experts["experts.down_proj"][0], experts["experts.down_proj"][1])
    diverge_experts(experts, originals, sigma=0.0, seed=1)
    assert torch.equal(experts["experts.down_proj"], originals["experts.down_proj"])
