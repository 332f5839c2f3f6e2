"""Does routing replay cut the trainer/sampler log-prob gap? The R3 paper's setting on this CPU.

The R3 paper (arXiv 2510.11370) measures a sampler whose kernels differ from the trainer's
(bf16 inference) on MoE models whose experts differ, and reports that replaying the sampler's
routing in the trainer cuts the gap between their log-probs by about an order of magnitude.
``python -m rl.benchmarks.moe`` could not show it: on the upcycled SmolLM2 the experts are
copies and vLLM in float32 picks the trainer's experts for every token. This measurement
reproduces the paper's two conditions:

- the sampler is the colocated vLLM engine in ``--sampler-dtype`` (bfloat16: its CPU kernels in
  bf16, the GPU default), the trainer the transformers model in ``--trainer-dtype`` (float32 by
  default, aha's training dtype on a CPU; ``--trainer-autocast``: float32 weights under bf16
  autocast, the arithmetic of aha's GPU default ``train.bf16_autocast``);
- the experts differ: on the upcycled ``smollm2-135m-moe`` every expert is moved off its copy by
  a documented perturbation, ``W_e + sigma * rms(W) * N(0, 1)`` drawn independently per expert
  and per weight (``--sigmas``; 0 keeps the copies, which isolates the bf16 rounding that
  replay cannot remove); a tiny random family (``--model tiny-random-qwen3-moe``) has random
  experts and router to begin with. The router is the upcycled model's own (random, std 0.02).

For each sigma the perturbed weights are pushed to vLLM (the engine's own weight sync, cast to
its dtype), the held-out arithmetic prompts of the main job are sampled once, and the trainer
scores those same rollouts twice, replay off and on (``rollout.routing_replay: r3``). Reported:
``moe/router_mismatch`` (the fraction of (token, layer) decisions where the trainer's own top-k
differs from vLLM's), the fraction of tokens routed differently in at least one layer (the
paper's other figure), and |trainer - sampler| log-prob of the sampled tokens (mean, 99th
percentile and max over the model's tokens; ``sampling/logp_gap`` is the mean).

    python -m rl.benchmarks.moe_gap [--model smollm2-135m-moe] [--sigmas 0 0.05 0.2]
        [--sampler-dtype bfloat16] [--trainer-dtype float32] [--trainer-autocast] [--prompts 16]
        [--samples 4]
        [--max-tokens 64] [--temperature 0.5] [--out /tmp/moe-gap]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rl.moe.stats import differing_choices


def diverge_experts(
    experts: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], sigma: float, seed: int
) -> None:
    """Every expert of every fused expert tensor [E, ...] set to its original plus
    ``sigma * rms(original expert) * N(0, 1)``, independently per expert and weight (in place;
    sigma 0 restores the copies)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in experts.items():
            original = originals[name]
            if sigma == 0:
                tensor.copy_(original)
                continue
            for e in range(original.shape[0]):
                rms = original[e].float().pow(2).mean().sqrt()
                noise = torch.randn(original[e].shape, generator=generator)
                tensor[e].copy_(original[e] + (sigma * rms * noise).to(original.dtype))


