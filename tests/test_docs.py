"""The README and docs/ stay in step with the repository: links resolve, every page is reachable
from the README, the files and modules they name exist, and CI runs the README's test command."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(page.read_text()) if "://" not in m.group(1)]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = [link for link in _links(page) if not (page.parent / link).exists()]
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link).resolve() for link in _links(README)}
    assert PAGES and not [p.name for p in PAGES if p.resolve() not in linked]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_named_config_files_and_modules_exist(page):
    text = page.read_text()
    configs = set(re.findall(r"(?<![\w/.])configs/[\w/.-]+\.yaml", text))
    missing = [c for c in configs if not (ROOT / c).is_file()]
    modules = set(re.findall(r"python -m ((?:rl|rewards|rollouts)(?:\.\w+)+)", text))
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"{page.name} names what does not exist: {missing}"


def test_ci_runs_the_readme_test_command():
    command = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ][-1]
    assert command in README.read_text()
