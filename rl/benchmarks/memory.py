"""Peak memory of one training micro-batch (forward + backward of the completion log-probs) with
long completions: all logits at once vs chunked output layer, with and without gradient
checkpointing. Each variant runs in a fresh subprocess, so peaks do not mask each other.

    python -m rl.benchmarks.memory                                   # SmolLM2, 4 x (64 + 1024)
    python -m rl.benchmarks.memory --model wide-tiny --completion 2048

CPU: the peak resident set (``getrusage`` max RSS) and its rise over the process's state before
the step (model, optimizer-free, batch); GPU: ``torch.cuda.max_memory_allocated``. ``wide-tiny``
is a 2-layer model with SmolLM2's 49,152-token vocabulary and random weights: the logits'
memory without the cost of a real model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

VARIANTS = {
    "all logits at once": {"chunk_tokens": 0, "checkpointing": False},
    "chunked log-probs": {"chunk_tokens": 1024, "checkpointing": False},
    "all at once + grad ckpt": {"chunk_tokens": 0, "checkpointing": True},
    "chunked + grad ckpt": {"chunk_tokens": 1024, "checkpointing": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model name, or wide-tiny")
    parser.add_argument("--batch", type=int, default=4, help="sequences in the micro-batch")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=1024, help="completion tokens")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child's job
    return parser.parse_args(argv)


def load_model(name: str, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rl.models import load_policy, resolve_model

    if name == "wide-tiny":
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        if checkpointing:
            model.gradient_checkpointing_enable()
        return model
    return load_policy(resolve_model(name), "float32", None, checkpointing)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One micro-batch forward + backward as the trainer runs it; memory in MiB."""
    from rl.batch import TokenBatch, completion_logps

    settings = VARIANTS[args.variant]
    torch.manual_seed(0)
    model = load_model(args.model, settings["checkpointing"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    vocab = model.config.vocab_size
    width = args.prompt + args.completion
    batch = TokenBatch(
        input_ids=torch.randint(0, vocab, (args.batch, width)),
        attention_mask=torch.ones(args.batch, width, dtype=torch.long),
        completion_mask=torch.ones(args.batch, args.completion),
        advantages=torch.linspace(-1, 1, args.batch),
        sampler_logps=None,
        prompt_width=args.prompt,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock = time.perf_counter()
    logps, _ = completion_logps(model, batch, 1.0, True, settings["chunk_tokens"])
    mask = batch.completion_mask.to(device)
    loss = -(logps * mask * batch.advantages.to(device)[:, None]).sum() / mask.sum()
    loss.backward()
    seconds = time.perf_counter() - clock
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "step_mib": peak - before, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(measure(args)))
        return
    print(
        f"model {args.model}, micro-batch {args.batch} x ({args.prompt} prompt + "
        f"{args.completion} completion tokens), forward + backward, one fresh process each"
    )
    print(f"{'variant':<26} {'peak MiB':>10} {'step MiB':>10} {'seconds':>8}")
    base = [sys.executable, "-m", "rl.benchmarks.memory", *(argv or sys.argv[1:])]
    for variant in VARIANTS:
        done = subprocess.run(
            [*base, "--variant", variant], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(f"{variant:<26} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{variant:<26} {result['peak_mib']:>10.0f} {result['step_mib']:>10.0f} "
            f"{result['seconds']:>8.1f}"
        )
    print("step MiB: the peak's rise during the step, over the process before it")


if __name__ == "__main__":
    main()
