"""`aha distill sft`: supervised fine-tuning of a student on traces, by TRL's ``SFTTrainer``.

aha shapes the data; TRL does the rest (labels, collation, loss, optimizer, LoRA through the
peft model aha builds, data parallel under ``accelerate launch``, checkpoints). Each row's
conversation is cut before its last (assistant) message:

- prompt: the other messages with the student's chat template and ``add_generation_prompt``,
  then ``data.response_prefix``'s tokens, by ``rl.data.render_prompts``: exactly the tokens
  RL training samples after;
- completion: the reply after the prefix, tokenized alone, then the student's end-of-sequence
  token: what the RL engines sample, and how they stop.

They reach ``SFTTrainer`` tokenized, as ``input_ids`` and ``completion_mask``, with
``completion_only_loss=True``: TRL's label building sets every prompt token (the prefix's
too) to -100, so the loss is on the reply and its end-of-sequence token only. Not TRL's
``assistant_only_loss``: it needs ``{% generation %}`` markers that ChatML templates (SmolLM2's)
lack, TRL patches only the templates it knows, and it would train on the prefix. Not TRL's
prompt/completion text columns: they are tokenized together, so a token can straddle the
boundary, which RL never shows the model.

The run folder is an aha one: config.yaml (``model.name`` the student), metrics.jsonl (TRL's
logs, every step), checkpoints/step-N (``save_pretrained`` model or LoRA adapter, tokenizer,
state.json; and TRL's optimizer, scheduler, RNG and trainer_state.json, which ``resume=`` uses),
summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rl.config import Config, ConfigError, save_config
from rl.data import DataError, render_prompts

STAGE = "sft"  # state.json's "stage": what wrote a checkpoint


def tokenize_traces(rows, tokenizer, data_config, source: str) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``completion_mask`` (1 on the reply and its end token) per row."""
    prefix = data_config.response_prefix
    prompts, replies = [], []
    for index, row in enumerate(rows):
        messages = row["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not isinstance(last, dict) or last.get("role") != "assistant" or len(messages) < 2:
            raise DataError(
                f"{source}: row {index}: messages must be a conversation that ends with the "
                "assistant's reply"
            )
        reply = last.get("content")
        if not isinstance(reply, str):
            raise DataError(f"{source}: row {index}: the assistant's content is not text")
        if not reply.startswith(prefix):
            raise DataError(
                f"{source}: row {index}: the assistant's reply does not start with "
                f"data.response_prefix={prefix!r}"
            )
        prompts.append({"prompt": list(messages[:-1])})
        replies.append(reply[len(prefix) :])
    rendered = render_prompts(
        prompts,
        tokenizer,
        "prompt",
        "answer",
        None,  # the system turn is the row's own, if it has one
        data_config.max_prompt_tokens,
        source,
        prefix,
    )
    out = []
    for prompt, reply in zip(rendered, replies, strict=True):
        completion = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
        out.append(
            {
                "input_ids": [*prompt.ids, *completion],
                "completion_mask": [0] * len(prompt.ids) + [1] * len(completion),
            }
        )
    return out


def sft_arguments(config: Config, run_dir: Path, world_size: int, progress: bool):
    """TRL's SFTConfig from aha's: train.* where the key means the same, distill.batch_size."""
    import torch
    from trl import SFTConfig

    train = config.train
    per_pass = train.micro_batch_size * world_size
    if config.distill.batch_size % per_pass:
        raise ConfigError(
            f"distill.batch_size: must be a multiple of train.micro_batch_size x processes = "
            f"{train.micro_batch_size} x {world_size}, got {config.distill.batch_size}"
        )
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints" / ".trl"),  # RunFolder moves each into step-N
        max_steps=train.steps,
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=config.distill.batch_size // per_pass,
        learning_rate=train.learning_rate,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(
            train.lr_schedule, train.lr_schedule
        ),
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_betas[0],
        adam_beta2=train.adam_betas[1],
        optim="adamw_torch",
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        # TRL turns these on by default; aha's config decides (bf16 autocast on GPUs only).
        bf16=train.bf16_autocast and cuda,
        fp16=False,
        gradient_checkpointing=config.model.gradient_checkpointing,
        use_cpu=not cuda,
        completion_only_loss=True,
        max_length=None,  # nothing is cut: generate's limits and data.max_prompt_tokens bound rows
        logging_steps=1,
        save_strategy="steps",
        save_steps=train.save_every or train.steps,  # and always the last step
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trainable parameter is used in each forward
    )


