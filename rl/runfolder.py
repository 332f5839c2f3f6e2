"""The run folder, made ready by rank 0 before a run writes anything: chosen (or made), locked
against a second run, and put in order for a fresh start or a resume.

- A fresh start refuses a folder that holds a checkpoint (resume= continues that run). A folder
  whose run stopped before its first checkpoint holds no run: its logs are discarded and the run
  starts over.
- A resume continues from the newest intact checkpoint. Newer damaged ones (a file missing or cut
  short) are moved aside as ``step-N.corrupt`` and said so; with no checkpoint at all, the run
  starts over from step 0 with its own config.
- Checkpoints whose writing was interrupted (``.step-N.tmp``) are discarded: they never were one.
- The logs lose the lines of steps after the checkpoint (they will be redone) and a last line cut
  short by the stop.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rl.checkpoint import (
    RunFolderError,
    checkpoint_dirs,
    checkpoint_step,
    newest_intact_checkpoint,
)
from rl.config import Config, ConfigError
from rl.jsonl import read_jsonl
from rl.resume import load_resumed_config, resume_changes
from rl.runlock import RunInUseError, RunLock

LOGS = ("metrics.jsonl", "samples.jsonl")
# What an attempt that stopped before its first checkpoint leaves, discarded when it starts over.
ATTEMPT_FILES = (*LOGS, "summary.json", "tensorboard")


@dataclass
class RunFolder:
    path: Path
    checkpoint: Path | None  # what the run continues from; None: step 0
    lock: RunLock | None = None  # rank 0 holds it until the run ends
    notes: list[str] = field(default_factory=list)  # what was found and done, for the log
    final_eval: dict[str, float] | None = None  # a finished run's logged final evaluation


def open_run_folder(config: Config, config_path: str | None) -> RunFolder:
    """Rank 0: the run folder, locked, in order for the run (see the module's docstring).
    ConfigError or RunFolderError (one line each) when it cannot be used."""
    path = _make_folder(config, config_path)
    lock = RunLock(path)
    try:
        lock.acquire()
    except RunInUseError as error:
        raise RunFolderError(str(error)) from None
    except OSError as error:
        raise RunFolderError(f"run_dir: cannot write in {path}: {error.strerror}") from None
    try:
        folder = _put_in_order(path, config, config_path)
    except BaseException:
        lock.release()
        raise
    folder.lock = lock
    return folder


def _make_folder(config: Config, config_path: str | None) -> Path:
    if config.resume:
        path = Path(config.resume)
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"resume: {path} is not a run folder (no config.yaml)")
        return path
    if config.run_dir:
        path = Path(config.run_dir)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"run_dir: {path} is a file, not a folder")
        _mkdir(path, exist_ok=True)
        return path
    name = Path(config_path).stem if config_path else "run"
    stamp = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for attempt in range(1, 100):  # two runs started in the same second get two folders
        path = Path("runs") / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            _mkdir(path, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RunFolderError(f"run_dir: runs/{stamp}: no free folder name")


def _mkdir(path: Path, exist_ok: bool) -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
        raise RunFolderError(f"run_dir: {path} (or a folder above it) is a file") from None
    except OSError as error:
        raise RunFolderError(f"run_dir: cannot create {path}: {error.strerror}") from None


def _put_in_order(path: Path, config: Config, config_path: str | None) -> RunFolder:
    notes = _discard_interrupted_saves(path)
    _check_writable(path / "checkpoints")
    if not config.resume:
        if found := checkpoint_dirs(path):
            raise ConfigError(
                f"run_dir: {path} already holds a run (checkpoints up to {found[-1].name}); "
                f"use resume={path} to continue it"
            )
        folder = RunFolder(path, None, notes=notes)
    else:
        folder = _resume_point(path, config, config_path, notes)
    if folder.checkpoint is None:
        _start_over(path, folder.notes)
    else:
        folder.final_eval = _truncate_logs(
            path, checkpoint_step(folder.checkpoint), config.train.steps
        )
    return folder


def _resume_point(path: Path, config: Config, config_path: str | None, notes: list[str]):
    # load_config resolves resume= already; this also refuses a Config built some other way
    changes = resume_changes(load_resumed_config(path), config)
    if config_path and Path(config_path).resolve() != (path / "config.yaml").resolve():
        notes.append(f"Resuming with {path}/config.yaml, the run's own: {config_path} is not read")
    if changes:
        shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
        schedule = config.train.lr_schedule
        if schedule != "constant" and any(key == "train.steps" for key, *_ in changes):
            shown += f" (the {schedule} learning-rate schedule now ends at that step)"
        notes.append(f"Changed on resume (recorded in config.yaml): {shown}")
    checkpoint, skipped = newest_intact_checkpoint(path)
    if skipped and checkpoint is None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise RunFolderError(f"resume: no checkpoint in {path} is intact ({reasons})")
    if checkpoint is not None and checkpoint_step(checkpoint) > config.train.steps:
        raise ConfigError(
            f"train.steps: {config.train.steps} is below the step of {path}'s checkpoint "
            f"{checkpoint.name}; give train.steps={checkpoint_step(checkpoint)} or more"
        )
    for damaged, why in skipped:
        aside = _free_name(damaged.with_name(f"{damaged.name}.corrupt"))
        damaged.rename(aside)
        notes.append(
            f"warning: {damaged} is damaged ({why}); moved aside to {aside.name}, resuming from "
            f"{checkpoint.name}"
        )
    if checkpoint is None:
        notes.append(
            f"{path} has no checkpoint yet: the run starts over from step 0 with its config.yaml"
        )
    return RunFolder(path, checkpoint, notes=notes)


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _discard_interrupted_saves(path: Path) -> list[str]:
    root = path / "checkpoints"
    notes = []
    for work in sorted(root.glob(".step-*.tmp")) if root.is_dir() else []:
        shutil.rmtree(work, ignore_errors=True)
        notes.append(f"Discarded {work}: a checkpoint whose writing was interrupted")
    return notes


def _check_writable(checkpoints: Path) -> None:
    """A read-only checkpoints folder fails here, before the model loads, not at the first save.
    (A fresh folder has none yet: the lock file just written shows the folder is writable.)"""
    if not checkpoints.is_dir():
        return
    try:
        probe = checkpoints / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(f"run_dir: cannot write in {checkpoints}: {error.strerror}") from None


def _start_over(path: Path, notes: list[str]) -> None:
    """Step 0 in a folder an earlier attempt wrote logs into: they go, or steps would repeat."""
    left = [path / name for name in ATTEMPT_FILES if (path / name).exists()]
    if not left:
        return
    for item in left:
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    notes.append(
        f"{path} holds a run stopped before its first checkpoint: starting it over "
        f"(discarded {', '.join(p.name for p in left)})"
    )


def _truncate_logs(path: Path, last_step: int, steps: int) -> dict[str, float] | None:
    """Drop log lines of steps after the checkpoint (they will be redone) and a torn last line.
    Returns the logged final evaluation of a run that had finished, so it is not run again."""
    final_eval = None
    for name in LOGS:
        log = path / name
        if not log.exists():
            continue
        kept = [r for r in read_jsonl(log) if _step(r) <= last_step]
        _rewrite(log, kept)
        if name == "metrics.jsonl" and last_step >= steps:
            for record in kept:
                if _step(record) == last_step and "eval/accuracy" in record:
                    final_eval = {k[5:]: v for k, v in record.items() if k.startswith("eval/")}
    return final_eval


def _step(record: dict[str, Any]) -> int:
    step = record.get("step", 0)
    return step if isinstance(step, int) else 0


def _rewrite(log: Path, records: list[dict[str, Any]]) -> None:
    """Replace a log in one rename: a kill while it is rewritten leaves the old one whole."""
    import json

    work = log.with_name(log.name + ".tmp")
    try:
        work.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        os.replace(work, log)
    except OSError as error:
        work.unlink(missing_ok=True)
        raise RunFolderError(f"could not rewrite {log}: {error.strerror}") from None
