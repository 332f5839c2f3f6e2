"""vLLM engine vs transformers engine on the same prompts: tokens/s, the ratio, weight-sync time.

    python -m rl.benchmarks.rollout_engines                      # SmolLM2, 4 prompts x 8 x 128
    python -m rl.benchmarks.rollout_engines --prompts 8 --n 8 --max-tokens 96

The transformers engine runs first: starting vLLM changes the process (threads, LD_PRELOAD,
RNG seeds), and the reference should not inherit that. Both sample with the trainer's settings
(temperature 1); tokens/s counts the tokens actually generated, EOS included. Weight sync is
timed as the trainer calls it after a step: every parameter, in place. The trainer-vs-vLLM
log-prob gap of vLLM's own samples is printed too: it is the number the sync must keep small.
"""

from __future__ import annotations

import argparse
import time

import torch

from rl.batch import collate, completion_logps
from rl.config import load_config
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.setup import build_prompts, build_rewards
from rollouts.base import SamplingSettings
from rollouts.record import Rollout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed generate calls per engine")
    parser.add_argument("--sync-steps", type=int, default=3, help="timed weight syncs")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--skip-transformers", action="store_true")
    return parser.parse_args(argv)


def timed_generation(engine, prompts, n: int, sampling: SamplingSettings, repeats: int):
    """(tokens per second over the timed calls, the last call's rollouts); one warm-up call."""
    engine.generate(prompts[:1], 1, SamplingSettings(max_tokens=4))
    tokens, seconds, rollouts = 0, 0.0, []
    for _ in range(repeats):
        clock = time.perf_counter()
        rollouts = engine.generate(prompts, n, sampling)
        seconds += time.perf_counter() - clock
        tokens += sum(len(r.completion_ids) for r in rollouts)
    return tokens / seconds, rollouts


def logp_gap(model, rollouts: list[Rollout], pad_id: int, temperature: float) -> float:
    """Largest |trainer - sampler| log-prob over the sampled tokens."""
    batch = collate(rollouts, pad_id)
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, temperature)
    mask = batch.completion_mask.bool()
    return float((logps - batch.sampler_logps).abs()[mask].max())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config(None, [f"model.name={args.model}"])
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    prompts = build_prompts(config, tokenizer, build_rewards(config))[0][: args.prompts]
    sampling = SamplingSettings(temperature=1.0, max_tokens=args.max_tokens)
    model = load_policy(folder, "float32").eval()
    shape = f"{args.prompts} prompts x n={args.n} x max {args.max_tokens} tokens, {args.model}"
    print(f"{shape}; torch threads {torch.get_num_threads()}", flush=True)

    hf_rate = None
    if not args.skip_transformers:
        from rollouts.hf_engine import TransformersEngine

        hf_rate, _ = timed_generation(
            TransformersEngine(model, tokenizer), prompts, args.n, sampling, args.repeats
        )
        print(f"transformers: {hf_rate:8.1f} tokens/s", flush=True)

    from rollouts.vllm_engine import VLLMEngine, VLLMSettings

    clock = time.perf_counter()
    engine = VLLMEngine(folder, tokenizer, VLLMSettings(kv_cache_gb=args.kv_cache_gb))
    print(f"vllm start-up: {time.perf_counter() - clock:.1f} s", flush=True)
    vllm_rate, rollouts = timed_generation(engine, prompts, args.n, sampling, args.repeats)
    print(f"vllm:         {vllm_rate:8.1f} tokens/s", flush=True)
    if hf_rate:
        print(f"ratio vllm/transformers: {vllm_rate / hf_rate:.2f}x", flush=True)

    sync_seconds = []
    for step in range(1, args.sync_steps + 1):
        clock = time.perf_counter()
        engine.update_weights(model.named_parameters(), version=step)
        sync_seconds.append(time.perf_counter() - clock)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"weight sync: {sum(sync_seconds) / len(sync_seconds):.2f} s per step "
        f"({parameters:.0f} M parameters; {', '.join(f'{s:.2f}' for s in sync_seconds)})",
        flush=True,
    )
    gap = logp_gap(model, rollouts, tokenizer.pad_token_id, sampling.temperature)
    print(f"max |trainer - vllm| log-prob over {len(rollouts)} samples: {gap:.2e}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
