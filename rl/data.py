"""Prompts for the loop: rows from a built-in task, a local file or the hub, rendered with the
model's chat template."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rl.jsonl import first_bad_line
from rl.tasks import get_task, list_tasks
from rollouts.record import Prompt

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    pass


def load_rows(
    dataset: str, split: str, seed: int = 0, task_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of a built-in task, a local file, or a hub dataset (needs the network)."""
    task = get_task(dataset)
    if task is not None:
        if split not in task.splits:
            raise DataError(
                f"data: task {dataset!r} has splits {', '.join(task.splits)}, not {split!r}"
            )
        try:
            return task.load(split, seed=seed, **(task_options or {}))
        except TypeError as error:
            raise DataError(f"data.task_options for {dataset!r}: {error}") from None
    path = Path(dataset).expanduser()
    import datasets

    datasets.disable_progress_bars()
    if path.suffix in FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"data.dataset: file {path} does not exist")
        if path.stat().st_size < 4096 and not path.read_bytes().strip():
            raise DataError(f"data.dataset: {path} is empty (no rows)")
        verbosity = datasets.logging.get_verbosity()
        # the loader logs a bad file at ERROR level before raising; our one line says it better
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            loaded = datasets.load_dataset(
                FILE_FORMATS[path.suffix], data_files=str(path), split="train"
            )
        except Exception as error:
            raise DataError(f"data.dataset: cannot read {_read_failure(path, error)}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
        return list(loaded)
    if path.exists() or dataset.count("/") != 1:
        known = ", ".join(list_tasks())
        raise DataError(
            f"data.dataset: {dataset!r} is not a built-in task ({known}), a .jsonl/.json/.parquet/.csv file, or a hub id"
        )
    try:
        return list(datasets.load_dataset(dataset, split=split))
    except Exception as error:
        raise DataError(
            f"data.dataset: cannot load hub dataset {dataset!r} split {split!r}: {str(error).splitlines()[0]}"
        ) from None


def _read_failure(path: Path, error: Exception) -> str:
    """Where a data file is bad, by line number: the loader's own messages give a byte offset,
    a row of one parsing block, or only "An error occurred while generating the dataset"."""
    if path.suffix in (".jsonl", ".json"):
        import json

        text = path.read_text(errors="replace")
        if path.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
            try:
                json.loads(text)
            except json.JSONDecodeError as bad:
                return f"{path}, line {bad.lineno}: not JSON ({bad.msg})"
        elif where := first_bad_line(path):
            return where
    causes = [error, error.__cause__, error.__context__]
    messages = [str(e).splitlines()[0] for e in causes if e is not None and str(e).strip()]
    return f"{path}: {messages[-1] if messages else type(error).__name__}"


def check_columns(
    rows: list[dict[str, Any]], source: str, prompt_column: str, needed: list[str]
) -> None:
    if not rows:
        raise DataError(f"{source}: has no rows")
    for column in [prompt_column, *needed]:
        for index, row in enumerate(rows):
            if column not in row or row[column] is None:
                present = ", ".join(rows[0])
                raise DataError(
                    f"{source}: row {index} has no {column!r} column (columns: {present})"
                )


def system_prompt_for(dataset: str, configured: str | None) -> str | None:
    task = get_task(dataset)
    if task is not None and task.system_prompt is not None:
        return task.system_prompt
    return configured


def render_prompts(
    rows: list[dict[str, Any]],
    tokenizer,
    prompt_column: str,
    answer_column: str,
    system_prompt: str | None,
    max_prompt_tokens: int,
    source: str,
    response_prefix: str = "",
) -> list[Prompt]:
    """Each row as chat messages, templated and tokenized; the other columns ride along for the
    rewards (the answer column under the name `answer`)."""
    prompts = []
    for index, row in enumerate(rows):
        question = row[prompt_column]
        if isinstance(question, list):  # already chat messages
            messages = list(question)
        else:
            messages = [{"role": "user", "content": str(question)}]
        if system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        if response_prefix:
            ids = [*ids, *tokenizer.encode(response_prefix, add_special_tokens=False)]
        if len(ids) > max_prompt_tokens:
            raise DataError(
                f"{source}: row {index} prompt has {len(ids)} tokens, over data.max_prompt_tokens={max_prompt_tokens}"
            )
        columns = {k: v for k, v in row.items() if k != prompt_column}
        if answer_column != "answer" and answer_column in columns:
            columns["answer"] = columns.pop(answer_column)
        prompts.append(Prompt(index, messages, list(ids), columns, response_prefix=response_prefix))
    return prompts


def batches(
    prompts: list[Prompt], batch_size: int, seed: int, start_batch: int = 0
) -> Iterator[list[Prompt]]:
    """An endless stream of prompt batches, reshuffled every epoch from the seed, so that a
    resumed run sees the same batches a run without a stop would have seen."""
    per_epoch = max(len(prompts) // batch_size, 1)
    batch = start_batch
    while True:
        epoch, position = divmod(batch, per_epoch)
        order = list(range(len(prompts)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[position * batch_size : (position + 1) * batch_size]
        yield [dataclasses.replace(prompts[j], index=i) for i, j in enumerate(chosen)]
        batch += 1


def load_prompts(
    dataset: str,
    split: str,
    tokenizer,
    data_config,
    needed_columns: list[str],
    seed: int,
    limit: int | None = None,
) -> list[Prompt]:
    """Rows of ``dataset``/``split`` checked for the columns the rewards read and rendered as
    prompts with the dataset's system prompt. ``data_config`` is the config's ``data`` section."""
    options = data_config.task_options if dataset == data_config.dataset else {}
    rows = load_rows(dataset, split, seed, options)
    rows = rows[:limit] if limit else rows
    source = f"dataset {dataset!r} split {split!r}"
    needed = [data_config.answer_column if c == "answer" else c for c in needed_columns]
    check_columns(rows, source, data_config.prompt_column, needed)
    return render_prompts(
        rows,
        tokenizer,
        data_config.prompt_column,
        data_config.answer_column,
        system_prompt_for(dataset, data_config.system_prompt),
        data_config.max_prompt_tokens,
        source,
        data_config.response_prefix,
    )


def required_columns(reward_fns) -> list[str]:
    """The dataset columns a list of reward functions declares it reads."""
    return sorted({c for fn in reward_fns for c in getattr(fn, "required_columns", ())})
