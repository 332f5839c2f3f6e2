"""Tool-use learning benchmark: does the embedded SmolLM2-135M learn to use the calculator?

configs/tools.yaml, in four stages, each timed (wall clock and CPU seconds of this process and
its finished children: the figure that does not depend on how busy the machine is):

1. the base rate: held-out accuracy of the base model without the tool (single turn) and with
   it (does it call the tool at all?);
2. warm-up data: a dozen tool-use conversations written from a template on training rows
   (levels 4-5, never the held-out ones): the question, a ``<tool_call>`` to the calculator
   with the right expression, its result, and "The answer is N." (R1's cold start: the base
   model never calls a tool, so RL alone has nothing to reinforce);
3. the warm-up: `aha distill sft` on them (a call turn and an answer turn per conversation),
   3 steps only (WARMUP below), so that RL starts from a model that calls the tool but is
   often wrong;
4. RL: `aha train configs/tools.yaml` from the warm-up's checkpoint; its held-out evaluations
   before and after are the post-warm-up and post-RL figures.

    python -m rl.benchmarks.tool_learning                       # the full run
    python -m rl.benchmarks.tool_learning --steps 2 --eval-size 8 --examples 8 --sft-steps 2
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tools.yaml"
# The cold start, kept short on purpose so that RL has something left to learn: after 3 steps
# of 8 rows the model calls the calculator almost always but writes the right expression for
# only about half the problems (it drops the "+ c" of the two-step ones), so RL's groups differ
# in reward. Measured on held-out prompts after each SFT step (12 conversations, lr 1e-4):
# right expression 0 / 10 / 12 / 17 / 24 of 24 after 1 / 2 / 3 / 4 / 5 steps; the earlier 40
# conversations x 16 steps of 16 left RL all-correct groups and no advantage at all.
WARMUP = {"examples": 12, "steps": 3, "batch": 8, "lr": 1e-4}


class Clock:
    """Wall-clock and CPU seconds (this process's threads and its reaped children) of a stage."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = _cpu_seconds() - self.cpu

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1)}


