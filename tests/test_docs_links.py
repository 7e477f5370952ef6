"""The README and docs/ pages: short README, working relative links, and tests that exist.

The docs name the test behind every guarantee; a renamed or deleted test, a moved page or a
renamed heading would otherwise leave a reference that points nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250  # issue 17: a README that fits on a screen or two

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
QUALIFIED_TEST = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")
BARE_TEST = re.compile(r"`(test_[a-z0-9]+_\w+)`")  # two words at least: not `test_path`


def _prose(path: Path) -> str:
    """The page without its fenced code blocks, where brackets are code, not links."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", _prose(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _defined_tests(path: Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_a_file_and_heading(page: Path):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_tests_exist(page: Path):
    text = page.read_text()
    every_test = set().union(*(_defined_tests(p) for p in (REPO / "tests").glob("test_*.py")))
    missing = [
        f"{file}::{name}"
        for file, name in QUALIFIED_TEST.findall(text)
        if not (REPO / file).exists() or name not in _defined_tests(REPO / file)
    ]
    missing += [name for name in BARE_TEST.findall(text) if name not in every_test]
    assert not missing, f"{page.name} names tests that do not exist: {missing}"


def test_readme_is_short_and_links_every_docs_page():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(README))}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
