"""The config reference (docs/configuration.md), generated from the dataclasses in rl/config.py.

Each field's description is its comment in rl/config.py: the trailing ``# comment`` on the
field's lines, or else the comment block right above it. So config.py stays the one place a
field is documented, and ``tests/test_config_reference.py`` fails when the page drifts:

    python -m rl.config_reference --write    # regenerate docs/configuration.md's section
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from rl import config as config_module

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REFERENCE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): comment text} for the annotated fields in `source`."""
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            lines = range(item.lineno, (item.end_lineno or item.lineno) + 1)
            trailing = [comments[n] for n in lines if n in comments]
            above = []
            line = item.lineno - 1
            while line in comments and line not in code_lines:  # a block of comment-only lines
                above.insert(0, comments[line])
                line -= 1
            found[(node.name, item.target.id)] = " ".join(trailing or above)
    return found


def type_text(tp: Any) -> str:
    """A field type as a reader writes it: `str | null`, `"a" | "b"`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_text(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    text = json.dumps(value) if not isinstance(value, str) else json.dumps(value)
    text = "null" if value is None else text
    return text if len(text) <= 60 else text[:57] + "…"


def rows(cls: type, section: str, comments: dict[tuple[str, str], str]) -> list[tuple]:
    """(section, key, type, default, description) per field; nested config classes recurse."""
    out = []
    nested = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{section}.{field.name}" if section else field.name))
            continue
        doc = comments.get((cls.__name__, field.name), "")
        out.append((section, field.name, type_text(tp), default_text(field), doc))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            nested.append((item, f"{field.name}[]"))
    for tp, name in nested:
        out.extend(rows(tp, name, comments))
    return out


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def render() -> str:
    """The markdown reference: one table per section, in Config's order."""
    source = Path(config_module.__file__).read_text()
    table = rows(config_module.Config, "", field_comments(source))
    sections: dict[str, list[tuple]] = {}
    for row in table:
        sections.setdefault(row[0], []).append(row)
    parts = []
    for section, items in sections.items():
        title = f"`{section}`" if section else "top level"
        lines = [f"#### {title}", "", "| key | type | default | what |", "|---|---|---|---|"]
        for _, key, tp, default, doc in items:
            lines.append(f"| `{key}` | {_cell(tp, True)} | {_cell(default, True)} | {_cell(doc)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def page_with_reference(page: str) -> str:
    """The page's text with the block between the markers replaced by render()."""
    if START not in page or END not in page:
        raise ValueError(f"{REFERENCE_PAGE.name} has no {START} ... {END} markers")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n<!-- generated by `python -m rl.config_reference --write`; edit rl/config.py -->\n\n{render()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rl.config_reference",
        description="Print the config reference, or write it into docs/configuration.md between the markers.",
    )
    parser.add_argument("--write", action="store_true", help=f"update {REFERENCE_PAGE} in place")
    args = parser.parse_args(argv)
    if args.write:
        REFERENCE_PAGE.write_text(page_with_reference(REFERENCE_PAGE.read_text()))
        print(f"updated {REFERENCE_PAGE}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
