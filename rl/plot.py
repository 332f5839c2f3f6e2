"""PNG plots of one or more runs' metrics.jsonl, runs overlaid: ``aha plot RUN_DIR ...``.

One PNG per panel (reward, reward per function, held-out accuracy, response length, KL, entropy,
clip fraction, step timings; a mixture of experts' router mismatch, load entropy and expert
shares per layer) and ``overview.png`` with every panel that has data. Uses
matplotlib's object API on the Agg canvas, so it never needs a display or touches pyplot's
global state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.jsonl import read_jsonl


@dataclass(frozen=True)
class Panel:
    """One plot: the metric keys it draws (regular expressions matched in full)."""

    file: str
    title: str
    patterns: tuple[str, ...]
    ylabel: str = ""


PANELS = (
    Panel("reward.png", "Reward (total)", (r"reward/mean",), "reward"),
    Panel(
        "reward_functions.png", "Reward per function", (r"reward/(?!mean$|std$).+/mean",), "reward"
    ),
    Panel("eval_accuracy.png", "Held-out accuracy", (r"eval/accuracy",), "accuracy"),
    Panel("response_length.png", "Response length", (r"response_length/(mean|max)",), "tokens"),
    Panel("kl.png", "KL to the reference", (r"kl",), "KL"),
    Panel("entropy.png", "Entropy", (r"entropy",), "nats / token"),
    Panel("clip_fraction.png", "Clip fraction (policy ratio)", (r"clip_ratio/.+",), "fraction"),
    Panel("truncated.png", "Truncated at max_tokens", (r"response_length/clip_ratio",), "fraction"),
    Panel("timing.png", "Step timings", (r"timing_s/.+",), "seconds"),
    # mixture-of-experts policies (docs/moe.md)
    Panel(
        "moe_router_mismatch.png",
        "Router decisions unlike the sampler's",
        (r"moe/router_mismatch",),
        "fraction",
    ),
    Panel(
        "moe_load_entropy.png",
        "Expert load entropy per layer",
        (r"moe/load_entropy/.+",),
        "entropy / log E",
    ),
    Panel(
        "moe_expert_share.png", "Expert shares per layer", (r"moe/(max_)?expert_share/.+",), "share"
    ),
)
# A panel with more lines than this draws no legend (a MoE's experts x layers): it would hide
# the plot; the lines are the keys of metrics.jsonl.
MAX_LEGEND = 24


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run folder as a list of records (training and eval lines); a last
    line cut short by a stop is left out with a warning (rl/jsonl.py)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run folder?)")
    return read_jsonl(path)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping lines without it and non-finite values."""
    points = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def panel_keys(panel: Panel, records: list[dict[str, Any]]) -> list[str]:
    """The metric keys of these records that the panel draws, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if any(re.fullmatch(p, key) for p in panel.patterns):
                seen.setdefault(key)
    return list(seen)


def _short(key: str) -> str:
    """reward//a/b/rewards.py:fn/mean -> reward/rewards.py:fn/mean: legends stay readable."""
    return re.sub(r"/[^:]*/([^/:]+\.py:)", r"/\1", key)


def _draw(ax, panel: Panel, runs: dict[str, list[dict[str, Any]]]) -> bool:
    """Draw the panel's lines on `ax`; False when no run has data for it."""
    from matplotlib.ticker import MaxNLocator

    drawn, lines = False, 0
    for run_name, records in runs.items():
        for key in panel_keys(panel, records):
            steps, values = series(records, key)
            if not steps:
                continue
            label = _short(key) if len(runs) == 1 else f"{run_name}: {_short(key)}"
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, ms=3, label=label)
            drawn, lines = True, lines + 1
    if drawn:
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if lines <= MAX_LEGEND:
            ax.legend(fontsize="small")
    return drawn


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel with data, and overview.png, into `out` (default: the first
    run's plots/ folder). Returns the files written."""
    from matplotlib.figure import Figure

    run_paths = [Path(r) for r in run_dirs]
    runs = _named_runs(run_paths)  # first: a folder that is not a run gets no plots/ folder
    out_dir = Path(out) if out is not None else run_paths[0] / "plots"
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out: {out_dir} is a file; plots go into a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with_data = []
    for panel in PANELS:
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        if _draw(figure.add_subplot(), panel, runs):
            figure.savefig(out_dir / panel.file, dpi=100)
            written.append(out_dir / panel.file)
            with_data.append(panel)
    if with_data:
        columns = min(3, len(with_data))
        rows = math.ceil(len(with_data) / columns)
        figure = Figure(figsize=(6 * columns, 4 * rows), layout="constrained")
        for i, panel in enumerate(with_data):
            _draw(figure.add_subplot(rows, columns, i + 1), panel, runs)
        figure.suptitle(", ".join(runs))
        figure.savefig(out_dir / "overview.png", dpi=80)
        written.append(out_dir / "overview.png")
    return written


def _named_runs(run_paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Each run's records under a short unique label (its folder name, or more of its path)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for i, path in enumerate(run_paths):
        name = path.resolve().name
        if name in runs:
            name = f"{path} [{i + 1}]"
        runs[name] = load_metrics(path)
    return runs
