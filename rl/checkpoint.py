"""Checkpoints that survive a kill at any moment, and a full disk.

Each checkpoint is written into ``checkpoints/.step-N.tmp``, its files flushed to the disk, a
``manifest.json`` with every file's size written last, and only then renamed to ``step-N``; older
ones are pruned after the new one exists. So a folder named ``step-N`` was whole when it was
renamed, and the manifest tells whether it still is (a truncated copy, a deleted file) without
reading the weights. A write that fails (a full or read-only disk) removes its temporary folder
and ends the run with one line; the previous checkpoint is untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch and numpy are imported where they are used: rl.errors names RunFolderError, and the CLI
# imports that for every command, `aha tasks` included.

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")


class RunFolderError(RuntimeError):
    """The run folder cannot be used or written (in use, unwritable, a full disk, a damaged
    checkpoint): one line naming the path and the cause."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints renamed into place (complete when written), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing or cut short), or None when it is
    whole. Reads sizes and headers only, never the tensors."""
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, size in sizes.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None
    # written before manifests: the files a resume reads must be there, each structurally whole
    if not any((checkpoint / name).is_file() for name in _WEIGHTS):
        return "no weights file (model.safetensors or adapter_model.safetensors)"
    for name in ("state.json", "trainer_state.pt"):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((checkpoint / "state.json").read_text())
    except ValueError:
        return "state.json is not valid JSON"
    if not zipfile.is_zipfile(checkpoint / "trainer_state.pt"):  # torch.save writes a zip
        return "trainer_state.pt is cut short (no zip directory at its end)"
    for path in sorted(checkpoint.glob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data: cut short, its size is below the header's last offset."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "is cut short (no header)"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return "is cut short (in its header)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "has a damaged header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"is cut short ({size} bytes, its header needs {8 + length + end})"
    return None


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint, and the newer ones passed over with the reason."""
    skipped = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    # numpy's too: vLLM's GPU model runner draws each request's sampling seed from it
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    if "numpy" in state:  # checkpoints written before numpy's state was saved keep the seed's
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    extra: dict[str, Any],
    keep: int,
    rng_ranks: list[dict[str, Any]] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """``rng_ranks``: every rank's RNG state in a multi-process run (``rng`` is rank 0's).
    ``model_state`` and ``optimizer_state``: the whole ones when the model is sharded (FSDP2,
    gathered by the training scheme, rl/schemes.py), saved instead of the model's and optimizer's own.

    Raises RunFolderError when the disk refuses the write; the temporary folder is removed and
    the previous checkpoint stays as it was."""
    import torch
    from safetensors import SafetensorError

    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    work = root / f".step-{step}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        # with LoRA: the adapter only
        model.save_pretrained(work, safe_serialization=True, state_dict=model_state)
        tokenizer.save_pretrained(work)
        torch.save(
            {
                "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **({"rng_ranks": rng_ranks} if rng_ranks else {}),
            },
            work / "trainer_state.pt",
        )
        (work / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        write_manifest(work)
        if final.exists():  # re-saving a step after a resume
            shutil.rmtree(final)
        work.rename(final)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch and safetensors wrap it
        shutil.rmtree(work, ignore_errors=True)
        raise RunFolderError(_write_failure(run_dir, final, error)) from error
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_manifest(work: Path) -> None:
    """Every file's size, flushed with the files themselves before the rename makes the
    checkpoint visible: after a power cut a renamed folder holds data, not holes. (Public: a
    checkpoint written by other code, TRL's for `aha distill sft`, gets the same.)"""
    sizes = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        sizes[str(path.relative_to(work))] = path.stat().st_size
    manifest = work / MANIFEST
    with manifest.open("w") as handle:
        json.dump({"files": sizes}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(work)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(run_dir: Path, final: Path, error: BaseException) -> str:
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    cause = (cause.splitlines() or [type(error).__name__])[0]
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    try:
        free = f"; {shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free"
    except OSError:
        free = ""
    previous = [p for p in checkpoint_dirs(run_dir) if p != final]
    kept = (
        f"the previous checkpoint {previous[-1].name} is intact, resume={run_dir} continues from it"
        if previous
        else "no earlier checkpoint exists"
    )
    return f"could not write checkpoint {final}: {cause}{where}{free}; {kept}"


def load_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, the optimizer/scheduler/rng payload) of a checkpoint."""
    import torch

    try:
        state = json.loads((checkpoint / "state.json").read_text())
        payload = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    except (OSError, ValueError, RuntimeError, EOFError) as error:
        raise RunFolderError(
            f"checkpoint {checkpoint} cannot be read ({type(error).__name__}: "
            f"{(str(error).splitlines() or [''])[0]}); move it out of checkpoints/ to resume "
            "from the one before"
        ) from None
    return state, payload