def _append_json(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def run_folder_callback(run_dir: Path, keep: int, state_extra: dict[str, Any]):
    """A TrainerCallback that makes TRL's output an aha run folder: each checkpoint-N, once
    TRL has written all of it, gets state.json and is renamed to checkpoints/step-N (complete or
    absent, as rl/checkpoint.py's); the oldest beyond ``keep`` are deleted; TRL's logs go to
    metrics.jsonl."""
    from transformers import TrainerCallback

    from rl.checkpoint import checkpoint_dirs, write_manifest

    class RunFolder(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every rank has written its part (per-rank RNG files) of checkpoint-N
            if state.is_world_process_zero:
                written = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                step = {"step": state.global_step, **state_extra}
                (written / "state.json").write_text(json.dumps(step, indent=2))
                write_manifest(written)  # last: what rl/checkpoint.py checks a checkpoint by
                final = run_dir / "checkpoints" / f"step-{state.global_step}"
                if final.exists():  # re-saving a step after a resume
                    shutil.rmtree(final)
                written.rename(final)
                for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
            _barrier()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                _append_json(run_dir / "metrics.jsonl", {"step": state.global_step, **logs})

    return RunFolder()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_trainer(config: Config, data: str | Path, run_dir: Path, args=None):
    """TRL's SFTTrainer for the student ``config.model`` on the traces in ``data``; ``args``:
    sft_arguments' (made here when not given)."""
    import datasets
    import torch
    from trl import SFTTrainer

    from rl.distill.traces import read_dataset
    from rl.models import load_policy, load_tokenizer, resolve_model
    from rl.setup import quiet_transformers

    quiet_transformers()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if args is None:
        args = sft_arguments(config, run_dir, int(os.environ.get("WORLD_SIZE", "1")), True)
    folder = resolve_model(config.model.name)
    tokenizer = load_tokenizer(folder)
    traces = read_dataset(data)
    rows = tokenize_traces(traces, tokenizer, config.data, f"data {data}")
    datasets.disable_progress_bars()
    # SFTConfig's gradient_checkpointing turns it on (TRL's way, with the peft input hooks)
    model = load_policy(folder, config.model.dtype, config.model.lora)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[
            run_folder_callback(
                run_dir, config.train.keep_checkpoints, {"stage": STAGE, "data": str(data)}
            )
        ],
    )


def run_sft(
    config: Config, data: str | None, config_path: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune ``config.model.name`` (the student) on ``data`` into the run folder
    ``config.run_dir``, or, with ``config.resume`` (load_config made it the run's own config),
    continue that SFT run from its newest intact checkpoint to ``train.steps``."""
    import contextlib

    started = time.time()
    resuming = bool(config.resume)
    if not resuming and not data:
        raise ConfigError("data: name the traces to learn from (data=DIR)")
    if not resuming and not config.run_dir:
        raise ConfigError("out: name the run folder to write (out=RUN_DIR)")
    run_dir = Path(config.resume or config.run_dir)
    # SFTConfig first: under a launcher it starts the process group the run folder's news needs
    args = sft_arguments(config, run_dir, int(os.environ.get("WORLD_SIZE", "1")), progress)
    with contextlib.ExitStack() as held:  # the run folder's lock, released however it ends
        folder = _open_run_folder(config, config_path, held)
        checkpoint, main = folder.checkpoint, _rank() == 0
        if checkpoint is not None:
            if not (checkpoint / "trainer_state.json").is_file():
                raise ConfigError(
                    f"resume: {checkpoint} was written by `aha train`, not `aha distill sft`; "
                    f"continue it with `aha train resume={run_dir}`"
                )
            data = data or json.loads((checkpoint / "state.json").read_text()).get("data")
            if not data:
                raise ConfigError(f"data: {checkpoint}/state.json names no traces; give data=DIR")
        if main:
            for note in folder.notes:
                print(note, flush=True)
            save_config(dataclasses.replace(config, resume=None), run_dir / "config.yaml")
            if checkpoint is not None:
                print(f"Resuming {run_dir} from {checkpoint.name}", flush=True)
        trainer = build_trainer(config, data, run_dir, args)
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        summary = {
            "stage": STAGE,
            "student": config.model.name,
            "data": str(data),
            "examples": len(trainer.train_dataset),
            "steps": result.global_step,
            "train_loss": result.training_loss,
            "seconds": round(time.time() - started, 1),
        }
        if main:
            shutil.rmtree(run_dir / "checkpoints" / ".trl", ignore_errors=True)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            _print_summary(summary, run_dir)
    return summary


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _open_run_folder(config: Config, config_path: str | None, held):
    """Rank 0 makes the run folder ready and locks it until the run ends (rl/runfolder.py, as
    for `aha train`: a fresh folder or one that holds no checkpoint; a resume from the newest
    intact checkpoint, its logs cut back to it), and tells the others, or tells them its error."""
    import torch.distributed as dist

    from rl.checkpoint import RunFolderError
    from rl.runfolder import RunFolder, open_run_folder

    folder = None
    news: tuple[str, str | None] | Exception | None = None
    if _rank() == 0:
        try:
            folder = open_run_folder(config, config_path)
            held.callback(folder.lock.release)
            news = (str(folder.path), folder.checkpoint and str(folder.checkpoint))
        except (ConfigError, RunFolderError) as error:
            news = error
    if dist.is_available() and dist.is_initialized():
        box = [news]
        dist.broadcast_object_list(box, src=0)
        news = box[0]
    if isinstance(news, Exception):
        raise news
    if folder is None:
        path, checkpoint = news
        folder = RunFolder(Path(path), checkpoint and Path(checkpoint))
    return folder


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from rl.jsonl import read_jsonl

    metrics = run_dir / "metrics.jsonl"
    losses = [r["loss"] for r in read_jsonl(metrics) if "loss" in r] if metrics.exists() else []
    lines = [
        f"Run folder: {run_dir}",
        f"Steps: {summary['steps']} on {summary['examples']} traces in "
        f"{summary['seconds'] / 60:.1f} min",
    ]
    if losses:
        lines.append(f"SFT loss: {losses[0]:.3f} (first step) -> {losses[-1]:.3f} (last step)")
    print("\n".join(lines), flush=True)
