"""Mixture-of-experts policies through the whole loop: every tiny family trains 2 steps, with
full fine-tuning and with LoRA, routing replay on, and logs its MoE metrics."""

import json

import pytest
import torch
from conftest import ROOT
from numerics import LONG_CHAIN_LOGP_TOLERANCE
from safetensors.torch import load_file

from rl.checkpoint import latest_checkpoint
from rl.config import ConfigError, load_config
from rl.models import resolve_model
from rl.moe.tiny import TINY_MOE
from rl.run import train


def run(tmp_path, overrides: list[str], tiny_overrides: list[str]):
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *tiny_overrides,
            "data.eval_size=0",
            "train.save_every=0",
            "rollout.max_tokens=8",
            *overrides,
        ],
    )
    train(config, progress=False)
    run_dir = tmp_path / "run"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return run_dir, [m for m in map(json.loads, lines) if "loss" in m]


@pytest.mark.parametrize("name", sorted(TINY_MOE))
def test_every_family_trains_two_steps_with_replay(name, tmp_path, tiny_overrides):
    run_dir, metrics = run(
        tmp_path, [f"model.name={name}", "rollout.routing_replay=r3"], tiny_overrides
    )
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["grad_norm"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
        # the transformers engine routes with the very weights the trainer replays its routing
        # over; only a float32 near-tie between two experts (~1e-7 apart) could flip between the
        # engine's batch shapes and the trainer's: rare, so a handful of ~600 decisions at most
        assert m["moe/router_mismatch"] < 0.01
        assert m["sampling/logp_gap"] < LONG_CHAIN_LOGP_TOLERANCE  # tests/numerics.py
        assert 0 < m["moe/load_entropy/mean"] <= 1
        assert any(key.startswith("moe/expert_share/") for key in m)
    before = load_file(resolve_model(name) / "model.safetensors")
    after = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    unchanged = [key for key in before if torch.equal(before[key], after[key])]
    # DeepSeek-V3's correction bias is a buffer that no gradient moves; an expert no token was
    # routed to in two steps gets no gradient (DeepSeek-V3's 8 experts, top-2 of one group of
    # 4, often leave one idle), but every routed layer trained some of its experts
    experts = {key for key in before if ".experts." in key}  # routed experts, not shared
    assert [k for k in unchanged if k not in experts and "e_score_correction_bias" not in k] == []
    layers = {key.split(".experts.")[0] for key in experts}
    assert {key.split(".experts.")[0] for key in experts if key not in unchanged} == layers
    routers = [key for key in before if key.endswith(("gate.weight", "router.weight"))]
    assert routers and not set(routers) & set(unchanged)  # R3's gates keep the routers learning


@pytest.mark.parametrize(
    "name, experts",
    [(name, False) for name in sorted(TINY_MOE)] + [("tiny-random-qwen3-moe", True)],
)
def test_lora_trains_attention_and_experts_when_asked(name, experts, tmp_path, tiny_overrides):
    overrides = [f"model.name={name}", "model.lora.enabled=true", f"model.lora.experts={experts}"]
    run_dir, metrics = run(
        tmp_path, [*overrides, "algorithm.router_aux_loss_coef=0.01"], tiny_overrides
    )
    assert [m["step"] for m in metrics] == [1, 2] and all(m["grad_norm"] > 0 for m in metrics)
    adapter = load_file(latest_checkpoint(run_dir) / "adapter_model.safetensors")
    lora_b = {key: t for key, t in adapter.items() if "lora_B" in key}
    # lora_B starts at zero: after two steps every adapter's B has moved
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())
    on_experts = [key for key in lora_b if ".experts" in key]
    assert bool(on_experts) == experts
    assert not any(key for key in lora_b if "mlp.gate" in key and ".experts" not in key)


def test_the_moe_keys_are_refused_for_a_dense_model(tmp_path, tiny_overrides):
    for key in ("rollout.routing_replay=r3", "algorithm.router_aux_loss_coef=0.01"):
        with pytest.raises(ConfigError, match="not a mixture-of-experts model"):
            run(tmp_path, [key, "train.steps=1", f"run_dir={tmp_path / key}"], tiny_overrides)
    with pytest.raises(ConfigError, match="router_aux_loss_coef: must be >= 0"):
        run(tmp_path, ["algorithm.router_aux_loss_coef=-1"], tiny_overrides)
