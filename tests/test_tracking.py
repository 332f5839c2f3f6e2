"""Experiment tracking: a tiny run feeds every backend installed here the same metrics as
metrics.jsonl, each read back offline from its own files: TensorBoard's event file, MLflow's file
store, wandb's offline .wandb record log and trackio's SQLite database. It also writes its plots
when it ends."""

import importlib.util
import json
import struct

import pytest
from conftest import ROOT, TRACKIO_DIR

from rl.config import ConfigError, load_config
from rl.run import train
from rl.tracking import PACKAGES, SAMPLE_COLUMNS, Trackers, check_installed, scalars

HAS = {name: importlib.util.find_spec(name) is not None for name in ("mlflow", "wandb", "trackio")}
HAS_MLFLOW = HAS["mlflow"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def jsonl_by_step(run_dir):
    """metrics.jsonl as {step: {key: value}}: an eval line merged into its step's line."""
    steps = {}
    for line in read_jsonl(run_dir / "metrics.jsonl"):
        steps.setdefault(line["step"], {}).update(scalars(line))
    return steps


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 2-step tiny run with every backend installed here, each kept off the network and
    out of the home folder."""
    from conftest import FIXTURES

    root = tmp_path_factory.mktemp("tracked")
    run_dir = root / "run"
    backends = ["tensorboard"] + [name for name in ("mlflow", "wandb", "trackio") if HAS[name]]
    overrides = [
        f"run_dir={run_dir}",
        f"rewards=[{{name: '{FIXTURES / 'plugin_rewards.py'}:digit_count'}}]",
        f"tracking.backends={json.dumps(backends)}",
        "data.eval_size=2",
    ]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(root / name.lower()))
        env.delenv("WANDB_API_KEY", raising=False)
        for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "HF_TOKEN"):
            env.delenv(name, raising=False)
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
    assert read_values == pytest.approx(logged, rel=1e-6)  # stored in float32: 2^-24 = 6e-8
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


def read_wandb_records(path):
    """The records of an offline run's .wandb file: a LevelDB-style log (":W&B" header, 32 KiB
    blocks of [crc32 u32, length u16, type u8] chunks) of wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.skipif(not HAS["wandb"], reason="wandb not installed (pip install wandb)")
def test_wandb_offline_run_holds_the_same_metrics_and_sample_tables(tracked_run):
    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "run" and run.project == "aha"
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history.setdefault(items["_step"], {}).update(items)
    expected = jsonl_by_step(tracked_run)
    assert sorted(history) == sorted(expected)
    for step, metrics in expected.items():
        logged = {k: v for k, v in history[step].items() if not k.startswith(("_", "samples"))}
        assert logged == pytest.approx(metrics), f"step {step}"
    # the completion tables: one per training step, written under the run's files
    tables = sorted(run_file.parent.glob("files/media/table/samples_*.table.json"))
    assert [history[s]["samples/path"] for s in (1, 2)] == [
        str(t.relative_to(run_file.parent / "files")) for t in tables
    ]
    table = json.loads(tables[0].read_text())
    samples = [s for s in read_jsonl(tracked_run / "samples.jsonl") if s["step"] == 1]
    assert table["columns"] == list(SAMPLE_COLUMNS) and len(table["data"]) == len(samples)
    assert [row[2] for row in table["data"]] == [s["completion"] for s in samples]
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished cleanly


@pytest.mark.skipif(not HAS["trackio"], reason="trackio not installed (pip install trackio)")
def test_trackio_database_holds_the_same_metrics_and_sample_tables(tracked_run):
    import sqlite3

    database = TRACKIO_DIR / "aha.db"  # tests/conftest.py
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT step, metrics FROM metrics WHERE run_name = 'run' ORDER BY id"
        ).fetchall()
        (config,) = db.execute("SELECT config FROM configs WHERE run_name = 'run'").fetchone()
    logged, tables = {}, {}
    for step, metrics in rows:
        values = json.loads(metrics)
        if "samples" in values:
            tables[step] = values.pop("samples")
        logged.setdefault(step, {}).update(values)
    expected = jsonl_by_step(tracked_run)
    assert sorted(logged) == sorted(expected)
    for step, metrics in expected.items():
        assert logged[step] == pytest.approx(metrics), f"step {step}"
    assert sorted(tables) == [1, 2]  # a completion table per training step
    samples = [s for s in read_jsonl(tracked_run / "samples.jsonl") if s["step"] == 1]
    assert tables[1]["_type"] == "trackio.table"
    assert len(tables[1]["_value"]) == len(samples)
    assert list(tables[1]["_value"][0]) == list(SAMPLE_COLUMNS)
    assert json.loads(config)["rollout.group_size"] == 4


@pytest.mark.skipif(not HAS["trackio"], reason="trackio not installed (pip install trackio)")
def test_trackio_continues_a_run_only_when_aha_resumes_it(tracked_run, tmp_path):
    """Two run folders of the same name are two trackio runs; resume= continues the run."""
    import sqlite3

    from rl.tracking import TrackioTracker

    run_dir = tmp_path / "run"
    config = load_config(None, ["tracking.project=aha-resume"])
    for resume, step in ((None, 1), (None, 1), (str(run_dir), 2)):
        config.resume = resume
        tracker = TrackioTracker(run_dir, config)
        tracker.log({"reward/mean": float(step)}, step)
        tracker.close()
    with sqlite3.connect(TRACKIO_DIR / "aha-resume.db") as db:
        rows = db.execute("SELECT run_id, step FROM metrics ORDER BY id").fetchall()
    assert len({run_id for run_id, _ in rows}) == 2
    assert rows[2] == (rows[1][0], 2)  # the resumed run is the latest of that name


@pytest.mark.parametrize("backend", ["wandb", "trackio"])
def test_a_missing_backend_fails_at_start_with_the_install_line(backend, monkeypatch):
    # installed here (the dev extra), so its import name points at a module that is not
    monkeypatch.setitem(PACKAGES, backend, ("aha_no_such_module", backend))
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
