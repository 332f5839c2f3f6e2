"""Held-out evaluation: pass@1, pass@k and majority-vote accuracy, scored by the same reward
functions as training (so the grader and the teacher cannot drift apart)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.scoring import WeightedReward, score
from rollouts.agent.summary import turn_metrics, turn_summary
from rollouts.base import RolloutEngine, SamplingSettings
from rollouts.record import Prompt, Rollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Self-consistency (Wang et al. 2023): the most common stated answer decides; it is
    correct if the completions that stated it were. No stated answer: wrong.

    ``answers`` are the ones the correctness reward extracted (and graded as ``correct``), so
    the vote and the grader read the same answer out of each completion."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top, _ = votes.most_common(1)[0]
    return next(ok for a, ok in zip(answers, correct, strict=True) if a == top)


def eval_sampling(rollout_config, n: int, temperature: float | None = None) -> SamplingSettings:
    """How held-out completions are drawn: greedy for one per prompt, otherwise at the training
    temperature (and top-p/top-k) unless ``temperature`` says otherwise. ``rollout_config`` is
    the config's ``rollout`` section; its length cap and stop strings always apply."""
    if temperature is None:
        temperature = 0.0 if n == 1 else rollout_config.temperature
    return SamplingSettings(
        temperature=temperature,
        top_p=rollout_config.top_p if temperature > 0 else 1.0,
        top_k=rollout_config.top_k if temperature > 0 else 0,
        max_tokens=rollout_config.max_tokens,
        stop=tuple(rollout_config.stop),
    )


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rollouts: list[Rollout]


