"""Experiment tracking: a tiny run feeds TensorBoard (read back from the event file) and MLflow's
offline file store the same metrics as metrics.jsonl, and writes its plots when it ends."""

import importlib.util
import json

import pytest
from conftest import ROOT

from rl.config import ConfigError, load_config
from rl.run import train
from rl.tracking import Trackers, check_installed, scalars

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 2-step tiny run with every backend installed here (TensorBoard, MLflow if present)."""
    from conftest import FIXTURES

    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    backends = ["tensorboard", "mlflow"] if HAS_MLFLOW else ["tensorboard"]
    overrides = [
        f"run_dir={run_dir}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count'}}]",
        f"tracking.backends={json.dumps(backends)}",
        "data.eval_size=2",
    ]
    train(load_config(ROOT / "configs" / "tiny.yaml", overrides), progress=False)
    return run_dir


def test_tensorboard_event_file_holds_the_jsonl_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
    lines = read_jsonl(tracked_run / "metrics.jsonl")
    expected = {k for line in lines for k in scalars(line)}
    assert {"reward/mean", "entropy", "timing_s/step", "eval/accuracy"} <= expected
    assert expected <= tags, f"missing in TensorBoard: {expected - tags}"
    logged = [line["reward/mean"] for line in lines if "reward/mean" in line]
    read = events.Scalars("reward/mean") if "reward/mean" in events.Tags()["scalars"] else None
    if read is None:  # newer writers store scalars as tensors
        from tensorboard.util import tensor_util

        read_values = [
            float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors("reward/mean")
        ]
    else:
        read_values = [e.value for e in read]
    assert read_values == pytest.approx(logged, rel=1e-6)
    assert "samples/text_summary" in tags  # the completion table, in the Text tab


def test_the_run_writes_its_plots_when_it_ends(tracked_run):
    plots = {p.name for p in (tracked_run / "plots").glob("*.png")}
    assert {"reward.png", "reward_functions.png", "eval_accuracy.png", "overview.png"} <= plots


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed (pip install mlflow-skinny)")
def test_mlflow_file_store_holds_the_same_metrics_and_sample_tables(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "aha"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    logged = [
        line["reward/mean"]
        for line in read_jsonl(tracked_run / "metrics.jsonl")
        if "reward/mean" in line
    ]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(logged)
    # a path reward's name has a colon, which MLflow does not allow: it arrives as "_"
    assert any(k.endswith("digit_count/mean") for k in run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts and artifacts[0].endswith(".json")
    assert run.data.params["rollout.group_size"] == "4"


@pytest.mark.parametrize("backend", ["wandb", "trackio"])
def test_a_missing_backend_fails_at_start_with_the_install_line(backend):
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    config = load_config(None, [f"tracking.backends=[{backend}]"])
    with pytest.raises(ConfigError, match=f"pip install {backend}"):
        check_installed(config.tracking)


def test_a_failing_backend_is_dropped_and_the_others_go_on(capsys):
    class Broken:
        def log(self, metrics, step):
            raise OSError("disk full")

    class Recorder:
        def __init__(self):
            self.seen = []

        def log(self, metrics, step):
            self.seen.append((step, metrics))

    recorder = Recorder()
    trackers = Trackers({"broken": Broken(), "ok": recorder})
    trackers.log({"reward/mean": 1.0, "reward/x/mean": float("nan"), "note": "text"}, 1)
    trackers.log({"reward/mean": 2.0}, 2)
    assert recorder.seen == [(1, {"reward/mean": 1.0}), (2, {"reward/mean": 2.0})]
    assert list(trackers.trackers) == ["ok"]
    assert "'broken' failed in log (OSError: disk full)" in capsys.readouterr().err
