"""The GRPO family against values computed by hand from each paper's formula (float64).

Tolerances: each value is a handful of float64 operations on numbers below 10, so it is within
~10 x 2^-53 ~ 1e-15 of the hand value, relative, on any machine. pytest.approx's default
(rel 1e-6) and torch.allclose's (rtol 1e-5, atol 1e-8) are far above that, and far below what a
wrong formula changes (a clip bound, a normaliser, an epsilon: 1e-4 and more)."""

import math
from types import SimpleNamespace

import pytest
import torch

from rl import algorithms
from rl.algorithms import (
    ADVANTAGES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SAMPLER_CORRECTIONS,
)

EPS = algorithms.STD_EPS


@pytest.fixture(autouse=True)
def float64_by_default():
    """Hand-computed values in float64, for this module's tests only: set at import, the default
    dtype would leak into every test collected after it (LoRA adapters made in float64, say)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize(
    ("name", "scale", "rewards", "expected"),
    [
        # GRPO: (r - mean) / (unbiased std + 1e-4); std of [1,0,0,1] = sqrt(1/3)
        (
            "grpo",
            "group",
            [[1, 0, 0, 1]],
            [[x / (math.sqrt(1 / 3) + EPS) for x in (0.5, -0.5, -0.5, 0.5)]],
        ),
        # batch std of [1,0,3,3] = 1.5 (mean 1.75, squared deviations 6.75 / 3)
        ("grpo", "batch", [[1, 0], [3, 3]], [[0.5 / (1.5 + EPS), -0.5 / (1.5 + EPS)], [0, 0]]),
        ("grpo", "none", [[1, 0, 0, 0]], [[0.75, -0.25, -0.25, -0.25]]),
        # an all-equal group: zero advantages, no division by zero
        ("grpo", "group", [[2, 2, 2]], [[0, 0, 0]]),
        # Dr. GRPO: centre only
        ("dr_grpo", "none", [[1, 0, 0, 0]], [[0.75, -0.25, -0.25, -0.25]]),
        # RLOO: r_i - mean of the others: 1 - 0, 0 - 1/3
        ("rloo", "none", [[1, 0, 0, 0]], [[1, -1 / 3, -1 / 3, -1 / 3]]),
        ("rloo", "none", [[1, 2, 6]], [[1 - 4, 2 - 3.5, 6 - 1.5]]),
    ],
)
def test_advantages_by_hand(name, scale, rewards, expected):
    got = ADVANTAGES[name](t(*rewards), scale=scale)
    assert torch.allclose(got, t(*expected), rtol=0, atol=1e-12)  # |values| <= 2: error ~1e-15


def test_rloo_is_grpo_centred_times_g_over_g_minus_1():
    rewards = torch.rand(3, 5)
    centred = ADVANTAGES["dr_grpo"](rewards, scale="none")
    assert torch.allclose(ADVANTAGES["rloo"](rewards), centred * 5 / 4)


# ------------------------------------------------------------------ KL estimators


def test_kl_estimators_by_hand():
    logps, ref = t([-1.0]), t([-2.0])
    assert KL_ESTIMATORS["k1"](logps, ref).item() == pytest.approx(1.0)
    assert KL_ESTIMATORS["k2"](logps, ref).item() == pytest.approx(0.5)
    assert KL_ESTIMATORS["k3"](logps, ref).item() == pytest.approx(math.exp(-1) + 1 - 1)


# ------------------------------------------------------------------ policy losses


def loss_and_grad(name, log_ratio, advantage, logp=None, **hyper):
    """One token: loss and d loss / d logp, with old = logp - log_ratio."""
    logps = torch.tensor([[math.log(0.5) if logp is None else logp]], requires_grad=True)
    old = logps.detach() - log_ratio
    loss, stats = POLICY_LOSSES[name](logps, old, t(advantage), torch.ones(1, 1), **hyper)
    loss.sum().backward()
    return loss.item(), logps.grad.item(), stats


@pytest.mark.parametrize(
    ("ratio", "advantage", "hyper", "loss", "grad"),
    [
        # on-policy: loss -A, gradient -A (r = 1, dr/dlogp = r)
        (1.0, 1.0, {}, -1.0, -1.0),
        # DAPO clip-higher: A > 0, r = 1.5 above 1 + 0.28: clipped, loss -1.28, no gradient
        (1.5, 1.0, {"epsilon_high": 0.28}, -1.28, 0.0),
        # inside the range: loss -r A, gradient -r A
        (1.2, 2.0, {"epsilon_high": 0.28}, -2.4, -2.4),
        # A < 0, r = 0.5 below 1 - 0.2: max(0.5, 0.8) = 0.8, no gradient
        (0.5, -1.0, {}, 0.8, 0.0),
        # A < 0, r = 4 without dual clip: loss r|A| = 4, gradient 4
        (4.0, -1.0, {}, 4.0, 4.0),
        # dual clip c = 3 (Ye et al. 2020): capped at c|A| = 3, no gradient
        (4.0, -1.0, {"clip_ratio_c": 3.0}, 3.0, 0.0),
        # below c the dual clip changes nothing
        (2.0, -1.0, {"clip_ratio_c": 3.0}, 2.0, 2.0),
        # dual clip never touches A > 0
        (4.0, 1.0, {"clip_ratio_c": 3.0}, -1.2, 0.0),
    ],
)
def test_clip_by_hand(ratio, advantage, hyper, loss, grad):
    got_loss, got_grad, _ = loss_and_grad("clip", math.log(ratio), advantage, **hyper)
    assert got_loss == pytest.approx(loss) and got_grad == pytest.approx(grad)


def test_clip_fractions():
    logps = torch.zeros(1, 4)
    old = -torch.log(t([1.5, 0.5, 1.0, 0.5]))  # ratios 1.5, 0.5, 1, 0.5
    adv = t(1.0)
    _, stats = POLICY_LOSSES["clip"](logps, old, adv, t([1, 1, 1, 0]), 0.2, 0.28)
    assert stats["clip_ratio/high"] == pytest.approx(1 / 3)  # the 1.5 with A > 0
    assert stats["clip_ratio/low"] == 0  # 0.5 with A > 0 is not clipped (min picks r A)
    assert stats["ratio/max"] == pytest.approx(1.5) and stats["ratio/min"] == pytest.approx(0.5)


def test_gspo_by_hand():
    """GSPO: s = exp(mean log ratio) = exp((0.1 + 0.3) / 2); loss_i = -s A on every token, and
    d loss / d logp_t = -s A / |y_i|; the padded token gets no gradient."""
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = logps.detach() - t([0.1, 0.3, 5.0])
    mask = t([1, 1, 0])
    s = math.exp(0.2)
    loss, _ = POLICY_LOSSES["gspo"](logps, old, t(1.0), mask, epsilon_low=0.3, epsilon_high=0.3)
    assert torch.allclose(loss, torch.full((1, 3), -s))
    (loss * mask).sum().backward()
    assert torch.allclose(logps.grad, t([-s, -s, 0.0]))  # 2 tokens x (-s / 2)
    # the paper's tiny range clips the whole sequence: loss -(1 + eps_high), no gradient
    logps.grad = None
    loss, stats = POLICY_LOSSES["gspo"](logps, old, t(1.0), mask, 3e-4, 4e-4)
    (loss * mask).sum().backward()
    assert loss[0, 0].item() == pytest.approx(-(1 + 4e-4)) and logps.grad.abs().sum() == 0
    assert stats["clip_ratio/high"] == 1


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss_weight"),
    [(3.0, 1.0, 2.0), (1.5, 1.0, 1.5), (0.1, -1.0, 0.1), (3.0, -2.0, 2.0)],
)
def test_cispo_by_hand(ratio, advantage, loss_weight):
    """CISPO: w = sg(clip(r, 1 - 1, 1 + 1)); loss = -w A logp; gradient -w A, even when clipped."""
    logp = math.log(0.5)
    loss, grad, _ = loss_and_grad(
        "cispo", math.log(ratio), advantage, logp=logp, epsilon_low=1.0, epsilon_high=1.0
    )
    assert loss == pytest.approx(-loss_weight * advantage * logp)
    assert grad == pytest.approx(-loss_weight * advantage)


# ------------------------------------------------------------------ aggregation

LOSS = t([1.0, 2.0, 0.0], [3.0, 0.0, 0.0])
MASK = t([1, 1, 0], [1, 0, 0])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("seq_mean_token_mean", (1.5 + 3) / 2),  # GRPO: per-sequence means, then their mean
        ("token_mean", 6 / 3),  # DAPO: every token alike
        ("token_sum_norm", 6 / (2 * 4)),  # Dr. GRPO: sum / (sequences x max length 4)
        ("bnpo", 6 / 3),  # one micro-batch: the token mean
    ],
)
def test_aggregations_by_hand(name, expected):
    got = LOSS_AGGREGATIONS[name](
        LOSS, MASK, num_sequences=2, num_tokens=3, max_completion_length=4
    )
    assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize("name", ["seq_mean_token_mean", "token_mean", "token_sum_norm"])
def test_micro_batch_shares_sum_to_the_batch_loss(name):
    loss = torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).double()
    kwargs = dict(num_sequences=6, num_tokens=int(mask.sum()), max_completion_length=7)
    whole = LOSS_AGGREGATIONS[name](loss, mask, **kwargs)
    shares = sum(
        LOSS_AGGREGATIONS[name](loss[i : i + 2], mask[i : i + 2], **kwargs) for i in (0, 2, 4)
    )
    assert torch.allclose(whole, shares)


def test_bnpo_is_the_mean_of_local_token_means():
    got = sum(LOSS_AGGREGATIONS["bnpo"](LOSS[i : i + 1], MASK[i : i + 1], 2, 3, 4) for i in (0, 1))
    assert got.item() == pytest.approx((1.5 + 3) / 2)


# ------------------------------------------------------------------ sampler correction

OLD = t([-1.0, -1.0])
SAMPLER = t([-1.5, -0.5])  # token ratios exp(0.5), exp(-0.5); sequence ratio 1


@pytest.mark.parametrize(
    ("mode", "mask", "clip_min", "clip_max", "expected"),
    [
        ("token_truncate", [1, 1], None, 1.2, [[1.2, math.exp(-0.5)]]),
        ("token_truncate", [1, 1], 0.7, 1.2, [[1.2, 0.7]]),
        ("token_mask", [1, 1], None, 1.2, [[0.0, math.exp(-0.5)]]),
        ("token_mask", [1, 1], 0.7, None, [[math.exp(0.5), 0.0]]),
        ("sequence_truncate", [1, 1], None, 1.2, [[1.0]]),
        ("sequence_mask", [1, 1], None, 1.2, [[1.0]]),
        # only the first token counts: sequence ratio exp(0.5) = 1.65
        ("sequence_truncate", [1, 0], None, 1.2, [[1.2]]),
        ("sequence_mask", [1, 0], None, 1.2, [[0.0]]),
        ("sequence_mask", [1, 0], None, 3.0, [[math.exp(0.5)]]),
    ],
)
def test_sampler_corrections_by_hand(mode, mask, clip_min, clip_max, expected):
    weights, stats = SAMPLER_CORRECTIONS[mode](OLD, SAMPLER, t(mask), clip_min, clip_max)
    assert torch.allclose(weights, t(*expected))
    assert "sampling/importance_sampling_ratio/mean" in stats


def test_unknown_sampler_logp_counts_as_no_gap():
    weights, _ = SAMPLER_CORRECTIONS["token_mask"](OLD, t([math.nan, -1.0]), t([1, 1]), None, 3.0)
    assert torch.equal(weights, t([1.0, 1.0]))


def test_informative_groups():
    keep = algorithms.informative_groups(t([1, 1, 1], [0, 1, 0], [0.2, 0.2, 0.2000001]))
    assert keep.tolist() == [False, True, False]


# ------------------------------------------------------------------ reference with LoRA


def test_lora_reference_is_the_base_with_adapters_disabled():
    from rl.batch import TokenBatch, logps_in_chunks
    from rl.config import LoraConfig, load_config
    from rl.models import load_policy, resolve_model
    from rl.schemes import DataParallel
    from rl.trainer import reference_logps

    folder = resolve_model("tiny-random")
    torch.manual_seed(0)
    model = load_policy(folder, "float32", LoraConfig(enabled=True, r=4, alpha=8))
    base = load_policy(folder, "float32")
    with torch.no_grad():  # adapters start as a no-op (B = 0); make them matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.randint(5, 100, (2, 9))
    batch = TokenBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        completion_mask=torch.ones(2, 4),
        advantages=torch.zeros(2),
        sampler_logps=None,
        prompt_width=5,
    )
    config = load_config(None, ["model.name=tiny-random", "train.micro_batch_size=1"])
    trainer = SimpleNamespace(
        config=config, model=model, ref_model=None, scheme=DataParallel(), moe=None, teacher=None
    )
    ref = reference_logps(trainer, batch)
    # The base model through the same function, on the same shapes: the same kernels in the same
    # order, so the same bits (peft's disabled adapter calls the base layer and nothing else).
    train = config.train
    same_call = (1, config.rollout.temperature, train.logps_chunk_tokens, train.share_prompts)
    assert torch.equal(ref, logps_in_chunks(base, batch, *same_call))
    # the adapters do change the policy (by 0.7 here), far beyond float32 noise (~1e-6)
    adapted = logps_in_chunks(model, batch, *same_call)
    assert (adapted - ref).abs().max() > 1e-3