def evaluate(
    engine: RolloutEngine,
    prompts: list[Prompt],
    rewards: list[WeightedReward],
    sampling: SamplingSettings,
    n: int = 1,
    batch_size: int = 64,
    progress: bool = False,
) -> EvalResult:
    """n completions per prompt; the first reward is the correctness reward (correct = >= 1).

    Returns ``accuracy`` (mean correctness over all completions, i.e. pass@1), ``pass@k`` for
    k = n (when n > 1), ``maj@n`` (majority vote, when the correctness reward reports the answers
    it extracted: ``log_extra(ANSWER_COLUMN, ...)``), and each reward's mean and errors.
    """
    from tqdm import tqdm

    rollouts: list[Rollout] = []
    tally = _Tally()
    per_call = max(batch_size // n, 1)
    with tqdm(
        total=len(prompts), desc="eval", unit="prompt", disable=not progress, leave=False
    ) as bar:
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            generated = engine.generate(chunk, n, sampling)
            # Scored per generated chunk: a reward call of about a training batch's size, under
            # the same algorithm.reward_timeout_s (each reward carries it) as in training.
            tally.add(generated, *score(generated, rewards), rewards[0].name)
            rollouts += generated
            bar.update(len(chunk))
    first = rewards[0].name
    correct = [(r.rewards[first] or 0.0) >= 1.0 for r in rollouts]
    metrics: dict[str, float] = {"accuracy": sum(correct) / max(len(correct), 1)}
    if n > 1:
        groups = [range(i * n, (i + 1) * n) for i in range(len(prompts))]
        metrics[f"pass@{n}"] = sum(
            pass_at_k(n, sum(correct[j] for j in g), n) for g in groups
        ) / len(groups)
        # Without the grader's own answers there is no vote that agrees with it (another
        # extraction gave maj@4 = 0 beside pass@1 = 0.5): then maj@n is left out.
        if tally.answered:
            answers = tally.answers
            metrics[f"maj@{n}"] = sum(
                majority_correct([answers[j] for j in g], [correct[j] for j in g]) for g in groups
            ) / len(groups)
    metrics.update(tally.metrics(rollouts, rewards))
    metrics.update(turn_metrics(rollouts))  # tools/*: multi-turn trajectories only
    return EvalResult(metrics, rollouts)


class _Tally:
    """Sums the per-chunk scoring results into the whole evaluation's."""

    def __init__(self) -> None:
        self.answers: list[str | None] = []
        self.answered = False  # the correctness reward reported answers for some chunk
        self.errors: Counter[str] = Counter()
        self.logged: dict[str, list[tuple[float, int]]] = {}

    def add(self, rollouts: list[Rollout], metrics: dict[str, float], log, first: str) -> None:
        # A chunk the correctness reward failed on scored 0: its completions cast no vote.
        chunk_answers = log.answers.get(first)
        self.answered |= chunk_answers is not None
        self.answers += chunk_answers or [None] * len(rollouts)
        for key, value in metrics.items():
            if key.endswith("/errors"):
                self.errors[key] += value
            elif not key.startswith("reward/"):  # a log_metric: its mean, weighted by chunk
                self.logged.setdefault(key, []).append((value, len(rollouts)))

    def metrics(self, rollouts: list[Rollout], rewards: list[WeightedReward]) -> dict[str, float]:
        out: dict[str, float] = {}
        for reward in rewards:
            values = [r.rewards[reward.name] for r in rollouts]
            applicable = [v for v in values if v is not None]
            out[f"reward/{reward.name}/mean"] = (
                sum(applicable) / len(applicable) if applicable else math.nan
            )
            # Say so when the grader failed: an accuracy of 0 then means nothing.
            out[f"reward/{reward.name}/errors"] = self.errors[f"reward/{reward.name}/errors"]
        for key, parts in self.logged.items():
            out[key] = sum(v * size for v, size in parts) / sum(size for _, size in parts)
        return out


def write_eval(out_dir: Path, name: str, result: EvalResult, extra: dict[str, Any]) -> None:
    """samples-<name>.jsonl (every completion with its rewards) and summary-<name>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"samples-{name}.jsonl").open("w") as handle:
        for r in result.rollouts:
            messages = r.prompt.messages
            handle.write(
                json.dumps(
                    {
                        "prompt": messages[-1]["content"]
                        if isinstance(messages, list)
                        else messages,
                        "answer": r.prompt.row.get("answer"),
                        "completion": r.response,
                        "rewards": r.rewards,
                        "finish_reason": r.finish_reason,
                        "completion_tokens": len(r.completion_ids),
                        **turn_summary(r),
                    },
                    default=str,
                )
                + "\n"
            )
    (out_dir / f"summary-{name}.json").write_text(json.dumps({**extra, **result.metrics}, indent=2))


def run_eval(
    target: str,
    datasets: list[str],
    n: int = 1,
    limit: int | None = None,
    split: str = "test",
    temperature: float | None = None,
    out: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """`aha eval`: a run folder (its config and newest intact checkpoint) or a model, on each
    dataset. A run folder without a checkpoint is refused: its base model is scored by naming
    it (``aha eval MODEL``), never in its place without a word."""
    from datetime import datetime

    from rl import setup
    from rl.checkpoint import checkpoint_step
    from rl.config import ConfigError, load_config
    from rl.data import load_prompts, required_columns

    if n < 1:
        raise ConfigError(f"--n: must be at least 1, got {n}")
    if limit is not None and limit < 1:
        raise ConfigError(
            f"--limit: must be at least 1 (or left out for every prompt), got {limit}"
        )
    if temperature is not None and not temperature >= 0:
        raise ConfigError(f"--temperature: must be 0 (greedy) or more, got {temperature}")
    target_path = Path(target)
    checkpoint = None
    if (run_dir := setup.run_folder(target)) is not None:
        config, checkpoint = setup.load_run(run_dir, overrides)
        if checkpoint is None:
            raise ConfigError(
                f"{target}: this run folder has no intact checkpoint to score; to score its base "
                f"model, name it: aha eval {config.model.name} --dataset ..."
            )
        default_out = run_dir / "eval" / f"step-{checkpoint_step(checkpoint)}"
    else:
        config = load_config(None, [f"model.name={target}", *overrides])
        default_out = Path("evals") / f"{target_path.name or target}-{datetime.now():%Y%m%d-%H%M%S}"
    setup.quiet_transformers()
    rewards = setup.build_rewards(config)
    if not rewards:  # a pure on-policy distillation run trains without any
        raise ConfigError(
            "rewards: none to grade with (the run learns from its teacher alone); name the "
            "grader, e.g. aha eval RUN_DIR --dataset arithmetic 'rewards=[{name: math}]'"
        )
    model, tokenizer, model_folder = setup.load_frozen_policy(config, checkpoint)
    engine = setup.frozen_engine(config, model, tokenizer, model_folder)
    sampling = eval_sampling(config.rollout, n, temperature)
    needed = required_columns([r.fn for r in rewards])
    out_dir = Path(out) if out else default_out
    results: dict[str, dict[str, float]] = {}
    try:
        for name in datasets:
            prompts = load_prompts(
                name, split, tokenizer, config.data, needed, config.train.seed, limit
            )
            result = evaluate(
                engine,
                prompts,
                rewards,
                sampling,
                n=n,
                batch_size=config.rollout.batch_size,
                progress=progress,
            )
            write_eval(
                out_dir,
                Path(name).stem,
                result,
                {
                    "model": target,
                    "dataset": name,
                    "split": split,
                    "n": n,
                    "temperature": temperature,
                    "prompts": len(prompts),
                },
            )
            results[name] = result.metrics
            shown = "  ".join(
                f"{k}={v:.3f}"
                for k, v in result.metrics.items()
                if k in ("accuracy", f"pass@{n}", f"maj@{n}")
            )
            print(f"{name:12} {len(prompts):5d} prompts  {shown}", flush=True)
    finally:
        engine.close()
    print(f"Samples and summaries in {out_dir}")
    return results
