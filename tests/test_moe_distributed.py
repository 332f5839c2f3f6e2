"""Mixture-of-experts policies on two processes: data parallel, FSDP2 and DeepSpeed ZeRO-3.

One 2-process launch per scheme (CPU, gloo, as tests/test_distributed.py starts them) trains, in
turn, every tiny MoE family (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3 with its latent attention
and grouped router) 2 steps on the transformers engine with routing replay on (``rollout
.routing_replay: r3``): full fine-tuning, LoRA on attention, and LoRA on attention and the
experts (peft's ``target_parameters``). ZeRO-3 runs full fine-tuning only (aha refuses LoRA
there for every model), with ``train.share_prompts: false``, which it needs for a MoE policy
(the refusal is checked in the same launch). Each case checks:

- the parameters move (every one that must: a routed expert no token went to gets no gradient);
- the MoE metrics are over both ranks: each expert's share is the pooled count of both ranks'
  routings, not rank 0's, and the router mismatch the pooled fraction; each rank routed every
  real token to exactly top-k experts in every routed layer (a router hook lost or run twice
  inside a sharded layer breaks that);
- replay holds inside the wrapped model: a forward with the sampler's experts forced to
  (0, 1) sends every token there (shares 1/2, 1/2, 0, ...), changes the log-probs against the
  router's own choice, and under FSDP2 and ZeRO-3 gives the log-probs of the whole, unwrapped
  copy the transformers engine generates with (same weights, same forced experts).

Launches are few and the models tiny (the suite's time is counted): 52 s (data parallel), 43 s
(FSDP2) and 25 s (ZeRO-3) on this 2-core machine, 2026-12-03. DeepSpeed ZeRO-2 ran the same cases by hand (docs/moe.md, "Scale"); it is not
launched here.
"""

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT
from numerics import LOGP_TOLERANCE, LONG_CHAIN_LOGP_TOLERANCE
from test_distributed import DEEPSPEED_ENV, FSDP2_ENV, process_environment, spawn_two

from rl.moe.tiny import TINY_MOE

FAMILIES = sorted(TINY_MOE)
LORA_MODES = {
    "full": [],
    "lora": ["model.lora.enabled=true"],
    "lora_experts": ["model.lora.enabled=true", "model.lora.experts=true"],
}
SCHEMES = {  # (the launcher's variables, the cases, extra overrides)
    "ddp": (None, [(f, m) for f in FAMILIES for m in LORA_MODES], []),
    "fsdp2": (FSDP2_ENV, [(f, m) for f in FAMILIES for m in LORA_MODES], []),
    "zero3": (DEEPSPEED_ENV[3], [(f, "full") for f in FAMILIES], ["train.share_prompts=false"]),
}
STEPS = 2
FORCED_TOKENS = 12  # the forced-routing forward: one row of this many tokens


def overrides(tmp_dir: Path, name: str, mode: str, extra: list[str]) -> list[str]:
    return [
        f"model.name={name}",
        "rollout.routing_replay=r3",
        f"run_dir={tmp_dir / f'{name}-{mode}'}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count', weight: 1.0}}]",
        "data.eval_size=0",
        "rollout.max_tokens=8",
        "train.prompts_per_step=4",  # 2 groups per rank
        "rollout.group_size=2",
        *LORA_MODES[mode],
        *extra,
    ]


def _worker(rank, world, port, scheme, out_dir):
    env, cases, extra = SCHEMES[scheme]
    os.environ.update(process_environment(rank, world, port, env))
    from rl import distributed

    torch.set_num_threads(1)  # two processes on a small machine
    dist = distributed.init()
    results = {}
    try:
        if scheme == "zero3":
            results["refused"] = refusal(dist, Path(out_dir))
        for name, mode in cases:
            results[(name, mode)] = train_case(dist, overrides(Path(out_dir), name, mode, extra))
            if dist.accelerator is not None:
                dist.accelerator.free_memory()
    finally:
        distributed.close(dist)
    torch.save(results, Path(out_dir) / f"rank-{rank}.pt")


