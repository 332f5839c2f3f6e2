"""Distillation benchmark: how fast does a student reach its teacher, four ways?

Teacher: the embedded SmolLM2-135M after the main job's GRPO run (configs/default.yaml, 16
steps). Student: the base SmolLM2-135M. Four runs of the student, each to the same budget:

    grpo        GRPO alone: the main job itself (the teacher's own run, evaluated as it goes)
    sft         rejection-sampling SFT: `aha distill generate` on the teacher (its sampling
                counts in the budget), then `aha distill sft` on the verified traces
    opd         on-policy distillation: the student samples, the teacher grades every token
                (algorithm.teacher, no rule reward)
    opd_reward  on-policy distillation plus the main job's rule rewards

Held-out accuracy is the main job's evaluation (64 prompts x 4 samples at temperature 0.5,
pass@1), taken every few steps; it and the start-up are not counted in a budget. The budget is
the CPU time of the runs' processes (``--budget-cpu-minutes``: a shared machine distorts wall
time) or their wall time (``--budget-minutes``); both are reported. Without either, the
budget is what the GRPO run spent on its steps.

    python -m rl.benchmarks.distill                          # everything, the teacher first
    python -m rl.benchmarks.distill --teacher runs/distill-X/grpo --budget-cpu-minutes 20
    python -m rl.benchmarks.distill --quick                  # the tiny model, in minutes

Each run is a child process: ``python -m rl.benchmarks.distill worker METHOD ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rl.benchmarks.distill_report import LABELS, plot, report, rl_curve, sft_curve

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHODS = ("grpo", "sft", "opd", "opd_reward")


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads: the in-process vLLM engine
    too) and of its children that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Budget:
    """What the measured work has spent, and when that is enough."""

    kind: str  # "cpu" or "wall"
    seconds: float | None  # None: no limit
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def add(self, cpu_s: float, wall_s: float) -> None:
        self.cpu_s += cpu_s
        self.wall_s += wall_s

    @property
    def spent(self) -> bool:
        used = self.cpu_s if self.kind == "cpu" else self.wall_s
        return self.seconds is not None and used >= self.seconds

    @contextlib.contextmanager
    def measure(self):
        cpu, wall = process_cpu_seconds(), time.perf_counter()
        try:
            yield
        finally:
            self.add(process_cpu_seconds() - cpu, time.perf_counter() - wall)


# ---------------------------------------------------------------------------------- workers


def rl_worker(config, budget: Budget, base_eval: dict | None = None) -> None:
    """``aha train`` in this process (rl.run.train: the run folder, checkpoints, held-out
    evaluations every ``data.eval_every`` steps), each training step measured: its CPU and wall
    seconds go into metrics.jsonl as ``bench/cpu_s`` and ``bench/wall_s``, and once the budget
    is spent that step becomes the run's last (checkpoint and final evaluation follow, not
    counted). ``base_eval``: the base model's evaluation (the GRPO run's ``eval/*`` before
    training), logged as this run's instead of evaluating the same model again (minutes)."""
    import rl.run
    import rl.trainer
    from rl.run import train

    evaluate = rl.run._evaluate

    def evaluate_once(trainer, prompts, run_dir, when, tracker=None):
        if base_eval is None or when != "before training":
            return evaluate(trainer, prompts, run_dir, when, tracker)
        rl.run._append_json(run_dir / "metrics.jsonl", {"step": trainer.step, **base_eval})
        print(f"  held-out accuracy {when}: {base_eval['eval/accuracy']:.3f} (the GRPO run's)")
        return {k.removeprefix("eval/"): v for k, v in base_eval.items()}

    rl.run._evaluate = evaluate_once

    step = rl.trainer.train_step

    def measured_step(trainer, prompts, more_prompts=None):
        before = (budget.cpu_s, budget.wall_s)
        with budget.measure():
            metrics = step(trainer, prompts, more_prompts)
        metrics["bench/cpu_s"] = budget.cpu_s - before[0]
        metrics["bench/wall_s"] = budget.wall_s - before[1]
        if budget.spent:
            trainer.config.train.steps = trainer.step  # rl.run ends the loop after this step
        return metrics

    rl.trainer.train_step = measured_step  # rl.run imports it when the run starts
    try:
        train(config, progress=False)
    finally:
        rl.trainer.train_step, rl.run._evaluate = step, evaluate


def sft_worker(config, teacher: str, run_dir: Path, budget: Budget, points: int) -> None:
    """Rejection-sampling SFT: the teacher's verified traces (``aha distill generate``, measured
    whole), then TRL's SFTTrainer on them (``aha distill sft``'s trainer, each step measured),
    a checkpoint at each of ``points`` even shares of the budget, the last when it is spent
    (SFT steps are short: a cadence in steps would evaluate far more often than the RL runs
    do); then each checkpoint is evaluated as the RL runs evaluate (not measured). Writes
    RUN_DIR/timeline.json."""
    from transformers import TrainerCallback

    from rl.config import ConfigError
    from rl.distill.generate import generate
    from rl.distill.sft import build_trainer, sft_arguments

    if budget.seconds is None:
        raise ValueError("sft: a budget is needed (it sets when to stop and to checkpoint)")
    run_dir.mkdir(parents=True, exist_ok=True)
    traces = run_dir / "traces"
    timeline: dict = {"method": "sft", "points": []}
    try:
        with budget.measure():
            summary = generate(config, teacher, traces, progress=False)
    except ConfigError as error:  # no trace passed: nothing to learn from
        timeline["error"] = str(error)
        (run_dir / "timeline.json").write_text(json.dumps(timeline, indent=2))
        return
    timeline["generation"] = {"cpu_s": budget.cpu_s, "wall_s": budget.wall_s, **summary}

    class Measured(TrainerCallback):
        def __init__(self):
            self.marks = [budget.seconds * k / points for k in range(1, points + 1)]

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = (process_cpu_seconds(), time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            cpu, wall = self.started
            budget.add(process_cpu_seconds() - cpu, time.perf_counter() - wall)
            step = {"step": state.global_step, "cpu_s": budget.cpu_s, "wall_s": budget.wall_s}
            timeline["points"].append(step)
            used = budget.cpu_s if budget.kind == "cpu" else budget.wall_s
            if self.marks and used >= self.marks[0]:  # the next share of the budget is spent
                control.should_save = True
                self.marks = [mark for mark in self.marks if used < mark]
            if budget.spent:
                control.should_save = control.should_training_stop = True

    config.train.save_every, config.train.keep_checkpoints = config.train.steps, 0  # Measured saves
    args = sft_arguments(config, run_dir, 1, progress=False)
    args.save_only_model = True  # the weights to evaluate; no optimizer state to resume from
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    trainer = build_trainer(config, traces, run_dir, args)
    trainer.add_callback(Measured())
    trainer.train()
    saved = {int(p.name.split("-")[1]): p for p in (run_dir / "checkpoints").glob("step-*")}
    accuracy = evaluate_checkpoints(config, saved)
    for point in timeline["points"]:
        if point["step"] in accuracy:
            point["accuracy"] = accuracy[point["step"]]
    timeline["points"] = [p for p in timeline["points"] if "accuracy" in p]
    (run_dir / "timeline.json").write_text(json.dumps(timeline, indent=2))


def evaluate_checkpoints(config, checkpoints: dict[int, Path]) -> dict[int, float]:
    """Held-out accuracy of each checkpoint (full weights of ``config.model.name``'s model) by
    the main job's evaluation: its prompts, rewards, samples and engine."""
    import torch
    from safetensors.torch import load_file

    from rl import setup
    from rl.evaluate import eval_sampling, evaluate
    from rl.models import load_policy, load_tokenizer, resolve_model

    folder = resolve_model(config.model.name)
    tokenizer = load_tokenizer(folder)
    rewards = setup.build_rewards(config)
    _, prompts = setup.build_prompts(config, tokenizer, rewards)
    model = load_policy(folder, config.model.dtype).eval()
    engine = setup.build_engine(config, model, tokenizer, folder)
    n = config.data.eval_samples
    out = {}
    for step, checkpoint in sorted(checkpoints.items()):
        with torch.no_grad():
            model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
        engine.update_weights(model.named_parameters(), version=step)
        sampling = eval_sampling(config.rollout, n)
        result = evaluate(engine, prompts, rewards, sampling, n, config.rollout.batch_size)
        out[step] = result.metrics["accuracy"]
        print(f"  {checkpoint}: held-out accuracy {out[step]:.3f}", flush=True)
    engine.close()
    return out


# ---------------------------------------------------------------------------------- the runs


def run_child(method: str, run_dir: Path, options: list[str], log: Path) -> dict[str, float]:
    """``worker METHOD`` in a child process; its own CPU seconds (getrusage of the ended child:
    start-up and evaluations included) and wall seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    clock = time.perf_counter()
    command = [sys.executable, "-m", "rl.benchmarks.distill", "worker", method]
    command += ["--run-dir", str(run_dir), *options]
    print(f"== {LABELS[method]}: {run_dir} (log: {log})", flush=True)
    # OpenMP threads that spin while they wait count the waiting as CPU time, and on a shared
    # machine they wait long (the other thread of a parallel region is descheduled): passive
    # waiting makes the CPU time the work's.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, env=env)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{method} failed (exit {done.returncode}):\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"process_cpu_s": cpu, "process_wall_s": time.perf_counter() - clock}


def evaluate_teacher_checkpoints(
    teacher: Path, copies: list[Path], root: Path, common: list[str], as_options: list[str]
) -> dict[int, float]:
    """Held-out accuracy of the teacher run's checkpoints (its own and ``copies``) at the steps
    its metrics have no evaluation for, in a child process; by step."""
    from rl.checkpoint import checkpoint_dirs, checkpoint_step
    from rl.jsonl import read_jsonl

    evaluated = {x["step"] for x in read_jsonl(teacher / "metrics.jsonl") if "eval/accuracy" in x}
    found = {checkpoint_step(c): c for c in [*checkpoint_dirs(teacher), *copies]}
    todo = {step: path for step, path in sorted(found.items()) if step not in evaluated}
    if not todo:
        return {}
    out = root / "grpo-checkpoints"
    checkpoints = [f"--checkpoint={path}" for path in todo.values()]
    run_child("evaluate", out, [*common, *as_options, *checkpoints], root / "grpo-checkpoints.log")
    return {int(k): v for k, v in json.loads((out / "accuracy.json").read_text()).items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m rl.benchmarks.distill", description=__doc__.split("\n\n")[0]
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-cpu-minutes", type=float, help="CPU minutes of training each")
    budget.add_argument("--budget-minutes", type=float, help="wall minutes of training each")
    budget.add_argument(
        "--budget-fraction", type=float, default=1.0, help="else this share of GRPO's time"
    )
    parser.add_argument(
        "--teacher", type=Path, help="a GRPO run (of this benchmark, or `aha train`): skips it"
    )
    parser.add_argument(
        "--teacher-checkpoints",
        type=Path,
        nargs="*",
        default=[],
        help="more step-N checkpoints of the teacher's run (copies: its keep_checkpoints "
        "pruned them), evaluated for GRPO's curve at steps it did not evaluate",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--run-root", type=Path, default=None, help="default: runs/distill-<time>")
    parser.add_argument("--eval-every", type=int, default=4, help="GRPO: steps between evals")
    parser.add_argument("--student-eval-every", type=int, default=2, help="OPD: steps")
    parser.add_argument("--sft-points", type=int, default=6, help="SFT: evaluations")
    parser.add_argument("--samples", type=int, default=None, help="SFT: traces per prompt (4)")
    parser.add_argument("--max-prompts", type=int, default=None, help="SFT: prompts (64)")
    parser.add_argument("--quick", action="store_true", help="the tiny model: a smoke test")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    kind = "wall" if args.budget_minutes is not None else "cpu"
    chosen = args.budget_minutes if kind == "wall" else args.budget_cpu_minutes
    root = args.run_root or Path("runs") / f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    config = CONFIGS / ("tiny.yaml" if args.quick else "default.yaml")
    common = ["--config", str(config), "--budget-kind", kind]
    sets = list(args.set)
    if args.quick:  # a random model grades 0 everywhere: keep every trace, evaluate little
        sets = ["data.eval_size=4", "data.eval_samples=2", "train.steps=3", *sets]
    as_options = [f"--set={s}" for s in sets]

    from rl.config import load_config
    from rl.jsonl import read_jsonl

    model = load_config(config, [a.removeprefix("--set=") for a in as_options]).model.name
    results: dict = {"kind": kind, "config": str(config), "model": model, "overrides": sets}
    results["runs"] = {}
    teacher = args.teacher or root / "grpo"
    if args.teacher is None:
        grpo_sets = [f"--set=data.eval_every={args.eval_every}"]
        run = run_child("grpo", teacher, [*common, *as_options, *grpo_sets], root / "grpo.log")
        results["runs"]["grpo"] = run
    results["runs"].setdefault("grpo", {})["points"] = rl_curve(teacher)
    grpo = results["runs"]["grpo"]["points"]
    results["teacher_accuracy"] = grpo[-1]["accuracy"]
    results["target"] = 0.9 * results["teacher_accuracy"]
    if chosen is None and grpo[-1][f"{kind}_s"] is None:  # a run aha train made: no CPU times
        print("The teacher's run has no CPU times (not this benchmark's): wall budgets", flush=True)
        kind = results["kind"] = "wall"
        common = ["--config", str(config), "--budget-kind", kind]
    results["budget_fraction"] = 1.0 if chosen is not None else args.budget_fraction
    budget_s = chosen * 60 if chosen is not None else args.budget_fraction * grpo[-1][f"{kind}_s"]
    results["budget_s"] = budget_s

    # every student starts as the base model, whose evaluation the GRPO run logged first
    start = grpo[0]
    base_eval = next(x for x in read_jsonl(teacher / "metrics.jsonl") if "eval/accuracy" in x)
    base_eval = {k: v for k, v in base_eval.items() if k.startswith("eval/")}
    (root / "base-eval.json").write_text(json.dumps(base_eval))
    student = [*common, "--budget-s", str(budget_s), "--teacher", str(teacher), *as_options]
    every = [f"--set=data.eval_every={args.student_eval_every}"]
    every.append(f"--base-eval={root / 'base-eval.json'}")
    samples, prompts = args.samples or (2 if args.quick else 4), args.max_prompts
    prompts = prompts or (4 if args.quick else 64)
    sft = [f"--set=distill.samples={samples}", f"--set=distill.max_prompts={prompts}"]
    if args.quick:  # a random model grades 0: keep every trace
        sft += ["--set=distill.min_reward=0", "--set=distill.keep_truncated=true"]
        sft += ["--set=distill.batch_size=4"]
    options = {
        "sft": [*sft, f"--points={args.sft_points}"],
        "opd": every,
        "opd_reward": every,
    }
    for method in [m for m in args.methods if m != "grpo"]:
        run_dir = root / method
        run = run_child(method, run_dir, [*student, *options[method]], root / f"{method}.log")
        if method == "sft":  # the base model's evaluation, still the student's when the
            # teacher's traces are ready
            generation = json.loads((run_dir / "timeline.json").read_text()).get("generation", {})
            base = [{**start, "step": 0, "cpu_s": 0.0, "wall_s": 0.0}]
            if generation:
                base.append(
                    {**base[0], "cpu_s": generation["cpu_s"], "wall_s": generation["wall_s"]}
                )
            run["points"] = [*base, *sft_curve(run_dir)]
        else:
            run["points"] = rl_curve(run_dir)
        results["runs"][method] = run
        write_report(results, kind, root)

    if args.teacher is not None:  # its checkpoints at steps it did not evaluate, last: the
        # students' runs above need only its final accuracy and time
        more = evaluate_teacher_checkpoints(
            teacher, args.teacher_checkpoints, root, common, as_options
        )
        results["runs"]["grpo"]["points"] = rl_curve(teacher, more)
    text = write_report(results, kind, root)
    print("\n" + text, flush=True)
    print(f"\nPlot: {root / 'distill.png'}", flush=True)
    return results


def write_report(results: dict, kind: str, root: Path) -> str:
    """ROOT/distill.{md,json,png} from the runs so far."""
    text = report(results, kind)
    (root / "distill.md").write_text(text + "\n")
    (root / "distill.json").write_text(json.dumps(results, indent=2))
    plot(results, kind, root / "distill.png")
    return text


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m rl.benchmarks.distill worker")
    parser.add_argument("method", choices=[*METHODS, "evaluate"])
    parser.add_argument("--config", type=Path, default=CONFIGS / "default.yaml")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--budget-kind", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--points", type=int, default=6, help="sft: evaluations in the budget")
    parser.add_argument("--checkpoint", action="append", type=Path, default=[], help="evaluate")
    parser.add_argument("--base-eval", type=Path, help="RL: the base model's eval/* (JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from rl.checkpoint import checkpoint_step
    from rl.config import load_config

    budget = Budget(args.budget_kind, args.budget_s)
    overrides = [f"run_dir={args.run_dir}", *args.set]
    if args.method in ("opd", "opd_reward"):
        overrides.append(f"algorithm.teacher={args.teacher}")
    config = load_config(args.config, overrides)
    if args.method == "opd":  # pure distillation: the rewards grade (evaluation), never train
        for reward in config.rewards:
            reward.weight = 0.0
    if args.method == "evaluate":  # checkpoints of a run, by the main job's evaluation
        accuracy = evaluate_checkpoints(config, {checkpoint_step(c): c for c in args.checkpoint})
        args.run_dir.mkdir(parents=True, exist_ok=True)
        (args.run_dir / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
    elif args.method == "sft":
        config.train.steps = 10_000  # until the budget is spent
        sft_worker(config, args.teacher, args.run_dir, budget, args.points)
    else:
        base_eval = json.loads(args.base_eval.read_text()) if args.base_eval else None
        rl_worker(config, budget, base_eval)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2:])
    else:
        main()