def gap_statistics(trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> dict:
    """|trainer - sampler| over the masked tokens: mean, 99th percentile, max, and how many."""
    gaps = (trainer.double() - sampler.double()).abs()[mask.bool()]
    return {
        "mean": gaps.mean().item(),
        "p99": gaps.quantile(0.99).item() if len(gaps) else 0.0,
        "max": gaps.max().item(),
        "tokens": len(gaps),
    }


class OwnChoice:
    """The router's own top-k of each routed layer in a forward without replay (a hook after
    aha's, which returns the router's own choice when replay is off): for the fraction of
    tokens routed differently from the sampler in at least one layer."""

    def __init__(self, model, family):
        from rl.moe.families import routers

        self.active = False
        self.layers: dict[int, torch.Tensor] = {}
        for layer, module in routers(model, family):
            module.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self.active:
                self.layers[layer] = output[2].detach()

        return hook

    def tokens_differing(self, given: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """(tokens whose own choice differs from ``given`` [b, s, L, K] in any layer, tokens
        with a known sampler routing)."""
        given = given.reshape(-1, *given.shape[-2:]).long()
        known = (given[:, :, 0] >= 0).all(dim=1) & attention_mask.reshape(-1).bool()
        differ = torch.zeros_like(known)
        for layer, own in self.layers.items():
            differ |= differing_choices(own, given[:, layer])
        self.layers = {}
        return int((differ & known).sum()), int(known.sum())


def held_out_prompts(tokenizer, count: int):
    """The main job's held-out prompts (configs/default.yaml: arithmetic levels 1-3, "<think>")."""
    from rl.config import load_config
    from rl.data import load_prompts

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    data = config.data
    split = data.eval_split
    return load_prompts(data.dataset, split, tokenizer, data, [], config.train.seed, limit=count)


def measure(engine, model, routing, own, prompts, args, pad_id: int) -> dict:
    """Sample once; score the same rollouts with replay off and on."""
    from rl.batch import collate, completion_logps
    from rollouts.base import SamplingSettings

    sampling = SamplingSettings(temperature=args.temperature, max_tokens=args.max_tokens)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, args.samples, sampling)
    generation_s = time.perf_counter() - start
    missing = sum(r.routed_experts is None for r in rollouts)
    result: dict = {"rollouts": len(rollouts), "without_routing": missing}
    for replay in (False, True):
        routing.replay = replay
        own.active = not replay
        trainer, sampler, masks, differing, known = [], [], [], 0, 0
        for first in range(0, len(rollouts), args.micro_batch):
            batch = collate(rollouts[first : first + args.micro_batch], pad_id)
            # --trainer-autocast: float32 weights, bf16 matmuls, as aha's trainer runs on a GPU
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.trainer_autocast)
            with torch.no_grad(), autocast:
                logps = completion_logps(model, batch, args.temperature, routing=routing)[0]
            trainer.append(logps.flatten())
            sampler.append(batch.sampler_logps.flatten())
            masks.append(batch.completion_mask.flatten())
            if not replay and batch.routed_experts is not None:
                d, k = own.tokens_differing(batch.routed_experts, batch.attention_mask)
                differing, known = differing + d, known + k
        own.active = False
        metrics = routing.metrics()
        entry = gap_statistics(torch.cat(trainer), torch.cat(sampler), torch.cat(masks))
        entry["router_mismatch"] = metrics.get("moe/router_mismatch")
        if not replay:
            entry["tokens_routed_differently"] = differing / known if known else None
        result["replay_r3" if replay else "replay_off"] = entry
    result["generation_s"] = generation_s
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-moe")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    parser.add_argument("--sampler-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--trainer-dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--trainer-autocast",
        action="store_true",
        help="score under bf16 autocast (train.bf16_autocast, the GPU default)",
    )
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.5, help="the main job's")
    parser.add_argument("--micro-batch", type=int, default=16, help="rollouts per trainer forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/moe-gap"))
    args = parser.parse_args(argv)

    from rl.models import load_policy, load_tokenizer, resolve_model
    from rl.moe.policy import checkpoint_layout, install_routing
    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    model = load_policy(folder, args.trainer_dtype).eval()
    routing = install_routing(model, replay=False, aux_loss_coef=0.0)
    if routing is None:
        raise SystemExit(f"{args.model} is not a mixture of experts")
    own = OwnChoice(model, routing.family)
    experts = {
        name: p
        for name, p in model.named_parameters()
        if name.endswith(routing.family.expert_parameters)
    }
    originals = {name: p.detach().clone() for name, p in experts.items()}
    prompts = held_out_prompts(tokenizer, args.prompts)
    engine = VLLMEngine(
        folder,
        tokenizer,
        VLLMSettings(
            dtype=args.sampler_dtype,
            seed=args.seed,
            kv_cache_gb=1,
            max_model_len=512,
            routed_experts=True,
            checkpoint_names=checkpoint_layout(model),
        ),
    )
    rows = []
    try:
        for version, sigma in enumerate(args.sigmas, start=1):
            diverge_experts(experts, originals, sigma, seed=args.seed + version)
            engine.update_weights(model.named_parameters(), version)
            row = {
                "sigma": sigma,
                **measure(engine, model, routing, own, prompts, args, tokenizer.pad_token_id),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.close()
    trainer = args.trainer_dtype + ("-autocast-bf16" if args.trainer_autocast else "")
    report = {
        "model": args.model,
        "sampler": f"vLLM {args.sampler_dtype}",
        "trainer": f"transformers {trainer}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.model}-{args.sampler_dtype}-vs-{trainer}.json"
    (args.out / name).write_text(json.dumps(report, indent=2))

    print(f"\n{args.model}: vLLM {args.sampler_dtype} samples, transformers {trainer} scores")
    print(
        "| sigma | router mismatch | tokens routed differently | |dlogp| mean off -> r3 | "
        "p99 off -> r3 | max off -> r3 | cut (mean) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        off, on = row["replay_off"], row["replay_r3"]
        cut = off["mean"] / on["mean"] if on["mean"] else float("inf")
        print(
            f"| {row['sigma']:g} | {off['router_mismatch']:.4f} | "
            f"{off['tokens_routed_differently']:.3f} | {off['mean']:.3g} -> {on['mean']:.3g} | "
            f"{off['p99']:.3g} -> {on['p99']:.3g} | {off['max']:.3g} -> {on['max']:.3g} | "
            f"{cut:.2f}x |"
        )
    print(f"\n{args.out / name}")


if __name__ == "__main__":
    main()