def refusal(dist, out_dir: Path) -> str:
    """ZeRO-3 with shared prompts and a MoE policy: the ConfigError's message."""
    from rl import setup
    from rl.config import ConfigError, load_config

    config = load_config(
        ROOT / "configs" / "tiny.yaml", overrides(out_dir, FAMILIES[0], "full", [])
    )
    try:
        setup.build(config, None, dist)
    except ConfigError as error:
        return str(error)
    return ""


def train_case(dist, config_overrides: list[str]) -> dict:
    """Two steps on this rank's share of each batch: rank 0's metrics, this rank's own MoE
    counts before the reduction, which trainable tensors moved, and the forced-routing check."""
    from rl import setup
    from rl.config import load_config
    from rl.data import batches
    from rl.distributed import shard
    from rl.trainer import train_step

    config = load_config(ROOT / "configs" / "tiny.yaml", config_overrides)
    parts = setup.build(config, None, dist)
    trainer, routing = parts.trainer, parts.trainer.moe
    local = []  # this rank's counters at each step's reduction
    reduce_over_ranks = routing.metrics

    def metrics(dist=None):
        local.append(
            {
                "mismatched": float(routing.mismatched),
                "decisions": float(routing.decisions),
                "counts": routing.counts.clone(),
            }
        )
        return reduce_over_ranks(dist)

    routing.metrics = metrics
    before = whole_trainable(trainer)
    stream = batches(parts.train_prompts, config.train.prompts_per_step, config.train.seed)
    step_metrics = [
        train_step(trainer, shard(batch, dist))
        for _, batch in zip(range(STEPS), stream, strict=False)
    ]
    after = whole_trainable(trainer)
    return {
        "metrics": step_metrics,
        "local": local,
        "layers": list(routing.layers),
        "top_k": routing.top_k,
        "num_experts": routing.num_experts,
        "moved": {name: not torch.equal(before[name], after[name]) for name in before},
        "forced": forced_replay(trainer, dist),
    }


def whole_trainable(trainer) -> dict[str, torch.Tensor]:
    weights = trainer.scheme.whole_weights(trainer.model, trainable_only=True)
    return {name: tensor.clone() for name, tensor in weights}


@torch.no_grad()
def forced_replay(trainer, dist) -> dict:
    """One row's log-probs with the sampler's experts forced to (0, 1, ...) in every routed
    layer, with the router's own choice, and (FSDP2, ZeRO-3) from the engine's whole copy with
    the same forced experts; the forced forward's MoE metrics (over both ranks)."""
    routing = trainer.moe
    ids = torch.arange(5, 5 + FORCED_TOKENS).unsqueeze(0)
    mask = torch.ones_like(ids)
    forced = torch.arange(routing.top_k).expand(1, FORCED_TOKENS, routing.num_layers, -1)

    def logps(model, experts, measure=True):
        model.eval()
        with routing.forward(experts, mask, measure=measure):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    replayed = logps(trainer.model, forced)
    forced_metrics = routing.metrics(dist)
    own = logps(trainer.model, None)
    routing.metrics(dist)  # counted: cleared
    copy = None
    if trainer.engine_model is not None:
        copy = logps(trainer.engine_model, forced, measure=False)
    return {"replayed": replayed, "own": own, "copy": copy, "metrics": forced_metrics}


