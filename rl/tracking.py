"""Experiment trackers: the loop's metrics and sample tables, sent to TensorBoard, Weights &
Biases, MLflow or trackio next to metrics.jsonl.

Each backend is one small class behind the :class:`Tracker` protocol and imports its library
only when opened, so a run without it (and ``aha --help``) never pays for the import. All work
offline: TensorBoard event files in ``RUN_DIR/tensorboard``, wandb in offline mode under
``RUN_DIR/wandb`` (``wandb sync`` uploads later), an MLflow file store in ``RUN_DIR/mlruns``,
and trackio's local database. metrics.jsonl stays the record of truth: a tracker that fails
mid-run is reported once and dropped, never stopping training.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Protocol

from rl.config import Config, ConfigError, TrackingConfig

# The columns of a sample table, in order (samples.jsonl holds more; these are the readable ones).
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward", "rewards", "advantage", "finish_reason")

# Import name and pip requirement of each backend, for the "not installed" message.
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
}


class Tracker(Protocol):
    """One experiment-tracking backend."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at a step (the trainer's step; eval lines share the step they ran at)."""

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        """The step's sampled rollouts (samples.jsonl records), as a table where supported."""

    def close(self) -> None:
        """Flush and finish the run."""


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries: what every backend accepts (NaN means "no value")."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and key != "step"
    }


def sample_rows(samples: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows in SAMPLE_COLUMNS order; the per-function rewards as one short string; a
    multi-turn rollout's completion as its turns, each call and result labelled."""
    from rollouts.agent.summary import transcript

    rows = []
    for sample in samples:
        cells = dict(sample)
        cells["rewards"] = ", ".join(f"{k}={v}" for k, v in (sample.get("rewards") or {}).items())
        if sample.get("turns"):
            cells["completion"] = transcript(sample["turns"])
        rows.append([cells.get(c) for c in SAMPLE_COLUMNS])
    return rows


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR``); samples as a
    markdown table in the Text tab."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + _config_yaml(config) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps its curves up to the last step

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        header = "| " + " | ".join(SAMPLE_COLUMNS) + " |\n|" + "---|" * len(SAMPLE_COLUMNS) + "\n"
        body = "".join(
            "| " + " | ".join(_cell(v) for v in row) + " |\n" for row in sample_rows(samples)
        )
        self.writer.add_text("samples", header + body, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases; offline by default (files under RUN_DIR/wandb, ``wandb sync`` later)."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=config.tracking.project,
            name=config.tracking.run_name or run_dir.name,
            dir=str(run_dir),
            mode="offline" if config.tracking.offline else "online",
            config=dataclasses.asdict(config),
            resume="allow",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        # allow_mixed_types: wandb types each column from its first row and refuses a later
        # row whose cell differs (a field a sample lacks is None) unless told to accept it.
        table = self.wandb.Table(
            columns=list(SAMPLE_COLUMNS), data=sample_rows(samples), allow_mixed_types=True
        )
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """MLflow; a file store in RUN_DIR/mlruns unless tracking.mlflow_uri names a server
    (``mlflow ui --backend-store-uri RUN_DIR/mlruns``). Samples as JSON table artifacts."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        if config.tracking.mlflow_uri is None:
            # MLflow 3 keeps the file store in maintenance and refuses it without this opt-in;
            # it is still the one store that needs no database packages and lives in the run.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.mlflow = mlflow
        uri = config.tracking.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(config.tracking.project)
        self.run = mlflow.start_run(run_name=config.tracking.run_name or run_dir.name)
        flat = _flatten(dataclasses.asdict(config))
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        # MLflow allows only [\w.\- /] in names; a path reward (dir/f.py:fn) has a colon.
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in metrics.items()}, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        columns = {
            c: [row[i] for row in sample_rows(samples)] for i, c in enumerate(SAMPLE_COLUMNS)
        }
        self.mlflow.log_table(columns, artifact_file=f"samples/step-{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioTracker:
    """trackio, local: one SQLite database per project in trackio's folder ($TRACKIO_DIR,
    default ~/.cache/huggingface/trackio); ``trackio show`` opens the dashboard there."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        import trackio

        self.trackio = trackio
        # A run folder's name is not unique across runs (two "runs/test" folders): trackio
        # continues the latest run of that name only when aha continues its run (resume=).
        self.run = trackio.init(
            project=config.tracking.project,
            name=config.tracking.run_name or run_dir.name,
            config=_flatten(dataclasses.asdict(config)),
            resume="allow" if config.resume else "never",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        # The run itself, not trackio.log(): that finds the run in a context variable, which a
        # thread other than the one that opened it does not see.
        self.run.log(metrics, step=step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        # trackio renders a table's strings as Markdown: text cells as one escaped line.
        rows = [
            [v if isinstance(v, int | float) else _cell(v) for v in row]
            for row in sample_rows(samples)
        ]
        table = self.trackio.Table(columns=list(SAMPLE_COLUMNS), data=rows)
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()  # flushes the writer thread into the database
        if self.trackio.context_vars.current_run.get() is self.run:
            self.trackio.context_vars.current_run.set(None)


BACKENDS: dict[str, type] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}


class Trackers:
    """Every configured backend behind one Tracker. A backend that raises is reported once and
    dropped: tracking must not end a run whose metrics.jsonl is still being written."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.trackers = trackers

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 - any backend failure is survivable
                del self.trackers[name]
                print(
                    f"warning: tracking backend {name!r} failed in {method} "
                    f"({type(error).__name__}: {error}); it is switched off for this run",
                    file=sys.stderr,
                )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = scalars(metrics)
        if values:
            self._each("log", values, step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        if samples:
            self._each("log_samples", samples, step)

    def close(self) -> None:
        self._each("close")
        self.trackers = {}


def check_installed(tracking: TrackingConfig) -> None:
    """Fail before any work when a configured backend's package is missing."""
    for name in tracking.backends:
        module, requirement = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"tracking.backends: {name!r} needs the {requirement!r} package "
                f"(pip install {requirement}, or pip install 'aha[tracking]'), or remove it"
            )


def open_trackers(config: Config, run_dir: Path) -> Trackers:
    """The configured backends, opened on this run folder."""
    check_installed(config.tracking)
    return Trackers({name: BACKENDS[name](run_dir, config) for name in config.tracking.backends})


def _config_yaml(config: Config) -> str:
    from rl.config import config_to_yaml

    return config_to_yaml(config)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params and trackio configs read best."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _mlflow_key(key: str) -> str:
    """A name MLflow accepts: only [\\w.- /], and no "//" (it treats names as file paths)."""
    return re.sub(r"/+", "/", re.sub(r"[^\w.\- /]", "_", key)).strip("/")


def _cell(value: Any) -> str:
    """A markdown table cell: one line, pipes escaped, long text cut."""
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= 400 else text[:400] + "…"
