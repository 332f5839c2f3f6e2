"""aha's training step against TRL 1.16's GRPOTrainer at equal settings, on this machine.

    python -m rl.benchmarks.vs_trl                       # SmolLM2, 2 prompts x 4, 64 tokens
    python -m rl.benchmarks.vs_trl --steps 5 --rounds 2  # TRL, aha, TRL, aha: steps pooled
    python -m rl.benchmarks.vs_trl --model tiny-random --steps 8

Same model (fp32), same prompts (the arithmetic task's first training rows, chat-templated by
the same tokenizer), same reward function (``tag_count``, cheap and pure, so the step's cost is
the model's), group size, completion length, generation batch (prompts x group in one
``generate`` call, one optimizer step per generation batch), learning rate, gradient clipping,
beta 0, the GRPO loss, transformers generation (TRL: ``use_vllm=False``, its ``model.generate``;
aha: ``rollout.engine=transformers``, aha's own decode loop over the same transformers model,
same sampling distribution), ``bf16=False``, no gradient
checkpointing on either side (TRL's default turns it on), the same torch threads. Each trainer
runs in its own fresh process, one after the other; the first step of each is a warm-up and
is left out. Printed: the median step time, completion tokens per second (tokens generated and
trained on), and the ratio aha / TRL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion length cap")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run TRL then aha this many times and pool the steps (a shared machine's speed drifts)",
    )
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--only", choices=["aha", "trl"], default=None)
    parser.add_argument("--aha-overrides", nargs="*", default=[], help="extra aha KEY=VALUE")
    return parser.parse_args(argv)


def common_setup(args: argparse.Namespace):
    """The aha config both sides are built from (model, prompts, sampling)."""
    import torch

    from rl.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_config(
        None,
        [
            f"model.name={args.model}",
            "rewards=[{name: tag_count}]",
            "rollout.engine=transformers",  # TRL's side: transformers generate (use_vllm=False)
            f"rollout.group_size={args.group}",
            f"rollout.max_tokens={args.max_tokens}",
            "rollout.temperature=1.0",  # TRL's default
            f"rollout.batch_size={args.prompts * args.group}",
            f"train.prompts_per_step={args.prompts}",
            f"train.micro_batch_size={args.prompts * args.group}",
            f"train.learning_rate={args.lr:.3e}",  # YAML reads 1e-06 as a string
            "train.save_every=0",
            "data.eval_size=0",
            *args.aha_overrides,
        ],
    )


def run_aha(args: argparse.Namespace) -> dict:
    from rl import setup
    from rl.trainer import train_step

    config = common_setup(args)
    parts = setup.build(config)
    seconds, cpu_seconds, tokens, parts_s = [], [], [], []
    for step in range(args.steps + 1):
        # the dataset's rows in order, as TRL takes them with shuffle_dataset=False
        rows = parts.train_prompts[step * args.prompts : (step + 1) * args.prompts]
        clock, cpu = time.perf_counter(), time.process_time()
        metrics = train_step(parts.trainer, [replace(p, index=i) for i, p in enumerate(rows)])
        seconds.append(time.perf_counter() - clock)
        cpu_seconds.append(time.process_time() - cpu)
        tokens.append(metrics["tokens"])
        parts_s.append({k: v for k, v in metrics.items() if k.startswith("timing_s/")})
    return {
        "seconds": seconds[1:],
        "cpu_seconds": cpu_seconds[1:],
        "tokens": tokens[1:],
        "timings": parts_s[1:],
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import get_reward
    from rl.data import load_prompts, required_columns
    from rl.models import load_tokenizer, resolve_model

    config = common_setup(args)
    folder = resolve_model(config.model.name)
    tokenizer = load_tokenizer(folder)
    reward = get_reward("tag_count")
    prompts = load_prompts(
        config.data.dataset,
        config.data.split,
        tokenizer,
        config.data,
        required_columns([reward]),
        config.train.seed,
    )[: args.prompts * (args.steps + 1)]
    dataset = Dataset.from_list([{"prompt": p.messages, **p.row} for p in prompts])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []

        def on_step_begin(self, *_, **__):
            self.clock, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.clock)
            self.cpu_seconds.append(time.process_time() - self.cpu)

    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trl_config = GRPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group,
            max_completion_length=args.max_tokens,
            max_steps=args.steps + 1,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            adam_beta2=0.99,  # aha's default betas (0.9, 0.99)
            max_grad_norm=1.0,
            beta=0.0,
            loss_type="grpo",  # aha's default aggregation, seq_mean_token_mean
            scale_rewards="group",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            use_vllm=False,
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=config.train.seed,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=trl_config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    lengths = [
        e["completions/mean_length"]
        for e in trainer.state.log_history
        if "completions/mean_length" in e
    ]
    tokens = [length * args.prompts * args.group for length in lengths]
    return {
        "seconds": clock.seconds[1:],
        "cpu_seconds": clock.cpu_seconds[1:],
        "tokens": tokens[1:],
    }


def summary(result: dict) -> tuple[float, float]:
    """(median step seconds, completion tokens per second over the timed steps)"""
    return statistics.median(result["seconds"]), sum(result["tokens"]) / sum(result["seconds"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only is not None:  # the child: one trainer, results as JSON on the last line
        result = run_aha(args) if args.only == "aha" else run_trl(args)
        print(json.dumps(result))
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results: dict[str, dict[str, list]] = {"trl": {}, "aha": {}}
    for _ in range(args.rounds):
        for name in ("trl", "aha"):  # alternated, so a drift in machine speed hits both
            done = subprocess.run(
                [sys.executable, "-m", "rl.benchmarks.vs_trl", *forwarded, "--only", name],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
            for key, values in json.loads(done.stdout.strip().splitlines()[-1]).items():
                results[name].setdefault(key, []).extend(values)
    print(
        f"model {args.model}: {args.prompts} prompts x {args.group} completions, "
        f"<= {args.max_tokens} tokens, {args.steps} timed steps after 1 warm-up "
        f"x {args.rounds} round(s), CPU fp32"
    )
    print(f"{'':<6} {'median step s':>14} {'tokens/s':>10} {'median CPU s':>13}  steps (s)")
    for name in ("trl", "aha"):
        median, rate = summary(results[name])
        cpu = statistics.median(results[name]["cpu_seconds"])
        steps = " ".join(f"{s:.2f}" for s in results[name]["seconds"])
        print(f"{name:<6} {median:>14.2f} {rate:>10.1f} {cpu:>13.2f}  {steps}")
    timings = results["aha"]["timings"]
    medians = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
    print("aha median " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    ratio = summary(results["aha"])[0] / summary(results["trl"])[0]
    cpu_ratio = statistics.median(results["aha"]["cpu_seconds"]) / statistics.median(
        results["trl"]["cpu_seconds"]
    )
    print(f"aha / TRL median step time: {ratio:.2f} (target <= 0.5); CPU time: {cpu_ratio:.2f}")
    print("CPU time (all threads) is less sensitive to other processes than wall time")


if __name__ == "__main__":
    main()
