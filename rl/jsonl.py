"""The one reader of aha's JSON-lines logs (metrics.jsonl, samples.jsonl): resume, `aha plot`,
`aha view` and the benchmark figures all read them through here.

A run appends one line per record, so a kill (or a full disk) in the middle of a write can
leave the last line cut short. That line is the only damage a stop can do: it is dropped with a
warning. A bad line anywhere else was not made by a stop; it is an error naming the file and the
line, so that a damaged log is never read as a shorter one without anyone being told.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A JSON-lines file with a bad line, said in one line with the file and line number."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_jsonl(
    path: str | Path,
    torn_tail: bool = True,
    warn: Callable[[str], None] = _warn,
) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per non-blank line, in order.

    ``torn_tail``: a last line that is not valid JSON is a write cut short by a stop; it is
    dropped and ``warn`` says so. Any other bad line (or a last one with ``torn_tail=False``,
    e.g. in a dataset file nobody was appending to) raises JsonlError with its line number.
    """
    path = Path(path)
    numbered = [
        (number, text)
        for number, text in enumerate(path.read_text(errors="replace").split("\n"), start=1)
        if text.strip(" \t\r\x00")  # a crash can leave NUL bytes where unwritten data was
    ]
    records = []
    for position, (number, text) in enumerate(numbered):
        try:
            record = json.loads(text.strip("\x00"))
        except json.JSONDecodeError as error:
            if torn_tail and position == len(numbered) - 1:
                warn(f"{path}, line {number}: dropped an incomplete last line (a stop mid-write)")
                break
            raise JsonlError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise JsonlError(
                f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
            )
        records.append(record)
    return records


def first_bad_line(path: str | Path) -> str | None:
    """Where a JSON-lines file stops being JSON lines ("FILE, line N: ..."), or None."""
    try:
        read_jsonl(path, torn_tail=False)
    except JsonlError as error:
        return str(error)
    return None
