"""A training run: its folder, set-up, loop, checkpoints, logs and held-out evaluation."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl.checkpoint import RunFolderError
from rl.config import Config, ConfigError, config_to_yaml
from rl.jsonl import read_jsonl

if TYPE_CHECKING:
    from rl.runfolder import RunFolder


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    seconds: float


def _append_json(path: Path, record: dict[str, Any]) -> None:
    try:
        with path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
    except OSError as error:  # a full disk: the line may be cut short, which a resume drops
        raise RunFolderError(
            f"could not write {path}: {error.strerror}; the last checkpoint is intact: "
            f"free the space and resume={path.parent}"
        ) from None


def train(config: Config, config_path: str | None = None, progress: bool = True) -> RunSummary:
    """Set up from the config and run the loop to config.train.steps. Under ``accelerate launch``
    (or torchrun) every process runs this; rank 0 alone writes files and evaluates."""
    from rl import distributed

    dist = distributed.init()  # one process: no process group, no distributed calls
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, released however it ends
            return _train(config, config_path, progress, dist, held)
    finally:
        distributed.close(dist)


def _train(
    config: Config, config_path: str | None, progress: bool, dist, held: contextlib.ExitStack
) -> RunSummary:
    from rl import setup
    from rl.checkpoint import load_trainer_state
    from rl.data import batches
    from rl.distributed import barrier, check_world, describe, shard
    from rl.perf import reset_peak_memory, step_perf
    from rl.trainer import check_nonfinite_steps, sync_engine, train_step

    started = time.time()
    # A resume's config is the run's own, with only the keys a resume may change (load_config
    # resolves resume=; the run folder refuses any other change).
    check_world(config, dist)
    main = dist.is_main
    if main and dist.enabled:
        print(f"Training on {dist.world_size} processes: {describe(dist)}", flush=True)
    folder = _shared_run_dir(config, config_path, dist, held)
    run_dir, checkpoint = folder.path, folder.checkpoint
    if checkpoint is not None and not (checkpoint / "trainer_state.pt").is_file():
        raise ConfigError(
            f"resume: {checkpoint} holds no RL trainer state (an `aha distill sft` run); continue "
            f"it with `aha distill sft resume={run_dir}`, or start RL from it with "
            f"model.name={checkpoint}"
        )
    if main:
        for note in folder.notes:
            print(note, flush=True)
        _write(run_dir / "config.yaml", config_to_yaml(replace(config, resume=None)))
    from rl.tracking import Trackers, check_installed, open_trackers

    check_installed(config.tracking)  # a missing tracker package fails before the model loads

    parts = setup.build(config, checkpoint, dist)
    tracker = open_trackers(config, run_dir) if main else Trackers({})
    trainer = parts.trainer
    eval_before = eval_after = None
    if checkpoint is not None:
        state, payload = load_trainer_state(checkpoint)
        trainer.scheme.load_optimizer_state(trainer.model, trainer.optimizer, payload["optimizer"])
        trainer.scheduler.load_state_dict(payload["scheduler"])
        _restore_rng(payload, dist, config.train.seed)
        trainer.step = state["step"]
        sync_engine(trainer)
        eval_before = state.get("eval_before")
        if main:
            done = trainer.step >= config.train.steps
            finished = f": it is done at train.steps={config.train.steps}" if done else ""
            print(f"Resuming {run_dir} from {checkpoint.name}{finished}", flush=True)
    elif parts.eval_prompts:
        if main:
            eval_before = _evaluate(
                trainer, parts.eval_prompts, run_dir, "before training", tracker
            )
        barrier(dist)

    stream = batches(
        parts.train_prompts,
        config.train.prompts_per_step,
        config.train.seed,
        start_batch=trainer.step,
    )
    bar = _progress(config.train.steps, trainer.step, progress and main)
    extra = {"eval_before": eval_before}
    device = next(trainer.model.parameters()).device
    while trainer.step < config.train.steps:
        clock = time.perf_counter()
        reset_peak_memory(device)
        # every rank draws the same global batch and keeps its share of whole groups
        metrics = train_step(
            trainer, shard(next(stream), dist), more_prompts=lambda: shard(next(stream), dist)
        )
        metrics["timing_s/step"] = time.perf_counter() - clock
        metrics.update(step_perf(metrics, trainer.model, dist.world_size))
        if main:
            _log_step(trainer, metrics, run_dir, tracker)
        check_nonfinite_steps(trainer, run_dir)  # before a checkpoint: the last good one stays
        last = trainer.step == config.train.steps
        if last or (config.train.save_every and trainer.step % config.train.save_every == 0):
            save_step(trainer, run_dir, dist, extra, config.train.keep_checkpoints)
        every = config.data.eval_every
        if parts.eval_prompts and every and trainer.step % every == 0 and not last:
            if main:
                _evaluate(trainer, parts.eval_prompts, run_dir, f"at step {trainer.step}", tracker)
            barrier(dist)
        bar.update(1)
        bar.set_postfix(
            reward=f"{metrics['reward/mean']:.3f}",
            step_s=f"{metrics['timing_s/step']:.1f}",
            refresh=False,
        )
    bar.close()

    if parts.eval_prompts and main:  # a finished run resumed: its logged final evaluation
        eval_after = folder.final_eval or _evaluate(
            trainer, parts.eval_prompts, run_dir, "after training", tracker
        )
    trainer.engine.close()
    tracker.close()
    summary = RunSummary(run_dir, trainer.step, eval_before, eval_after, time.time() - started)
    barrier(dist)
    if not main:
        return summary
    _write(
        run_dir / "summary.json",
        json.dumps(
            {
                "steps": summary.steps,
                "seconds": round(summary.seconds, 1),
                "eval_before": eval_before,
                "eval_after": eval_after,
            },
            indent=2,
        ),
    )
    _write_plots(run_dir)
    print_summary(summary, run_dir)
    return summary


def save_step(trainer, run_dir: Path, dist, extra: dict[str, Any], keep: int) -> None:
    """RUN_DIR/checkpoints/step-N for the trainer's step. Every rank takes part: under FSDP2 and
    DeepSpeed the whole weights and optimizer state are gathered to rank 0, with every rank's
    RNG state; rank 0 alone writes."""
    from rl.checkpoint import rng_state, save_checkpoint
    from rl.distributed import barrier, gather_objects

    rng_ranks = gather_objects(dist, rng_state()) if dist.enabled else None
    weights = trainer.scheme.full_state_dict(trainer.model)
    optimizer_state = trainer.scheme.full_optimizer_state(trainer.model, trainer.optimizer)
    if dist.is_main:
        save_checkpoint(
            run_dir,
            trainer.step,
            trainer.model,
            trainer.tokenizer,
            trainer.optimizer,
            trainer.scheduler,
            extra,
            keep,
            rng_ranks=rng_ranks,
            model_state=weights,
            optimizer_state=optimizer_state,
        )
    barrier(dist)


def _shared_run_dir(config: Config, config_path: str | None, dist, held) -> RunFolder:
    """Rank 0 makes the run folder ready and locks it until the run ends (``held``), and tells
    the others where it is and what checkpoint to load, or tells them its error."""
    from rl.distributed import broadcast_object
    from rl.runfolder import RunFolder, open_run_folder

    folder = None
    chosen: tuple[str, str | None] | Exception | None = None
    if dist.is_main:
        try:
            folder = open_run_folder(config, config_path)
            held.callback(folder.lock.release)
            chosen = (str(folder.path), folder.checkpoint and str(folder.checkpoint))
        except (ConfigError, RunFolderError) as error:
            chosen = error
    chosen = broadcast_object(dist, chosen)
    if isinstance(chosen, Exception):
        raise chosen
    if folder is None:
        path, checkpoint = chosen
        folder = RunFolder(Path(path), checkpoint and Path(checkpoint))
    return folder


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise RunFolderError(f"could not write {path}: {error.strerror}") from None


def _restore_rng(payload: dict[str, Any], dist, seed: int) -> None:
    """Each rank's own RNG state when the checkpoint has one per rank (same world size)."""
    from rl.checkpoint import set_rng_state

    per_rank = payload.get("rng_ranks")
    if per_rank and len(per_rank) == dist.world_size:
        set_rng_state(per_rank[dist.rank])
        return
    set_rng_state(payload["rng"])
    if dist.rank > 0:  # another world size: rank 0's state, offset so ranks still differ
        import numpy as np
        import torch

        offset = seed + dist.rank + int(torch.randint(1 << 30, ()).item())
        torch.manual_seed(offset)
        np.random.seed(offset % 2**32)


