"""The teacher's traces: which are kept (a pure function of the traces and the ``distill``
settings) and how they are stored (a Hugging Face dataset of chat messages).

A dataset folder written by ``aha distill generate`` holds the dataset twice, in the two forms
people load: ``datasets.load_from_disk(DIR)`` (Arrow, ``save_to_disk``) and
``datasets.load_dataset("json", data_files=f"{DIR}/traces.jsonl")``; and summary.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.config import ConfigError, DistillConfig
from rl.data import FILE_FORMATS, DataError

TRACES_FILE = "traces.jsonl"
SUMMARY_FILE = "summary.json"
# Why a trace was not kept, in the order the checks run (summary.json counts each).
DROP_REASONS = ("below_min_reward", "truncated", "too_short", "too_long", "duplicate", "not_chosen")


class DistillError(ValueError):
    """Distillation input that leaves nothing to learn from, said in one line."""


@dataclass(frozen=True)
class Trace:
    prompt: int  # the prompt it answers (its position in the prompt list)
    sample: int  # its place among that prompt's samples, in sampling order
    text: str  # the whole assistant reply, response prefix included
    score: float  # the reward compared with distill.min_reward (NaN: the reward did not apply)
    tokens: int  # completion tokens the teacher sampled
    truncated: bool  # cut at rollout.max_tokens, no end-of-sequence token


def _drop_reason(trace: Trace, settings: DistillConfig) -> str | None:
    if not trace.score >= settings.min_reward:  # NaN fails too
        return "below_min_reward"
    if trace.truncated and not settings.keep_truncated:
        return "truncated"
    if trace.tokens < settings.min_tokens:
        return "too_short"
    if settings.max_tokens and trace.tokens > settings.max_tokens:
        return "too_long"
    return None


def select_traces(traces: list[Trace], settings: DistillConfig) -> tuple[list[Trace], Counter]:
    """The kept traces, by prompt then sampling order, and how many were dropped for each of
    DROP_REASONS. Per prompt: the passing traces within the length limits, the first of each
    text (compared up to whitespace), then all of them, the shortest or the first."""
    by_prompt: dict[int, list[Trace]] = {}
    for trace in sorted(traces, key=lambda t: (t.prompt, t.sample)):
        by_prompt.setdefault(trace.prompt, []).append(trace)
    kept: list[Trace] = []
    dropped: Counter = Counter()
    for group in by_prompt.values():
        seen: set[str] = set()
        passing: list[Trace] = []
        for trace in group:
            reason = _drop_reason(trace, settings)
            text = " ".join(trace.text.split())
            if reason is None and text in seen:
                reason = "duplicate"
            if reason is not None:
                dropped[reason] += 1
                continue
            seen.add(text)
            passing.append(trace)
        if settings.keep == "shortest" and passing:
            chosen = [min(passing, key=lambda t: (t.tokens, t.sample))]
        elif settings.keep == "first":
            chosen = passing[:1]
        else:
            chosen = passing
        dropped["not_chosen"] += len(passing) - len(chosen)
        kept += chosen
    return kept, dropped


# ---------------------------------------------------------------- the dataset on disk


def check_out_dir(out: Path) -> None:
    """Fail before any sampling when ``out`` holds something: a dataset is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out: {out} already exists and is not empty; name a new folder")


def _plain(value: Any) -> Any:
    """NaN as null: JSON has no NaN, and Arrow's JSON reader refuses it."""
    return None if isinstance(value, float) and math.isnan(value) else value


def trace_row(
    messages: list[dict[str, str]],
    reply: str,
    reward: float,
    rewards: dict[str, float | None],
    prompt_index: int,
    completion_tokens: int,
    answer: Any = None,
) -> dict[str, Any]:
    """One dataset row: the conversation with the teacher's reply last, and its grades."""
    return {
        "messages": [*messages, {"role": "assistant", "content": reply}],
        "reward": _plain(reward),  # the weighted total of the config's rewards
        "rewards": {name: _plain(value) for name, value in rewards.items()},  # each, unweighted
        "prompt_index": prompt_index,  # the prompt's position in the split: traces of one prompt
        "completion_tokens": completion_tokens,  # in the teacher's tokens
        "answer": None if answer is None else str(answer),  # the dataset's reference answer
    }


def write_dataset(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """``out``: the Arrow dataset, traces.jsonl and summary.json, written in a sibling folder
    and renamed into place, so a folder called ``out`` is always complete."""
    import datasets

    datasets.disable_progress_bars()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(work))
        with (work / TRACES_FILE).open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (work / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():  # an empty folder (check_out_dir)
            out.rmdir()
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_dataset(data: str | Path):
    """A dataset of chat ``messages`` (the assistant's reply last): a folder written by
    ``aha distill generate`` or by ``Dataset.save_to_disk``, or a .jsonl/.json/.parquet file."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(data).expanduser()
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"data: {path} has splits {list(loaded)}, and none is 'train'")
                loaded = loaded["train"]
        elif path.is_dir() and (path / TRACES_FILE).is_file():
            loaded = datasets.load_dataset(
                "json", data_files=str(path / TRACES_FILE), split="train"
            )
        elif path.suffix in FILE_FORMATS and path.is_file():
            loaded = datasets.load_dataset(
                FILE_FORMATS[path.suffix], data_files=str(path), split="train"
            )
        else:
            raise DataError(
                f"data: {path} is not a dataset folder (aha distill generate's out=, or "
                "save_to_disk) nor a .jsonl/.json/.parquet file"
            )
    except DataError:
        raise
    except Exception as error:  # a corrupt or foreign file
        raise DataError(f"data: cannot read {path}: {str(error).splitlines()[0]}") from None
    if "messages" not in loaded.column_names:
        raise DataError(
            f"data: {path} has no 'messages' column (columns: {', '.join(loaded.column_names)})"
        )
    if len(loaded) == 0:
        raise DataError(f"data: {path} has no rows")
    return loaded
