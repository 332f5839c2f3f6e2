"""A self-contained HTML page of a run's sampled rollouts: ``aha view RUN_DIR``.

``RUN_DIR/view.html`` holds samples.jsonl as JSON inside the page and a few lines of inline
JavaScript that render one row per rollout (prompt, completion with its ``<think>`` reasoning
folded, or a multi-turn rollout's turns with each tool call and result, reward per function,
advantage) and filter them by step and reward range. No external
assets: it opens from disk, offline, and can be attached to an issue.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rl.jsonl import read_jsonl


def load_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """samples.jsonl of a run folder as a list of records; a last line cut short by a stop is
    left out with a warning (rl/jsonl.py)."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no samples.jsonl (is it a run folder?)")
    return read_jsonl(path)


def _json_for_script(data: Any) -> str:
    # "</script>" or "<!--" inside a completion must not end the script element.
    text = json.dumps(data, ensure_ascii=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }
label { margin-right: 1em; }
input[type=number] { width: 6em; }
table { border-collapse: collapse; width: 100%; margin-top: 1em; }
th, td { border-bottom: 1px solid #e4e4e4; padding: .4em; vertical-align: top; text-align: left; }
td pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: 13px/1.35 ui-monospace, monospace; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
details { color: #666; margin-bottom: .3em; }
summary { cursor: pointer; }
.pos { color: #0a7d28; } .neg { color: #b3261e; }
.fn { display: block; white-space: nowrap; font-size: 12px; }
.turn { border-left: 3px solid #9ab; padding-left: .5em; margin-bottom: .4em; }
.turn.tool { border-color: #c9a227; background: #fdf9ec; }
.role { font-size: 12px; color: #666; } .call { color: #0b5cad; }
"""

# Renders rows from the JSON with textContent only: completions are model output, never markup.
SCRIPT = """
const samples = JSON.parse(document.getElementById("samples").textContent);
const body = document.querySelector("#rows tbody");
const stepSelect = document.getElementById("step");
const minInput = document.getElementById("min-reward");
const maxInput = document.getElementById("max-reward");
const count = document.getElementById("count");
for (const step of [...new Set(samples.map(s => s.step))].sort((a, b) => a - b)) {
  stepSelect.add(new Option("step " + step, String(step)));
}
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}
function fmt(x) { return typeof x === "number" ? x.toFixed(3) : String(x); }
function completionCell(text) {
  const td = el("td");
  const match = /<think>([\\s\\S]*?)(<\\/think>|$)/.exec(text || "");
  let rest = text || "";
  if (match) {
    const details = el("details");
    details.append(el("summary", "reasoning (" + match[1].length + " chars)"), el("pre", match[1]));
    td.append(details);
    rest = rest.slice(0, match.index) + rest.slice(match.index + match[0].length);
  }
  td.append(el("pre", rest));
  return td;
}
function turnsCell(turns) {
  const td = el("td");
  for (const t of turns) {
    const block = el("div", undefined, "turn " + (t.role === "tool" ? "tool" : "assistant"));
    const label = t.role === "tool" ? "tool " + (t.name || "?") + (t.error ? " (error)" : "") : "assistant";
    block.append(el("span", label, "role"), el("pre", t.content || ""));
    for (const c of t.tool_calls || []) {
      const f = c.function || {};
      block.append(el("pre", "-> " + f.name + "(" + JSON.stringify(f.arguments) + ")", "call"));
    }
    td.append(block);
  }
  return td;
}
function row(s) {
  const tr = el("tr", undefined, "sample");
  tr.dataset.step = s.step;
  tr.append(el("td", String(s.step), "num"));
  const prompt = el("td");
  prompt.append(el("pre", s.prompt));
  if (s.answer !== undefined && s.answer !== null) prompt.append(el("div", "answer: " + s.answer));
  tr.append(prompt, s.turns ? turnsCell(s.turns) : completionCell(s.completion));
  const rewards = el("td", undefined, "num");
  rewards.append(el("b", fmt(s.reward)));
  for (const [name, value] of Object.entries(s.rewards || {})) {
    rewards.append(el("span", name.split(":").pop() + " = " + (value === null ? "n/a" : fmt(value)), "fn"));
  }
  tr.append(rewards);
  const adv = s.advantage;
  tr.append(el("td", fmt(adv), "num " + (adv > 0 ? "pos" : adv < 0 ? "neg" : "")));
  tr.append(el("td", (s.finish_reason || "") + (s.completion_tokens ? " / " + s.completion_tokens + " tok" : "")));
  return tr;
}
function render() {
  const step = stepSelect.value;
  const lo = minInput.value === "" ? -Infinity : Number(minInput.value);
  const hi = maxInput.value === "" ? Infinity : Number(maxInput.value);
  const shown = samples.filter(s => (step === "all" || String(s.step) === step)
    && s.reward >= lo && s.reward <= hi);
  body.replaceChildren(...shown.map(row));
  count.textContent = shown.length + " of " + samples.length + " rollouts";
}
for (const input of [stepSelect, minInput, maxInput]) input.addEventListener("input", render);
render();
"""


def render_html(samples: list[dict[str, Any]], title: str) -> str:
    """The page for these samples.jsonl records."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<label>Step <select id="step"><option value="all">all</option></select></label>
<label>Reward from <input id="min-reward" type="number" step="any"></label>
<label>to <input id="max-reward" type="number" step="any"></label>
<span id="count"></span>
</header>
<table id="rows"><thead><tr><th>step</th><th>prompt</th><th>completion</th>
<th>reward</th><th>advantage</th><th>finish</th></tr></thead><tbody></tbody></table>
<script id="samples" type="application/json">{_json_for_script(samples)}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_view(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default RUN_DIR/view.html) and return its path."""
    run_dir = Path(run_dir)
    page = render_html(load_samples(run_dir), f"aha rollouts: {run_dir.resolve().name}")
    path = Path(out) if out is not None else run_dir / "view.html"
    if path.is_dir():
        raise IsADirectoryError(f"--out: {path} is a folder; the page is one file")
    path.write_text(page)
    return path
