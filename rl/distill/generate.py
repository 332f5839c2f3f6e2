"""`aha distill generate`: the teacher's verified traces, R1's rejection sampling.

The teacher samples ``distill.samples`` traces for each prompt of ``data.dataset`` /
``data.split`` with the configured rollout engine, the config's rewards grade every trace
(rl/scoring.py, as in training), and the ones ``select_traces`` keeps are written as a dataset
of chat messages with the teacher's rewards beside them, and a summary.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rl.config import Config, ConfigError
from rl.distill.traces import (
    DROP_REASONS,
    DistillError,
    Trace,
    check_out_dir,
    select_traces,
    trace_row,
    write_dataset,
)
from rollouts.base import SamplingSettings
from rollouts.record import Rollout


def trace_score(rollout: Rollout, first_reward: str, which: str) -> float:
    """What distill.min_reward is compared with: the first reward's value (NaN when it does
    not apply to this row) or the weighted total."""
    if which == "total":
        return rollout.reward
    value = rollout.rewards.get(first_reward)
    return math.nan if value is None else value


def generate(
    config: Config, teacher: str, out: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Sample, grade, keep and write; returns the summary (also out/summary.json)."""
    import torch
    from tqdm import tqdm

    from rl import setup
    from rl.data import load_prompts, required_columns
    from rl.distill.teacher import load_teacher, teacher_engine
    from rl.scoring import score
    from rl.trainer import seed_everything

    started = time.time()
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "aha distill generate runs in one process (not under accelerate launch or torchrun); "
            "a teacher too big for one device goes on a vLLM server: teacher=http://HOST:PORT"
        )
    check_out_dir(out)  # before minutes of sampling, not after
    setup.quiet_transformers()
    seed_everything(config.train.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    rewards = setup.build_rewards(config)
    loaded = load_teacher(config, teacher)
    data, distill, r = config.data, config.distill, config.rollout
    prompts = load_prompts(
        data.dataset,
        data.split,
        loaded.tokenizer,
        data,
        required_columns([reward.fn for reward in rewards]),
        config.train.seed,
        distill.max_prompts or None,
    )
    sampling = SamplingSettings(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_tokens=r.max_tokens,
        stop=tuple(r.stop),
    )
    k = distill.samples
    per_call = max(r.batch_size // k, 1)  # prompts per generate(): about rollout.batch_size rows
    rollouts: list[Rollout] = []
    passed = 0
    engine = teacher_engine(loaded)
    try:
        with tqdm(
            total=len(prompts), desc="teacher", unit="prompt", disable=not progress, leave=False
        ) as bar:
            for start in range(0, len(prompts), per_call):
                chunk = engine.generate(prompts[start : start + per_call], k, sampling)
                score(chunk, rewards)  # each reward with its own timeout
                rollouts += chunk
                passed += sum(
                    trace_score(x, rewards[0].name, distill.reward) >= distill.min_reward
                    for x in chunk
                )
                bar.update(len(chunk) // k)
                bar.set_postfix(pass_rate=f"{passed / len(rollouts):.3f}", refresh=False)
    finally:
        engine.close()

    traces = [
        Trace(
            prompt=x.prompt.index,
            sample=i % k,
            text=x.response,
            score=trace_score(x, rewards[0].name, distill.reward),
            tokens=len(x.completion_ids),
            truncated=x.truncated,
        )
        for i, x in enumerate(rollouts)
    ]
    kept, dropped = select_traces(traces, distill)
    by_trace = {(x.prompt.index, i % k): x for i, x in enumerate(rollouts)}
    rows = []
    for trace in kept:
        rollout = by_trace[(trace.prompt, trace.sample)]
        rows.append(
            trace_row(
                list(rollout.prompt.messages),
                rollout.response,
                rollout.reward,
                rollout.rewards,
                trace.prompt,
                trace.tokens,
                rollout.prompt.row.get("answer"),
            )
        )
    graded_by = f"first reward {rewards[0].name!r}" if distill.reward == "first" else "total reward"
    summary = _summary(config, loaded, prompts, traces, kept, dropped, passed, graded_by)
    summary["seconds"] = round(time.time() - started, 1)
    if not rows:
        raise DistillError(
            f"no trace kept: {passed} of {len(traces)} teacher traces ({len(prompts)} prompts x "
            f"{k}) had {graded_by} >= distill.min_reward={distill.min_reward:g}"
            f"{_dropped_text(dropped)}; nothing written to {out}"
        )
    write_dataset(rows, summary, out)
    _print_summary(summary, graded_by, out)
    return summary


def _summary(config, loaded, prompts, traces, kept, dropped, passed, graded_by) -> dict[str, Any]:
    per_prompt = Counter(t.prompt for t in kept)
    histogram = Counter(per_prompt.get(p.index, 0) for p in prompts)
    distill = config.distill
    return {
        "teacher": loaded.target,
        "teacher_checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
        "dataset": config.data.dataset,
        "split": config.data.split,
        "response_prefix": config.data.response_prefix,
        "prompts": len(prompts),
        "samples_per_prompt": distill.samples,
        "traces": len(traces),
        "graded_by": graded_by,
        "min_reward": distill.min_reward,
        "passed": passed,  # traces whose reward reached min_reward, before the other checks
        "pass_rate": passed / max(len(traces), 1),
        "keep": distill.keep,
        "kept": len(kept),
        "prompts_with_a_kept_trace": len(per_prompt),
        "kept_per_prompt": {str(n): histogram[n] for n in sorted(histogram)},  # n: prompts
        "dropped": {reason: dropped[reason] for reason in DROP_REASONS if dropped[reason]},
        "tokens_sampled": sum(t.tokens for t in traces),
        "tokens_kept": sum(t.tokens for t in kept),
    }


def _dropped_text(dropped: Counter) -> str:
    parts = [f"{dropped[reason]} {reason}" for reason in DROP_REASONS if dropped[reason]]
    return f" (dropped: {', '.join(parts)})" if parts else ""


def _print_summary(summary: dict[str, Any], graded_by: str, out: Path) -> None:
    kept, prompts = summary["kept"], summary["prompts"]
    spread = ", ".join(
        f"{n} for {count} prompt{'s' if count > 1 else ''}"
        for n, count in summary["kept_per_prompt"].items()
    )
    lines = [
        f"Teacher traces: {summary['traces']} for {prompts} prompts; {summary['passed']} had "
        f"{graded_by} >= {summary['min_reward']:g} (pass rate {summary['pass_rate']:.3f})",
        f"Kept {kept} traces ({summary['keep']}) for {summary['prompts_with_a_kept_trace']} of "
        f"{prompts} prompts (traces kept per prompt: {spread})",
        "Dropped: "
        + (", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items()) or "none"),
        f"Tokens: {summary['tokens_sampled']} sampled, {summary['tokens_kept']} kept "
        f"({summary['tokens_kept'] / max(kept, 1):.1f} per kept trace)",
        f"Dataset in {out} (datasets.load_from_disk, or load_dataset('json', "
        f"data_files='{out}/traces.jsonl')); summary in {out}/summary.json",
    ]
    print("\n".join(lines), flush=True)
