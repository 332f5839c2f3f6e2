"""The one reader of the run's JSON-lines logs: a last line cut short by a stop is dropped with a
warning; any other bad line is an error naming the file and line (issue 14, item 7)."""

import json

import pytest

from rl.jsonl import JsonlError, read_jsonl

GOOD = [{"step": 1, "reward/mean": 0.25}, {"step": 2, "reward/mean": 0.5}]


def lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize(
    ("text", "records", "warned"),
    [
        (lines(*GOOD), GOOD, None),
        (lines(*GOOD) + "\n\n", GOOD, None),  # blank lines are nothing
        (lines(*GOOD) + '{"step": 3, "rew', GOOD, "line 3: dropped an incomplete last line"),
        (lines(*GOOD)[:-1], GOOD, None),  # cut just before the newline: the record is whole
        (lines(*GOOD) + '{"step": 3}' + "\0" * 64, [*GOOD, {"step": 3}], None),  # unwritten tail
        (lines(*GOOD) + "\0" * 64, GOOD, None),
        (lines(*GOOD) + '{"st\0\0\0', GOOD, "line 3: dropped"),
    ],
    ids=["whole", "blank-lines", "torn", "no-newline", "nul-tail", "only-nuls", "torn-nuls"],
)
def test_a_stop_mid_write_loses_only_the_last_line(tmp_path, text, records, warned):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    warnings = []
    assert read_jsonl(path, warn=warnings.append) == records
    if warned is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith(f"{path}, {warned}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (lines(GOOD[0]) + "{oops\n" + lines(GOOD[1]), "line 2: not JSON"),
        (lines(GOOD[0]) + "[1, 2]\n" + lines(GOOD[1]), "line 2: expected a JSON object, got list"),
        (lines(GOOD[0]) + "\n\n" + "{oops\n" + lines(GOOD[1]), "line 4: not JSON"),
    ],
)
def test_a_bad_line_before_the_last_is_an_error_with_its_number(tmp_path, text, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(JsonlError, match=f"metrics.jsonl, {message}"):
        read_jsonl(path)


def test_a_torn_last_line_is_an_error_where_no_stop_can_explain_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(lines(*GOOD) + '{"step": 3, "rew')
    with pytest.raises(JsonlError, match="rows.jsonl, line 3: not JSON"):
        read_jsonl(path, torn_tail=False)


def test_plot_view_and_figures_read_a_torn_log(tmp_path, capsys):
    from rl.benchmarks.run_figures import step_lines
    from rl.plot import plot_runs
    from rl.view import write_view

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps = [{**r, "loss": 0.1} for r in GOOD]
    (run_dir / "metrics.jsonl").write_text(lines(*steps) + '{"step": 3, "lo')
    sample = {"step": 1, "prompt": "1+1?", "completion": "2", "reward": 1.0, "advantage": 0.5}
    (run_dir / "samples.jsonl").write_text(lines(sample) + '{"step": 2, "prompt": "2+')

    assert [p.name for p in plot_runs([run_dir])] == ["reward.png", "overview.png"]
    assert write_view(run_dir).is_file()
    assert [line["step"] for line in step_lines(run_dir / "metrics.jsonl")] == [1, 2]
    err = capsys.readouterr().err
    assert err.count("dropped an incomplete last line") == 3
