"""aha view: the HTML page of rollouts renders its rows in headless Chromium (JS on), folds the
reasoning, filters by step and reward, and keeps model output as text, never markup."""

import json
import shutil
import subprocess

import pytest

from rl.view import render_html, write_view

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL_HINT = "headless Chromium is needed for this test: apt-get install -y chromium (Debian)"

SAMPLES = [
    {
        "step": 1,
        "prompt": "What is 2+2?",
        "completion": "<think>two and two</think> <answer>4</answer>",
        "answer": "4",
        "rewards": {"math": 1.0, "format": 1.0},
        "reward": 1.2,
        "advantage": 0.8,
        "finish_reason": "stop",
        "completion_tokens": 12,
    },
    {
        "step": 1,
        "prompt": "What is 3+3?",
        "completion": "</script><script>document.title='pwned'</script><b>7</b>",
        "answer": "6",
        "rewards": {"math": 0.0, "format": None},
        "reward": 0.0,
        "advantage": -0.8,
        "finish_reason": "length",
        "completion_tokens": 16,
    },
    {
        "step": 2,
        "prompt": "What is 1+1?",
        "completion": "<think>one plus one</think> <answer>2</answer>",
        "answer": "2",
        "rewards": {"math": 1.0, "format": 1.0},
        "reward": 1.2,
        "advantage": 0.0,
        "finish_reason": "stop",
        "completion_tokens": 10,
    },
]


def dump_dom(page, tmp_path, query=""):
    """The page's DOM after its scripts ran, from headless Chromium."""
    if CHROMIUM is None:
        pytest.fail(INSTALL_HINT)
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--dump-dom",
        page.resolve().as_uri() + query,
    ]
    done = subprocess.run(command, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode("utf-8", errors="replace")


@pytest.fixture
def page(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return write_view(run)


def test_the_page_renders_one_row_per_rollout_in_chromium(page, tmp_path):
    dom = dump_dom(page, tmp_path)
    assert dom.count('<tr class="sample"') == len(SAMPLES)
    assert "3 of 3 rollouts" in dom
    assert "<summary>reasoning (11 chars)</summary>" in dom  # <think> folded
    assert '<option value="2">step 2</option>' in dom
    # model output is text: the injected script neither ran nor became elements
    assert "<title>aha rollouts: run</title>" in dom
    assert "&lt;/script&gt;&lt;script&gt;" in dom and "<b>7</b>" not in dom


def test_the_page_is_self_contained(page):
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "src=" not in text


def test_filtering_by_reward_in_chromium(tmp_path):
    # Preset the inputs in the page as a user would type them, then let the script render.
    html = render_html(SAMPLES, "t").replace(
        '<input id="min-reward" type="number" step="any">',
        '<input id="min-reward" type="number" step="any" value="1">',
    )
    page = tmp_path / "filtered.html"
    page.write_text(html)
    dom = dump_dom(page, tmp_path)
    assert dom.count('<tr class="sample"') == 2 and "2 of 3 rollouts" in dom


def test_cli_writes_view_html(page, tmp_path):
    from conftest import aha_command

    done = subprocess.run(
        [*aha_command(), "view", str(page.parent)], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("view.html")
