"""Learning benchmark: does each preset teach the default model its task?

Trains the embedded default model (SmolLM2-135M-Instruct, task `arithmetic`) with the GRPO and
the DAPO presets (configs/grpo.yaml, configs/dapo.yaml: the main job's recipe with each paper's
knobs) for the same number of steps from the same seed, and prints held-out accuracy (as the
recipe measures it: pass@1 over 4 samples per prompt) before and after each.

    python -m rl.benchmarks.learning                      # the full run: 16 steps, 64 prompts
    python -m rl.benchmarks.learning --steps 2 --eval-size 8 --set rollout.max_tokens=32

On a 2-core CPU the full run takes about half an hour (two presets x 16 steps x 32
completions); the ``--set`` overrides shrink it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run_preset(
    preset: str, steps: int, eval_size: int, seed: int, run_root: Path, extra: list[str]
) -> dict[str, float]:
    from rl.config import load_config
    from rl.run import train

    overrides = [
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"data.eval_size={eval_size}",
        f"run_dir={run_root / preset}",
        "train.save_every=0",
        *extra,
    ]
    config = load_config(CONFIGS / f"{preset}.yaml", overrides)
    started = time.time()
    summary = train(config, config_path=str(CONFIGS / f"{preset}.yaml"), progress=False)
    return {
        "before": summary.eval_before["accuracy"] if summary.eval_before else float("nan"),
        "after": summary.eval_after["accuracy"] if summary.eval_after else float("nan"),
        "minutes": (time.time() - started) / 60,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        prog="python -m rl.benchmarks.learning", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--presets", nargs="+", default=["grpo", "dapo"])
    parser.add_argument("--steps", type=int, default=16, help="training steps per preset")
    parser.add_argument("--eval-size", type=int, default=64, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", type=Path, default=None, help="default: runs/learning-<time>")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    args = parser.parse_args(argv)
    run_root = args.run_root or Path("runs") / f"learning-{time.strftime('%Y%m%d-%H%M%S')}"
    results = {}
    for preset in args.presets:
        print(f"== {preset}: {args.steps} steps, seed {args.seed}", flush=True)
        results[preset] = run_preset(
            preset, args.steps, args.eval_size, args.seed, run_root, args.set
        )
    print(
        f"\nLearning benchmark (smollm2-135m, arithmetic, seed {args.seed}, {args.steps} steps, "
        f"{args.eval_size} held-out prompts; overrides: {' '.join(args.set) or 'none'})"
    )
    print(f"{'preset':<8} {'before':>7} {'after':>7} {'minutes':>8}")
    for preset, r in results.items():
        print(f"{preset:<8} {r['before']:>7.3f} {r['after']:>7.3f} {r['minutes']:>8.1f}")
    run_root.mkdir(parents=True, exist_ok=True)
    (run_root / "learning.json").write_text(
        json.dumps(
            {"seed": args.seed, "steps": args.steps, "overrides": args.set, **results}, indent=2
        )
    )
    return results


if __name__ == "__main__":
    main()