def _cpu_seconds() -> float:
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def warmup_conversations(config, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` tool-use conversations on training rows of the config's levels, each as two
    SFT rows (the call turn; the answer turn after the result), with the system turn exactly as
    the turn loop renders it (the Hermes tool description appended)."""
    from rl import multiturn
    from rl.models import load_tokenizer, resolve_model
    from rl.tasks.arithmetic import load_arithmetic
    from rollouts.agent.chat import ChatFormat

    tokenizer = load_tokenizer(resolve_model(config.model.name))
    agent = multiturn.prepare(config, tokenizer)
    chat = ChatFormat(tokenizer, [t.schema for t in agent.tools], config.rollout.tool_call_format)
    calculator = {t.name: t.fn for t in agent.tools}["calculator"]
    levels = tuple(config.data.task_options.get("levels", (4, 5)))
    rows = load_arithmetic("train", seed=seed, size=count, levels=levels)
    out = []
    for row in rows:
        numbers = [int(n) for n in re.findall(r"\d+", row["prompt"])]
        expression = " * ".join(map(str, numbers[:2])) + "".join(f" + {n}" for n in numbers[2:3])
        value = calculator(expression)
        assert value == row["answer"], (row, expression, value)
        call = {"name": "calculator", "arguments": {"expression": expression}}
        messages = chat.conversation(
            [
                {"role": "system", "content": config.data.system_prompt},
                {"role": "user", "content": row["prompt"]},
            ]
        )
        call_turn = {
            "role": "assistant",
            "content": f"<tool_call>\n{json.dumps(call)}\n</tool_call>",
        }
        result = {"role": "tool", "name": "calculator", "content": value}
        answer = {"role": "assistant", "content": f"The answer is {value}."}
        out.append({"messages": [*messages, call_turn], "answer": row["answer"]})
        out.append({"messages": [*messages, call_turn, result, answer], "answer": row["answer"]})
    return out


def evaluate_base(config) -> dict[str, dict[str, float]]:
    """Held-out accuracy of the config's model, greedy, without its tools (the sampling engine
    alone: one turn) and with them (the turn loop around that engine): one engine, one start."""
    from rl import setup
    from rl.data import load_prompts, required_columns
    from rl.evaluate import eval_sampling, evaluate

    rewards = setup.build_rewards(config)
    model, tokenizer, folder = setup.load_frozen_policy(config)
    with_tools = setup.frozen_engine(config, model, tokenizer, folder)
    data = config.data
    needed = required_columns([r.fn for r in rewards])
    prompts = load_prompts(
        data.dataset, data.eval_split, tokenizer, data, needed, config.train.seed, data.eval_size
    )
    sampling = eval_sampling(config.rollout, 1)
    out = {}
    try:
        for name, engine in (
            ("base_without_tool", with_tools.engine),
            ("base_with_tool", with_tools),
        ):
            with Clock() as clock:
                metrics = evaluate(
                    engine, prompts, rewards, sampling, batch_size=config.rollout.batch_size
                ).metrics
            out[name] = {**_eval_summary(metrics), **clock.as_dict()}
            print(f"{name}: {out[name]}", flush=True)
    finally:
        with_tools.close()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m rl.benchmarks.tool_learning", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--examples", type=int, default=WARMUP["examples"], help="warm-up conversations"
    )
    parser.add_argument(
        "--sft-steps", type=int, default=WARMUP["steps"], help="warm-up optimizer steps"
    )
    parser.add_argument(
        "--sft-batch", type=int, default=WARMUP["batch"], help="warm-up rows per step"
    )
    parser.add_argument("--sft-lr", type=float, default=WARMUP["lr"], help="warm-up learning rate")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default: config's)")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out prompts")
    parser.add_argument("--skip-base", action="store_true", help="no base-model evaluations")
    parser.add_argument("--run-root", type=Path, default=None, help="default: runs/tools-<time>")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    args = parser.parse_args(argv)

    from rl.config import load_config
    from rl.distill.sft import run_sft
    from rl.run import train

    root = args.run_root or Path("runs") / f"tools-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    extra = list(args.set)
    if args.eval_size is not None:
        extra.append(f"data.eval_size={args.eval_size}")
    config = load_config(CONFIG, extra)
    report: dict[str, Any] = {"config": str(CONFIG), "overrides": extra}

    with Clock() as whole:
        if not args.skip_base:
            with Clock() as clock:
                report.update(evaluate_base(config))
            report["base"] = clock.as_dict()  # both evaluations, the engine's start included

        data = root / "warmup.jsonl"
        rows = warmup_conversations(config, args.examples, seed=config.train.seed + 1)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sft_overrides = [
            *extra,
            f"train.steps={args.sft_steps}",
            f"train.learning_rate={args.sft_lr}",
            f"run_dir={root / 'warmup'}",
            "train.save_every=0",
            f"distill.batch_size={args.sft_batch}",
            f"train.micro_batch_size={min(args.sft_batch, config.train.micro_batch_size)}",
        ]
        with Clock() as clock:
            run_sft(load_config(CONFIG, sft_overrides), str(data), str(CONFIG), progress=False)
        checkpoint = root / "warmup" / "checkpoints" / f"step-{args.sft_steps}"
        report["warmup"] = {
            "conversations": args.examples,
            "rows": len(rows),
            "steps": args.sft_steps,
            "rows_per_step": args.sft_batch,
            "learning_rate": args.sft_lr,
            **clock.as_dict(),
        }
        print(f"warmup: {report['warmup']}", flush=True)

        rl_overrides = [*extra, f"model.name={checkpoint}", f"run_dir={root / 'rl'}"]
        if args.steps is not None:
            rl_overrides.append(f"train.steps={args.steps}")
        with Clock() as clock:
            summary = train(load_config(CONFIG, rl_overrides), str(CONFIG), progress=False)
        report["after_warmup"] = _eval_summary(summary.eval_before or {})
        report["after_rl"] = _eval_summary(summary.eval_after or {})
        report["rl"] = {"steps": summary.steps, **clock.as_dict(), **_train_tools(root / "rl")}
    report["total"] = whole.as_dict()
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    print(table(report), flush=True)
    return report


def table(report: dict[str, Any]) -> str:
    """The report's held-out figures as docs/multiturn.md's table (markdown)."""
    lines = [
        "| stage | held-out accuracy | well-formed tool call | turns per trajectory |",
        "|---|---|---|---|",
    ]
    names = {
        "base_without_tool": "base model, no tool",
        "base_with_tool": "base model, calculator offered",
        "after_warmup": "after the warm-up",
        "after_rl": "after RL",
    }
    for key, name in names.items():
        if key in report:
            m = report[key]
            call = m.get("tools/well_formed_frac")
            turns = m.get("tools/turns/mean", 1.0)
            lines.append(
                f"| {name} | {m['accuracy']:.2f} | {'-' if call is None else f'{call:.2f}'} "
                f"| {turns:.2f} |"
            )
    return "\n".join(lines)


def _eval_summary(metrics: dict[str, float]) -> dict[str, float]:
    keys = ("accuracy", "tools/well_formed_frac", "tools/turns/mean", "tools/calls/mean")
    return {k: round(metrics[k], 3) for k in keys if k in metrics}


def _train_tools(run_dir: Path) -> dict[str, Any]:
    """The training trajectories' tool use: first and last step, and every step's, in order."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    keys = ("reward/mean", "tools/well_formed_frac", "tools/turns/mean", "frac_reward_zero_std")
    out: dict[str, Any] = {
        f"train_{when}": {k: round(m[k], 3) for k in keys if k in m}
        for when, m in (("first", steps[0]), ("last", steps[-1]))
    }
    for key in keys:
        out[f"per_step/{key}"] = [round(m[key], 3) for m in steps if key in m]
    return out


if __name__ == "__main__":
    main()
