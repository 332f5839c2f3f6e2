"""The `aha` command. Heavy imports (torch, transformers, vLLM) happen inside the commands that
need them, so `aha --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TRAIN_HELP = """\
Train a policy with a GRPO-family algorithm.

CONFIG is a YAML file of overrides of the defaults (see configs/); each KEY=VALUE
overrides one dotted key, the value read as YAML, e.g.:

  aha train configs/default.yaml train.steps=5 rollout.group_size=4 model.lora.enabled=true
  aha train configs/tiny.yaml run_dir=runs/smoke
  aha train resume=runs/smoke train.steps=4

run_dir=PATH sets the run folder (default runs/<config>-<time>); one run at a time holds it
(RUN_DIR/run.lock). resume=RUN_DIR continues a run from its newest intact checkpoint with the
run's own config.yaml (a CONFIG given with it is not read); on resume, KEY=VALUE may change only
how long the run goes on and what it writes (train.steps, train.save_every, data.eval_every,
tracking.*, ...), recorded in config.yaml; any other key is refused. The run folder gets
config.yaml (resolved), metrics.jsonl, samples.jsonl, summary.json and checkpoints/step-N/.
"""
OVERRIDE_COMMANDS = ("train", "eval", "config", "distill")

DISTILL_HELP = """\
Distillation, R1's way (docs/distillation.md): a teacher's verified traces, then supervised
fine-tuning of a student on them.

  aha distill generate CONFIG teacher=MODEL_OR_RUN_DIR_OR_URL out=DIR [samples=K] [KEY=VALUE ...]
  aha distill sft CONFIG data=DIR student=MODEL out=RUN_DIR [KEY=VALUE ...]
  aha distill sft resume=RUN_DIR [train.steps=N]

Then RL from the student: aha train CONFIG model.name=RUN_DIR/checkpoints/step-N
"""

GENERATE_HELP = """\
The teacher samples distill.samples traces per prompt of data.dataset/data.split with the
configured rollout engine; the config's rewards grade them; the passing ones (distill.reward >=
distill.min_reward, deduplicated, within distill.min_tokens/max_tokens, distill.keep per prompt)
are written to out=DIR as a Hugging Face dataset of chat messages, with summary.json.

teacher= a model name or folder, a run folder (its model at its latest checkpoint), or a vLLM
server's URL (http://HOST:PORT, sampled in rollout.server_mode=frozen; model.name must then
name the served model's tokenizer). samples=K is distill.samples; other KEY=VALUE override the
config as in `aha train`, e.g.:

  aha distill generate configs/default.yaml teacher=runs/grpo-1 out=traces/grpo-1 samples=8
  aha distill generate configs/default.yaml teacher=http://10.0.0.2:8000 out=traces/big \\
      model.name=Qwen/Qwen2.5-7B-Instruct distill.keep=shortest
