"""The upcycled SmolLM2-MoE trained as the main job is, with routing replay off and on.

Two short runs of ``configs/default.yaml`` on ``model.name: smollm2-135m-moe`` (the embedded
SmolLM2-135M sparsely upcycled: 4 experts per layer, top-2), one with ``rollout.routing_replay:
off`` and one with ``r3``, each in its own process. Reported per run: the median step time
(steps after the first, which pays for start-up) against the dense main job's, the update's
time (where replay costs), ``moe/router_mismatch`` and ``sampling/logp_gap`` averaged over the
steps, and held-out accuracy before and after. The routed experts' size per token is
layers x top-k bytes (uint8 indices).

Whether replay cuts the trainer/sampler gap is measured by ``python -m rl.benchmarks.moe_gap``
(a bf16 sampler, experts that differ): in float32 vLLM routes as the trainer does here.

    python -m rl.benchmarks.moe [--steps 6] [--eval-size 32] [--engine vllm]
        [--dense-run /tmp/mainjob-1203] [--out /tmp/moe-bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "loss" in m]


def step_times(metrics: list[dict], key: str = "timing_s/step") -> list[float]:
    """``key`` of every step after the first (which pays for compilation and warm-up)."""
    return [m[key] for m in metrics[1:] if key in m] or [m[key] for m in metrics if key in m]


def mean_of(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return sum(values) / len(values) if values else None


def summarise(run_dir: Path) -> dict:
    metrics = run_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "steps": len(metrics),
        "step_s": statistics.median(step_times(metrics)),
        "gen_s": statistics.median(step_times(metrics, "timing_s/gen")),
        "update_s": statistics.median(step_times(metrics, "timing_s/update")),
        "router_mismatch": mean_of(metrics, "moe/router_mismatch"),
        "logp_gap": mean_of(metrics, "sampling/logp_gap"),
        "load_entropy": mean_of(metrics, "moe/load_entropy/mean"),
        "tokens": mean_of(metrics, "tokens"),
        "accuracy_before": (summary.get("eval_before") or {}).get("accuracy"),
        "accuracy_after": (summary.get("eval_after") or {}).get("accuracy"),
        "seconds": summary.get("seconds"),
    }


def train_run(run_dir: Path, replay: str, args) -> float:
    """One ``aha train`` in a process of its own; returns its wall time."""
    overrides = [
        "model.name=smollm2-135m-moe",
        f"rollout.engine={args.engine}",
        f"rollout.routing_replay={replay}",
        f"train.steps={args.steps}",
        f"data.eval_size={args.eval_size}",
        "train.save_every=0",
        f"run_dir={run_dir}",
    ]
    command = [sys.executable, "-m", "rl.cli", "train", "configs/default.yaml", *overrides]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-size", type=int, default=32, help="held-out prompts (x4 samples)")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--dense-run", type=Path, default=Path("/tmp/mainjob-1203"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/moe-bench"))
    parser.add_argument("--only", choices=["off", "r3"], help="one of the two runs")
    args = parser.parse_args(argv)

    from rl.models import resolve_model

    folder = resolve_model("smollm2-135m-moe")  # built once, before either run is timed
    config = json.loads((folder / "config.json").read_text())
    bytes_per_token = config["num_hidden_layers"] * config["num_experts_per_tok"]

    results: dict[str, dict] = {}
    for replay in [args.only] if args.only else ["off", "r3"]:
        run_dir = args.out / f"replay-{replay}"
        wall = train_run(run_dir, replay, args)
        results[replay] = {**summarise(run_dir), "wall_s": wall, "run_dir": str(run_dir)}
    dense = None
    if (args.dense_run / "metrics.jsonl").is_file():
        dense_metrics = run_metrics(args.dense_run)
        dense = {
            "run_dir": str(args.dense_run),
            "step_s": statistics.median(step_times(dense_metrics)),
            "update_s": statistics.median(step_times(dense_metrics, "timing_s/update")),
            "gen_s": statistics.median(step_times(dense_metrics, "timing_s/gen")),
        }
    report = {
        "engine": args.engine,
        "routed_expert_bytes_per_token": bytes_per_token,
        "runs": results,
        "dense": dense,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))

    print(f"\nsmollm2-135m-moe (4 experts, top-2), {args.steps} steps, engine {args.engine}")
    print(
        f"routed experts: {bytes_per_token} bytes per token (uint8, {config['num_hidden_layers']} layers x top-{config['num_experts_per_tok']})"
    )
    print(
        "| run | step s (median) | gen s | update s | router mismatch | logp gap | accuracy before -> after |"
    )
    print("|---|---|---|---|---|---|---|")
    if dense:
        print(
            f"| dense main job | {fmt(dense['step_s'])} | {fmt(dense['gen_s'])} | {fmt(dense['update_s'])} | - | - | - |"
        )
    for replay, r in results.items():
        print(
            f"| MoE, replay {replay} | {fmt(r['step_s'])} | {fmt(r['gen_s'])} | "
            f"{fmt(r['update_s'])} | {fmt(r['router_mismatch'])} | {fmt(r['logp_gap'])} | "
            f"{fmt(r['accuracy_before'])} -> {fmt(r['accuracy_after'])} |"
        )
    print(f"\n{args.out / 'results.json'}")


if __name__ == "__main__":
    main()