def share_key(layer: int, expert: int) -> str:
    return f"moe/expert_share/layer{layer:02d}/e{expert:02d}"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_moe_families_train_on_two_processes(tmp_path, scheme):
    spawn_two(_worker, scheme, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in (0, 1)]
    if scheme == "zero3":
        assert (
            "train.share_prompts: a mixture-of-experts policy under DeepSpeed ZeRO-3"
            in (ranks[0]["refused"])
        )
    for case in SCHEMES[scheme][1]:
        first, second = ranks[0][case], ranks[1][case]
        layers, top_k, num_experts = first["layers"], first["top_k"], first["num_experts"]
        assert layers, case  # the tiny model has routed layers
        assert len(first["metrics"]) == STEPS
        for step, m in enumerate(first["metrics"]):
            where = (case, step)
            assert m["grad_norm"] > 0 and math.isfinite(m["loss"]), where
            # the engine routes with the weights the trainer replays over (tests/test_moe_runs.py);
            # the log-prob bound: tests/numerics.py
            assert m["moe/router_mismatch"] < 0.01, where
            assert m["sampling/logp_gap"] < LONG_CHAIN_LOGP_TOLERANCE, where
            own = [r["local"][step] for r in (first, second)]
            for counters in own:  # every real token to exactly top_k experts in each layer
                per_layer = counters["counts"][layers].sum(dim=-1)
                assert per_layer[0] > 0 and (per_layer == per_layer[0]).all(), where
                assert float(per_layer[0]) % top_k == 0, where
            # Pooled over both ranks: integer counts (below 2^53) add exactly in float64, and
            # the metric is the same one division of the same sums, so equal to the bit.
            pooled = own[0]["counts"] + own[1]["counts"]
            assert not torch.equal(pooled, 2 * own[0]["counts"]), where  # the ranks differ
            for layer in layers:
                for expert in range(num_experts):
                    share = float(pooled[layer, expert] / pooled[layer].sum())
                    assert m[share_key(layer, expert)] == share, (where, layer, expert)
            decisions = own[0]["decisions"] + own[1]["decisions"]
            assert decisions > 0
            mismatch = (own[0]["mismatched"] + own[1]["mismatched"]) / decisions
            assert m["moe/router_mismatch"] == mismatch, where
        assert_trained(case, first["moved"], layers)
        assert_replayed(case, first["forced"], layers, top_k, num_experts)


def assert_trained(case, moved: dict[str, bool], layers: list[int]) -> None:
    """Every trainable tensor moved, but a routed expert's (full fine-tuning): one that no token
    was routed to in two steps gets no gradient (DeepSeek-V3's top-2 of one group of 4 often
    leaves one idle), yet every routed layer trained some of its experts; the routers learn
    through R3's gates. LoRA: every adapter (lora_B starts at zero), on the experts when asked."""
    name, mode = case
    assert moved, case
    if mode == "full":
        experts = {key for key in moved if ".experts." in key}
        assert [key for key, m in moved.items() if not m and key not in experts] == [], case
        trained_layers = {key.split(".experts.")[0] for key in experts if moved[key]}
        assert len(trained_layers) == len(layers), case
        assert any(key.endswith(("gate.weight", "router.weight")) for key in moved), case
        return
    assert all("lora_" in key for key in moved), case
    assert all(m for key, m in moved.items() if "lora_B" in key), case
    on_experts = [key for key in moved if "lora_B" in key and ".experts" in key]
    assert bool(on_experts) == (mode == "lora_experts"), case


def assert_replayed(case, forced: dict, layers: list[int], top_k: int, num_experts: int) -> None:
    metrics = forced["metrics"]
    for layer in layers:  # every token went to the forced experts: 1/top_k each, exactly
        shares = [metrics[share_key(layer, e)] for e in range(num_experts)]
        assert shares == [1 / top_k] * top_k + [0.0] * (num_experts - top_k), (case, layer)
    # the routers' own top-k differs from the forced one for some tokens, so the log-probs do:
    # by far more than float32 noise (a replay ignored would leave them equal)
    assert metrics["moe/router_mismatch"] > 0, case
    assert (forced["replayed"] - forced["own"]).abs().max() > 10 * LOGP_TOLERANCE, case
    if forced["copy"] is not None:
        # The wrapped model and the engine's whole copy hold the same float32 weights (the copy
        # takes the gathered tensors each step) and route the same forced experts: the same
        # function, computed along other kernels at most (the unsharded parameters' layout).
        # The tiny MoE models are the size of the tiny dense one (2 layers, hidden 64-128), so
        # the bound of tests/numerics.py applies; a replay lost inside a wrapped layer moves
        # them by the difference asserted just above.
        difference = float((forced["replayed"] - forced["copy"]).abs().max())
        assert difference <= LOGP_TOLERANCE, (case, difference)
