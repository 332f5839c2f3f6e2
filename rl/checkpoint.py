"""Checkpoints that survive a kill at any moment.

Each checkpoint is written into ``checkpoints/.step-N.tmp`` and renamed to ``step-N`` only
when complete, so a folder named ``step-N`` is always whole; older ones are pruned after the
new one exists.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
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


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
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
    gathered by rl.sharded), saved instead of the model's and optimizer's own."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    work = root / f".step-{step}.tmp"
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
    if final.exists():  # re-saving a step after a resume
        shutil.rmtree(final)
    work.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, the optimizer/scheduler/rng payload) of a checkpoint."""
    state = json.loads((checkpoint / "state.json").read_text())
    payload = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    return state, payload
