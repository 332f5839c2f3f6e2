"""Our objective against TRL 1.16's GRPOTrainer._compute_loss on identical tensors: equal loss
and equal gradients to 1e-6 in float64, for every variant both implement.

How: TRL's loss lives in ``GRPOTrainer._compute_loss(self, model, inputs)``. We call that
unbound method on a minimal stand-in object carrying only the attributes it reads (loss type,
epsilons, beta, ...), whose ``_get_per_token_logps_and_entropies`` returns our fixed log-prob
tensor (a slice of one leaf, so gradients land on it). No model, no Trainer set-up, no vLLM
engine. Any new attribute TRL starts reading fails loudly with AttributeError. The batch is split
into two micro-batches fed one after the other, as TRL's gradient accumulation does
(``current_gradient_accumulation_steps = steps_per_generation = 2``, ``num_items_in_batch`` =
the generation batch's tokens), so the aggregation contract is checked too.

The slow TRL import (it imports vLLM) happens once for this module.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rl import algorithms

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

B, T, MAX_LEN, MICRO = 6, 7, 9, 3


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(tensors, logps_leaf, micro_rows, **settings):
    """TRL's loss for one micro-batch (rows), on the stand-in object."""
    logps = logps_leaf[micro_rows]
    args = SimpleNamespace(
        use_bias_correction_kl=False,
        delta=settings.pop("delta", None),
        steps_per_generation=B // MICRO,
    )
    use_is = "importance_sampling_ratio" in tensors
    stand_in = SimpleNamespace(
        args=args,
        loss_type=settings.pop("loss_type"),
        epsilon_low=settings.pop("epsilon_low", 0.2),
        epsilon_high=settings.pop("epsilon_high", 0.2),
        beta=settings.pop("beta", 0.0),
        importance_sampling_level=settings.pop("importance_sampling_level", "token"),
        max_completion_length=MAX_LEN,
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        use_vllm=use_is,
        vllm_importance_sampling_correction=use_is,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=B // MICRO,
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    assert not settings, f"unused settings {settings}"
    # multi-turn: TRL's completion mask covers every completion token, its tool_mask zeroes
    # the tools' tokens; ours ("mask") is their product, made by collate from the records
    mask = tensors.get("trl_completion_mask", tensors["mask"])[micro_rows]
    inputs = {
        "prompt_ids": torch.ones(len(micro_rows), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(micro_rows), 1, dtype=torch.long),
        "completion_ids": torch.ones(len(micro_rows), T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": tensors["advantages"][micro_rows],
        "old_per_token_logps": tensors["old_logps"][micro_rows],
        "ref_per_token_logps": tensors["ref_logps"][micro_rows],
        "num_items_in_batch": tensors["mask"].sum(),
    }
    if use_is:
        inputs["importance_sampling_ratio"] = tensors["importance_sampling_ratio"][micro_rows]
    if "tool_mask" in tensors:
        inputs["tool_mask"] = tensors["tool_mask"][micro_rows]
    return trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)


def our_loss(tensors, logps_leaf, micro_rows, **settings):
    mask = tensors["mask"][micro_rows]
    weights = tensors.get("importance_sampling_ratio")
    return algorithms.objective(
        logps_leaf[micro_rows],
        tensors["old_logps"][micro_rows],
        tensors["advantages"][micro_rows],
        mask,
        num_sequences=B,
        num_tokens=int(tensors["mask"].sum()),
        max_completion_length=MAX_LEN,
        sampler_weights=None if weights is None else weights[micro_rows],
        ref_logps=tensors["ref_logps"][micro_rows],
        **settings,
    )[0]


# Multi-turn rows of the lengths above: 1 on the model's tokens, 0 on a tool's
MODEL_MASKS = [
    [1, 1, 0, 0, 0, 1, 1],
    [1],
    [1, 0, 0, 1],
    [1, 1, 0, 0, 1, 1],
    [1, 0, 1],
    [1, 1, 1, 0, 1],
]


def multi_turn_masks() -> dict[str, torch.Tensor]:
    """Ours (collate's completion_mask from multi-turn records), and TRL's two masks for the same
    rows: every completion token, and tool_mask (padded with 1, as TRL pads it)."""
    from rl.batch import collate
    from rollouts.record import Prompt, Rollout

    rollouts = [
        Rollout(Prompt(0, "q", [1, 2], {}), [3] * len(m), "", None, "stop", 0, model_mask=m)
        for m in MODEL_MASKS
    ]
    for rollout in rollouts:
        rollout.advantage = 0.0
    batch = collate(rollouts, pad_id=0)
    tool_mask = torch.ones(B, T, dtype=torch.float64)
    for row, m in enumerate(MODEL_MASKS):
        tool_mask[row, : len(m)] = torch.tensor(m, dtype=torch.float64)
    return {
        "mask": batch.completion_mask.double(),
        "trl_completion_mask": batch.attention_mask[:, batch.prompt_width :].double(),
        "tool_mask": tool_mask,
    }


def make_tensors(seed: int, is_mode: str | None = None, multi_turn: bool = False):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    logps = torch.log(0.05 + 0.9 * rand(B, T))
    lengths = torch.tensor([7, 1, 4, 6, 3, 5])
    masks = multi_turn_masks() if multi_turn else {}
    mask = masks.pop("mask", (torch.arange(T)[None] < lengths[:, None]).double())
    tensors = {
        **masks,
        "logps": logps,
        # wide enough that every clip branch (low, high, dual) is hit somewhere
        "old_logps": logps + 0.6 * (rand(B, T) - 0.5),
        "ref_logps": logps + 0.4 * (rand(B, T) - 0.5),
        "advantages": torch.randn(B, generator=generator, dtype=torch.float64),
        "mask": mask,
    }
    if is_mode is not None:
        sampler = tensors["old_logps"] + 0.5 * (rand(B, T) - 0.5)
        tensors["importance_sampling_ratio"] = algorithms.SAMPLER_CORRECTIONS[is_mode](
            tensors["old_logps"], sampler, mask, 0.8, 1.25
        )[0]
    return tensors


def run_both(tensors, trl_settings, our_settings):
    results = []
    for fn, settings in ((trl_loss, trl_settings), (our_loss, our_settings)):
        leaf = tensors["logps"].clone().requires_grad_(True)
        total = 0.0
        for start in range(0, B, MICRO):
            loss = fn(tensors, leaf, list(range(start, start + MICRO)), **dict(settings))
            loss.backward()
            total += loss.item()
        results.append((total, leaf.grad.clone()))
    return results


CLIP = dict(policy_loss="clip", epsilon_low=0.2, epsilon_high=0.28)

CASES = {
    # name: (TRL settings, our settings, sampler IS mode)
    "grpo": (
        {"loss_type": "grpo", "epsilon_high": 0.28},
        {**CLIP, "aggregation": "seq_mean_token_mean"},
        None,
    ),
    "dapo": (
        {"loss_type": "dapo", "epsilon_high": 0.28},
        {**CLIP, "aggregation": "token_mean"},
        None,
    ),
    "dr_grpo": (
        {"loss_type": "dr_grpo", "epsilon_high": 0.28},
        {**CLIP, "aggregation": "token_sum_norm"},
        None,
    ),
    "bnpo": ({"loss_type": "bnpo", "epsilon_high": 0.28}, {**CLIP, "aggregation": "bnpo"}, None),
    "grpo_kl_k3": (
        {"loss_type": "grpo", "epsilon_high": 0.28, "beta": 0.04},
        {**CLIP, "aggregation": "seq_mean_token_mean", "beta": 0.04, "kl_estimator": "k3"},
        None,
    ),
    "dapo_kl_k3": (
        {"loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.1},
        {**CLIP, "aggregation": "token_mean", "beta": 0.1, "kl_estimator": "k3"},
        None,
    ),
    # TRL's `delta` (two-sided clip) equals dual clip when c > 1 + eps_high
    "dual_clip": (
        {"loss_type": "grpo", "epsilon_low": 0.1, "epsilon_high": 0.1, "delta": 1.15},
        {
            "policy_loss": "clip",
            "epsilon_low": 0.1,
            "epsilon_high": 0.1,
            "clip_ratio_c": 1.15,
            "aggregation": "seq_mean_token_mean",
        },
        None,
    ),
    "gspo": (
        {
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "epsilon_low": 0.03,
            "epsilon_high": 0.04,
        },
        {
            "policy_loss": "gspo",
            "epsilon_low": 0.03,
            "epsilon_high": 0.04,
            "aggregation": "seq_mean_token_mean",
        },
        None,
    ),
    "gspo_kl": (
        {
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "epsilon_low": 0.03,
            "epsilon_high": 0.04,
            "beta": 0.04,
        },
        {
            "policy_loss": "gspo",
            "epsilon_low": 0.03,
            "epsilon_high": 0.04,
            "aggregation": "seq_mean_token_mean",
            "beta": 0.04,
        },
        None,
    ),
    # TRL caps the CISPO weight at epsilon_high; ours at 1 + epsilon_high (the paper's notation)
    "cispo": (
        {"loss_type": "cispo", "epsilon_high": 1.1},
        {
            "policy_loss": "cispo",
            "epsilon_low": 1.0,
            "epsilon_high": 0.1,
            "aggregation": "token_mean",
        },
        None,
    ),
    "grpo_token_truncate_is": (
        {"loss_type": "grpo"},
        {**CLIP, "epsilon_high": 0.2, "aggregation": "seq_mean_token_mean"},
        "token_truncate",
    ),
    "dapo_token_mask_is": (
        {"loss_type": "dapo"},
        {**CLIP, "epsilon_high": 0.2, "aggregation": "token_mean"},
        "token_mask",
    ),
    "dapo_sequence_mask_is_kl": (
        {"loss_type": "dapo", "beta": 0.04},
        {**CLIP, "epsilon_high": 0.2, "aggregation": "token_mean", "beta": 0.04},
        "sequence_mask",
    ),
    "cispo_sequence_truncate_is": (
        {"loss_type": "cispo", "epsilon_high": 1.1},
        {
            "policy_loss": "cispo",
            "epsilon_low": 1.0,
            "epsilon_high": 0.1,
            "aggregation": "token_mean",
        },
        "sequence_truncate",
    ),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equal_loss_and_gradients_to_trl(case, seed):
    trl_settings, our_settings, is_mode = CASES[case]
    tensors = make_tensors(seed, is_mode)
    (trl_value, trl_grad), (our_value, our_grad) = run_both(tensors, trl_settings, our_settings)
    # float64 on both sides, sums of at most B x T = 42 terms below 3: within
    # 2 x 42 x 2^-53 x 126 ~ 1e-12 of each other in any order (measured: equal to the bit).
    # 1e-6 is far above that, and far below what a different formula changes (a clip bound, a
    # normaliser, a KL term: 1e-3 and more on these tensors).
    assert our_value == pytest.approx(trl_value, abs=1e-6, rel=1e-6)
    assert torch.allclose(our_grad, trl_grad, atol=1e-6, rtol=0)
    assert trl_grad.abs().sum() > 0  # a real gradient, not two zeros


@pytest.mark.parametrize("case", sorted(CASES))
def test_multi_turn_tool_masks_match_trl(case):
    """Multi-turn rows (tools' tokens inside the completions): TRL's loss with its tool_mask on
    the same tensors, against ours on collate's mask of the same records."""
    trl_settings, our_settings, is_mode = CASES[case]
    tensors = make_tensors(2, is_mode, multi_turn=True)
    assert torch.equal(tensors["mask"], tensors["trl_completion_mask"] * tensors["tool_mask"])
    assert (tensors["mask"] < tensors["trl_completion_mask"]).any()  # some tokens are the tools'
    (trl_value, trl_grad), (our_value, our_grad) = run_both(tensors, trl_settings, our_settings)
    assert our_value == pytest.approx(trl_value, abs=1e-6, rel=1e-6)
    assert torch.allclose(our_grad, trl_grad, atol=1e-6, rtol=0)
    tool_tokens = tensors["trl_completion_mask"] * (1 - tensors["tool_mask"]) > 0
    assert our_grad[tool_tokens].abs().max() == 0  # no gradient on a tool's token
    assert trl_grad.abs().sum() > 0


def test_the_cases_hit_every_clip_branch():
    """The random tensors are not all inside the clip range: parity covers the clipped branches."""
    tensors = make_tensors(0)
    ratio = torch.exp(tensors["logps"] - tensors["old_logps"])[tensors["mask"] > 0]
    assert (ratio > 1.15).any() and (ratio < 0.8).any()
