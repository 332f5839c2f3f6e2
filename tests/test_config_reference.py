"""docs/configuration.md's config reference is generated from rl/config.py and must match it."""

import dataclasses

from rl import config as config_module
from rl.config_reference import (
    END,
    REFERENCE_PAGE,
    START,
    field_comments,
    page_with_reference,
    render,
    rows,
)

REGENERATE = ".venv/bin/python -m rl.config_reference --write"


def test_config_reference_is_up_to_date():
    page = REFERENCE_PAGE.read_text()
    assert page_with_reference(page) == page, (
        f"docs/configuration.md is out of date with rl/config.py; regenerate it with: {REGENERATE}"
    )


def test_every_field_of_every_section_is_listed():
    table = rows(
        config_module.Config,
        "",
        field_comments(REFERENCE_PAGE.parents[1].joinpath("rl/config.py").read_text()),
    )
    listed = {(section, key) for section, key, *_ in table}
    assert ("tracking", "backends") in listed and ("algorithm", "reward_error_policy") in listed
    assert ("model.lora", "r") in listed and ("rewards[]", "weight") in listed
    assert len(listed) == len(table)
    lora = {f.name for f in dataclasses.fields(config_module.LoraConfig)}
    assert {key for section, key, *_ in table if section == "model.lora"} == lora


def test_comments_trailing_or_above_become_the_description():
    source = """
class A:
    # about x,
    # on two lines
    x: int = 1
    y: str = (
        "a"  # trailing wins
    )
    # a group comment
    z: int = 2  # own comment
"""
    assert field_comments(source) == {
        ("A", "x"): "about x, on two lines",
        ("A", "y"): "trailing wins",
        ("A", "z"): "own comment",
    }


def test_render_escapes_pipes_and_the_markers_wrap_it():
    text = render()
    assert '| `dtype` | `"float32" \\| "bfloat16" \\| "float16"` | `"float32"` |' in text
    page = REFERENCE_PAGE.read_text()
    assert page.index(START) < page.index("#### `tracking`") < page.index(END)