def _log_step(trainer, metrics: dict[str, float], run_dir: Path, tracker) -> None:
    config = trainer.config
    _append_json(run_dir / "metrics.jsonl", {"step": trainer.step, **metrics})
    tracker.log(metrics, trainer.step)
    if trainer.step % config.train.sample_log_every == 0:
        logged = [
            {"step": trainer.step, **s} for s in trainer.samples[: config.train.samples_per_log]
        ]
        for sample in logged:
            _append_json(run_dir / "samples.jsonl", sample)
        tracker.log_samples(logged, trainer.step)


def _write_plots(run_dir: Path) -> None:
    """RUN_DIR/plots/*.png; a plotting failure is a warning, never a failed run."""
    try:
        from rl.plot import plot_runs

        plot_runs([run_dir], run_dir / "plots")
    except Exception as error:  # noqa: BLE001 - the run itself is done and saved
        print(f"warning: could not write plots ({type(error).__name__}: {error})", file=sys.stderr)


def _evaluate(trainer, prompts, run_dir: Path, when: str, tracker=None) -> dict[str, float]:
    """Held-out accuracy with the training rewards (greedy, or pass@1 over data.eval_samples
    completions at the training temperature), logged as eval/* at this step."""
    from rl.evaluate import eval_sampling, evaluate

    n = trainer.config.data.eval_samples
    sampling = eval_sampling(trainer.config.rollout, n)
    how = "greedy" if n == 1 else f"pass@1 of {n} samples at temperature {sampling.temperature:g}"
    print(f"Held-out evaluation {when} ({len(prompts)} prompts, {how})...", flush=True)
    metrics = evaluate(
        trainer.engine,
        prompts,
        trainer.rewards,
        sampling,
        n=n,
        batch_size=trainer.config.rollout.batch_size,
    ).metrics
    record = {f"eval/{k}": v for k, v in metrics.items()}
    _append_json(run_dir / "metrics.jsonl", {"step": trainer.step, **record})
    if tracker is not None:
        tracker.log(record, trainer.step)
    print(f"  held-out accuracy {when}: {metrics['accuracy']:.3f} ({how})", flush=True)
    return metrics


def _progress(total: int, done: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=done,
        desc="train",
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def print_summary(summary: RunSummary, run_dir: Path) -> None:
    lines = [f"Run folder: {run_dir}", f"Steps: {summary.steps} in {summary.seconds / 60:.1f} min"]
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        steps = read_jsonl(metrics_path)
        rewards = [s["reward/mean"] for s in steps if "reward/mean" in s]
        if rewards:
            head, tail = rewards[: max(len(rewards) // 4, 1)], rewards[-max(len(rewards) // 4, 1) :]
            lines.append(
                f"Train reward: {sum(head) / len(head):.3f} (first quarter) -> {sum(tail) / len(tail):.3f} (last quarter)"
            )
    if summary.eval_before is not None and summary.eval_after is not None:
        lines.append(
            f"Held-out accuracy: {summary.eval_before['accuracy']:.3f} before -> {summary.eval_after['accuracy']:.3f} after"
        )
    elif summary.eval_after is not None:
        lines.append(f"Held-out accuracy after: {summary.eval_after['accuracy']:.3f}")
    print("\n".join(lines), flush=True)


__all__ = ["RunSummary", "config_to_yaml", "train"]
