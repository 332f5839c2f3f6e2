"""Peak memory of one training micro-batch (forward + backward of the completion log-probs) with
long completions: all logits at once vs chunked output layer, with and without gradient
checkpointing. Each variant runs in a fresh subprocess, so peaks do not mask each other.

    python -m rl.benchmarks.memory                                   # SmolLM2, 4 x (64 + 1024)
    python -m rl.benchmarks.memory --model wide-tiny --completion 2048

CPU: the peak resident set (``getrusage`` max RSS) and its rise over the process's state before
the step (model, optimizer-free, batch); GPU: ``torch.cuda.max_memory_allocated``. ``wide-tiny``
is a 2-layer model with SmolLM2's 49,152-token vocabulary and random weights: the logits'
memory without the cost of a real model.

``--sync`` measures a weight sync instead (the trainer's weights into the rollout engine, after
an optimizer step), as the code did before issue 15 (every merged LoRA tensor or every gathered
FSDP2 tensor in one list, the gradients kept until the next step) and as it does now (streamed
one tensor at a time, gradients freed after the step):

    python -m rl.benchmarks.memory --sync                            # SmolLM2: LoRA, and FSDP2

The engine is a stand-in for vLLM's in-place reload: a whole copy of the model that each pushed
tensor is copied into. The memory is the resident set above the weights, the engine's copy and
AdamW's state: after the update (the gradients) and at its highest during the sync, read at
each tensor the engine takes; on the CPU, with every tensor of 128 KiB or more in its own
mapping (``MALLOC_MMAP_THRESHOLD_``), so the resident set follows the live tensors. FSDP2 runs
two processes over gloo (rank 0's figures).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
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
    parser.add_argument("--sync", action="store_true", help="measure a weight sync instead")
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
    if args.sync:
        sync_main(args, argv)
        return
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


# ---------------------------------------------------------------------- weight sync

SYNC_VARIANTS = {
    "LoRA, before": {"scheme": "lora", "streamed": False},
    "LoRA, after": {"scheme": "lora", "streamed": True},
    "FSDP2, before": {"scheme": "fsdp2", "streamed": False},
    "FSDP2, after": {"scheme": "fsdp2", "streamed": True},
}


def sync_main(args: argparse.Namespace, argv: list[str] | None) -> None:
    if args.variant is not None:
        print(json.dumps(measure_sync(args)))
        return
    print(
        f"weight sync, model {args.model}: memory above the weights, the engine's copy and "
        "AdamW's state (MiB); one fresh process each"
    )
    print(f"{'variant':<16} {'after update':>13} {'sync peak':>10} {'seconds':>8}")
    base = [sys.executable, "-m", "rl.benchmarks.memory", *(argv or sys.argv[1:])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    for variant in SYNC_VARIANTS:
        done = subprocess.run(
            [*base, "--variant", variant], capture_output=True, text=True, check=False, env=env
        )
        if done.returncode != 0:
            print(f"{variant:<16} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{variant:<16} {result['after_update_mib']:>13.0f} {result['sync_peak_mib']:>10.0f} "
            f"{result['seconds']:>8.1f}"
        )
    print(
        "before: merged or gathered tensors in one list, gradients kept until the next step; "
        "after: streamed, gradients freed after the optimizer step"
    )


def resident_mib() -> float:
    """The process's resident set now (not its peak), after returning freed heap memory."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class InPlaceEngine:
    """vLLM's in-place reload, as far as memory goes: each pushed tensor copied into a whole copy
    of the model (peft names, LoRA merged, as ``VLLMEngine.update_weights`` pushes them)."""

    def __init__(self, model, lora_scaling: float | None, streamed: bool):
        self.own = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.lora_scaling, self.streamed, self.samples = lora_scaling, streamed, []

    def update_weights(self, named_tensors, version: int) -> None:
        from rollouts.weights import vllm_named_tensors

        weights = vllm_named_tensors(named_tensors, True, self.lora_scaling)
        if not self.streamed:  # the code before: every tensor of the push at once
            weights = list(weights)
        for name, tensor in weights:
            if name in self.own:
                self.own[name].copy_(tensor)
            self.samples.append(resident_mib())


def measure_sync(args: argparse.Namespace) -> dict[str, float]:
    settings = SYNC_VARIANTS[args.variant]
    if settings["scheme"] == "lora":
        return _sync_run(0, 1, args, settings, None)
    import torch.multiprocessing as mp

    port = _free_port()
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_sync_worker, args=(2, port, args, settings, results), nprocs=2, join=True)
    return results.get()


def _sync_worker(rank, world, port, args, settings, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _sync_run(rank, world, args, settings, results)
        if rank == 0:
            results.put(result)
    finally:
        torch.distributed.destroy_process_group()


def _sync_run(rank, world, args, settings, results) -> dict[str, float]:
    """One training step then one sync, as the trainer runs them in each variant."""
    from rl.config import LoraConfig
    from rl.distributed import Distributed
    from rl.models import load_policy, resolve_model
    from rl.schemes import DataParallel
    from rl.sharded import FSDP2

    torch.manual_seed(0)
    torch.set_num_threads(1)
    lora = LoraConfig(enabled=True) if settings["scheme"] == "lora" else None
    model = load_policy(resolve_model(args.model), "float32", lora)
    engine = InPlaceEngine(model, lora.alpha / lora.r if lora else None, settings["streamed"])
    if lora is None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # as accelerate's TRANSFORMER_BASED_WRAP
            fully_shard(layer)
        fully_shard(model)
        scheme = FSDP2(Distributed(rank=rank, world_size=world))
    else:
        scheme = DataParallel()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(rank))

    def update(free_gradients: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if free_gradients:
            optimizer.zero_grad(set_to_none=True)

    update(free_gradients=True)  # AdamW's state exists from here on, in both variants
    baseline = resident_mib()
    clock = time.perf_counter()
    update(free_gradients=settings["streamed"])
    after_update = resident_mib()
    weights = scheme.whole_weights(model)
    if not settings["streamed"]:  # the code before: full_parameters gathered every tensor
        weights = list(weights)
    engine.update_weights(weights, version=1)
    seconds = time.perf_counter() - clock
    return {
        "after_update_mib": after_update - baseline,
        "sync_peak_mib": max(engine.samples) - baseline,
        "seconds": seconds,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