"""

SFT_HELP = """\
Fine-tune the student on the traces in data=DIR with TRL's SFTTrainer: the loss on the
assistant's reply only (prompt and data.response_prefix tokens masked), the student's chat
template, LoRA by model.lora.*, train.steps/learning_rate/lr_schedule/micro_batch_size and
distill.batch_size. out=RUN_DIR gets an aha run folder: config.yaml, metrics.jsonl,
checkpoints/step-N (aha eval RUN_DIR and aha train model.name=RUN_DIR/checkpoints/step-N take
them), summary.json. resume=RUN_DIR continues an SFT run from its last checkpoint.

  aha distill sft configs/default.yaml data=traces/grpo-1 student=smollm2-135m out=runs/sft-1
  accelerate launch --multi_gpu --num_processes 2 -m rl.cli distill sft configs/tiny.yaml \\
      data=traces/t out=runs/sft-2
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aha",
        description="aha: R1-style reinforcement learning for reasoning in language models.",
        epilog="Run 'aha COMMAND --help' for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a policy from a YAML config with dotted overrides",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "config",
        metavar="CONFIG",
        nargs="?",
        help="YAML config file (overrides of the defaults); not needed with resume=RUN_DIR",
    )
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    eval_cmd = commands.add_parser(
        "eval",
        help="score a model or a run's last checkpoint on held-out datasets",
        description=(
            "Generate with the configured rollout engine, score with the same reward functions "
            "as training, and print pass@1 (accuracy), pass@n and majority-vote accuracy per "
            "dataset. Writes samples-<dataset>.jsonl and summary-<dataset>.json."
        ),
        epilog="example: aha eval runs/default-20261124-101500 --dataset arithmetic --dataset gsm8k --n 4 --limit 50",
    )
    eval_cmd.add_argument(
        "target",
        metavar="MODEL_OR_RUN_DIR",
        help="a run folder, or a model name/folder (as model.name)",
    )
    eval_cmd.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="built-in task or file; repeat for several",
    )
    eval_cmd.add_argument(
        "--n", type=int, default=1, help="completions per prompt (default 1, greedy)"
    )
    eval_cmd.add_argument("--limit", type=int, default=None, help="first K prompts of each dataset")
    eval_cmd.add_argument("--split", default="test", help="dataset split (default test)")
    eval_cmd.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="default: 0 (greedy) for n=1, else the config's",
    )
    eval_cmd.add_argument(
        "--out",
        default=None,
        help="output folder (default RUN_DIR/eval/step-N or evals/<model>-<time>)",
    )
    eval_cmd.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. rollout.max_tokens=512",
    )

    distill = commands.add_parser(
        "distill",
        help="a teacher's verified traces (generate), a student fine-tuned on them (sft)",
        description=DISTILL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distill_sub = distill.add_subparsers(dest="distill_command", metavar="SUBCOMMAND")
    for name, short, text in (
        ("generate", "sample, verify and keep the teacher's traces as a dataset", GENERATE_HELP),
        ("sft", "supervised fine-tuning of a student on traces (TRL's SFTTrainer)", SFT_HELP),
    ):
        sub = distill_sub.add_parser(
            name, help=short, description=text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.add_argument(
            "config",
            metavar="CONFIG",
            nargs="?",
            help="YAML config file (overrides of the defaults); sft resume=RUN_DIR needs none",
        )
        sub.add_argument(
            "overrides",
            nargs="*",
            metavar="KEY=VALUE",
            help="the command's keys and config overrides",
        )
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    config_cmd = commands.add_parser(
        "config",
        help="print the resolved config (defaults + file + overrides) as YAML",
        description="Print the resolved config without training: a quick check of a YAML file and overrides.",
    )
    config_cmd.add_argument(
        "config", metavar="CONFIG", nargs="?", help="YAML config file (omit for the defaults)"
    )
    config_cmd.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides"
    )

    rewards = commands.add_parser(
        "rewards",
        help="list reward functions",
        description="Reward functions: built-in and plugins.",
    )
    rewards_sub = rewards.add_subparsers(dest="rewards_command", metavar="SUBCOMMAND")
    rewards_sub.add_parser(
        "list",
        help="every built-in and installed reward with its description",
        description="List every built-in reward and those from the 'aha.rewards' entry-point group.",
    )

    plot = commands.add_parser(
        "plot",
        help="PNG plots of runs' metrics (several runs overlaid)",
        description=(
            "Plot reward (total and per function), held-out accuracy, response length, KL, "
            "entropy, clip fraction and step timings from each RUN_DIR/metrics.jsonl, runs "
            "overlaid: one PNG per panel and overview.png."
        ),
        epilog="example: aha plot runs/grpo-1 runs/dapo-1 --out plots/compare",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    plot.add_argument("--out", default=None, help="output folder (default FIRST_RUN_DIR/plots)")

    view = commands.add_parser(
        "view",
        help="an HTML page of a run's sampled rollouts",
        description=(
            "Write RUN_DIR/view.html: samples.jsonl by step (prompt, completion with its "
            "<think> reasoning folded, reward per function, advantage), filtered by step and "
            "reward in the page. Self-contained: no network, opens from disk."
        ),
    )
    view.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    view.add_argument("--out", default=None, help="output file (default RUN_DIR/view.html)")

    commands.add_parser(
        "tasks",
        help="list the built-in datasets and tasks",
        description="List the built-in tasks (datasets that need no download).",
    )
    return parser


def _os_error(error: OSError) -> str:
    """Our own messages as they are; the system's as "PATH: cause"."""
    if error.filename is None or not error.strerror:
        return str(error)
    return f"{error.filename}: {error.strerror}"


def _fail(message: str) -> int:
    print(f"aha: error: {message}", file=sys.stderr)
    return 2


def _is_override(token: str) -> bool:
    key, sep, _ = token.partition("=")
    return bool(sep and key) and not token.startswith("-")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """KEY=VALUE overrides wherever they stand, before or after options (argparse alone takes
    them only in one run of positionals); a CONFIG position holding KEY=VALUE is an override
    too (`aha config train.steps=3`: the defaults, with one key changed)."""
    args, extra = parser.parse_known_args(argv)
    if args.command not in OVERRIDE_COMMANDS:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    unknown = [token for token in extra if not _is_override(token)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    config = getattr(args, "config", None)
    if config is not None and _is_override(config) and not Path(config).exists():
        args.config, args.overrides = None, [config, *args.overrides]
    return args


def _train(args: argparse.Namespace) -> int:
    from rl.config import load_config

    if args.config is None and not any(o.startswith("resume=") for o in args.overrides):
        return _fail(
            "train: a CONFIG file comes first (aha train CONFIG [KEY=VALUE ...]); "
            "only resume=RUN_DIR needs none"
        )
    config = load_config(args.config, args.overrides)
    from rl.run import train

    train(config, config_path=args.config, progress=not args.no_progress)
    return 0


def _own_keys(
    overrides: list[str], own: tuple[str, ...], aliases: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """A command's own KEY=VALUE arguments (teacher=, out=, ...) apart from config overrides;
    ``aliases`` turn a short key into a config override (samples=K -> distill.samples=K)."""
    mine: dict[str, str] = {}
    rest: list[str] = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key in own:
            mine[key] = value
        elif sep and key in aliases:
            rest.append(f"{aliases[key]}={value}")
        else:
            rest.append(text)
    return mine, rest


def _distill(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rl.config import ConfigError, load_config

    command = args.distill_command
    if command is None:
        parser.parse_args(["distill", "--help"])
    resuming = any(o.startswith("resume=") for o in args.overrides)
    if args.config is None and not (command == "sft" and resuming):
        return _fail(
            f"distill {command}: a CONFIG file comes first (aha distill {command} CONFIG "
            "[KEY=VALUE ...]); only sft resume=RUN_DIR needs none"
        )
    if command == "generate":
        mine, overrides = _own_keys(
            args.overrides, ("teacher", "out"), {"samples": "distill.samples"}
        )
        missing = [key for key in ("teacher", "out") if not mine.get(key)]
        if missing:
            raise ConfigError(
                f"aha distill generate needs {' and '.join(k + '=' for k in missing)}"
            )
        config = load_config(args.config, overrides)
        from rl.distill.generate import generate

        generate(config, mine["teacher"], mine["out"], progress=not args.no_progress)
        return 0
    # sft: out= is run_dir=, student= is model.name= (a resume refuses both: the run's own)
    mine, overrides = _own_keys(
        args.overrides, ("data",), {"out": "run_dir", "student": "model.name"}
    )
    config = load_config(args.config, overrides)
    from rl.distill.sft import run_sft

    run_sft(config, mine.get("data"), config_path=args.config, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = _parse(parser, argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rl.quiet import quiet_third_parties

    quiet_third_parties()  # before vLLM, accelerate or DeepSpeed is imported; AHA_VERBOSE=1: all
    from rl.errors import USER_ERRORS

    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            from rl.evaluate import run_eval

            run_eval(
                args.target,
                args.dataset,
                n=args.n,
                limit=args.limit,
                split=args.split,
                temperature=args.temperature,
                out=args.out,
                overrides=args.overrides,
            )
            return 0
        if args.command == "distill":
            return _distill(args, parser)
        if args.command == "config":
            from rl.config import config_to_yaml, load_config

            print(config_to_yaml(load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "rewards":
            if args.rewards_command != "list":
                parser.parse_args(["rewards", "--help"])
            from rewards import list_rewards

            for name, description in list_rewards().items():
                print(f"{name:24} {description}")
            return 0
        if args.command == "plot":
            from rl.plot import plot_runs

            try:
                written = plot_runs(args.run_dirs, args.out)
            except OSError as error:  # not a run folder, an unwritable --out: one line
                return _fail(_os_error(error))
            print("\n".join(str(path) for path in written) or "no metrics to plot")
            return 0
        if args.command == "view":
            from rl.view import write_view

            try:
                print(write_view(args.run_dir, args.out))
            except OSError as error:
                return _fail(_os_error(error))
            return 0
        if args.command == "tasks":
            from rl.tasks import list_tasks

            for name, task in list_tasks().items():
                print(f"{name:20} {'/'.join(task.splits):12} {task.description}")
            return 0
        parser.print_help()
        return 0
    except USER_ERRORS as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail(
            "interrupted; the last complete checkpoint is intact (resume=RUN_DIR continues)"
        )


if __name__ == "__main__":
    sys.exit(main())
