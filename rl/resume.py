"""What a resume may change. A resumed run's config is its own RUN_DIR/config.yaml; only the
KEY=VALUE overrides the user wrote count as changes (never the defaults or a config file given
beside resume=), and each one is either applied and recorded in config.yaml, or refused with the
key named. Never silently dropped."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from rl.config import (
    Config,
    ConfigError,
    _build,
    _defaults_as_data,
    _merge,
    _read_config_file,
    _set_dotted,
    resolve_device_defaults,
    resolve_engine,
    validate,
)

# What a resume may change: how long the run goes on, how often it saves, logs and evaluates,
# where it reports, and resources that do not change what is computed. Everything else (the
# model, data, algorithm, rewards, learning rate...) is the run's: changing it mid-run would make
# a run that no config describes, so it is refused. A key here also covers the keys under it.
RESUMABLE_KEYS = (
    "train.steps",
    "train.save_every",
    "train.keep_checkpoints",
    "train.sample_log_every",
    "train.samples_per_log",
    "train.threads",
    "data.eval_every",
    "rollout.kv_cache_gb",
    "rollout.gpu_memory_utilization",
    "tracking",
)


def load_resumed_config(run_dir: str | Path, pairs: list[tuple[str, Any]] = ()) -> Config:
    """RUN_DIR/config.yaml with the given (key, value) overrides, which may change only
    RESUMABLE_KEYS: any other key that differs from the run's value is a ConfigError naming it.
    Defaults and config files never count as changes: only what ``pairs`` set."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume: {run_dir} is not a run folder (no config.yaml)")
    saved_data = _merge(_defaults_as_data(), _read_config_file(saved_path))
    data = copy.deepcopy(saved_data)
    for key, value in pairs:
        if key == "run_dir":
            if value is not None and Path(str(value)).resolve() != run_dir.resolve():
                raise ConfigError(
                    f"run_dir: a resumed run stays in its own folder {run_dir}; drop run_dir={value}"
                )
            continue
        _set_dotted(data, key, value)
    saved = _build(Config, saved_data)
    # what the machine decides (null in the file: written before it was resolved) is no change
    saved.rollout.engine = resolve_engine(saved.rollout.engine)
    resolve_device_defaults(saved)
    config = _build(Config, data)
    validate(config)
    resume_changes(saved, config)  # refuses a change the run cannot take
    config.resume = config.run_dir = str(run_dir)
    return config


def resume_changes(saved: Config, config: Config) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, the new value) for each key ``config`` changes from the run's
    ``saved`` config; a ConfigError when one of them is not in RESUMABLE_KEYS."""
    before = _flatten(dataclasses.asdict(saved))
    after = _flatten(dataclasses.asdict(config))
    changed = [
        (key, before.get(key), after.get(key))
        for key in dict.fromkeys([*after, *before])
        if key not in ("resume", "run_dir") and before.get(key) != after.get(key)
    ]
    refused = [c for c in changed if not _resumable(c[0])]
    if refused:
        key, old, new = refused[0]
        more = f" (and {', '.join(c[0] for c in refused[1:])})" if refused[1:] else ""
        allowed = ", ".join(k if k.count(".") else f"{k}.*" for k in RESUMABLE_KEYS)
        raise ConfigError(
            f"resume: {key} cannot change when a run resumes (the run has {old!r}, given "
            f"{new!r}){more}; a resume may change only {allowed}; start a new run to change it"
        )
    return changed


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"steps": 3}} -> {"train.steps": 3}; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat
