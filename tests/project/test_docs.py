"""The README is for arriving and every link in the docs leads somewhere: files exist, anchors are headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
MAX_README_LINES = 150


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#{1,6} (.*)$", line)):
            text = re.sub(r"[`*_]", "", heading[1]).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    text, fenced, kept = page.read_text(), False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.extend(next(group for group in match.groups() if group) for match in LINK.finditer(line))
    return kept


def test_the_readme_is_for_arriving() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= MAX_README_LINES, f"README.md is {len(readme)} lines; the manual belongs in docs/"
    text = "\n".join(readme)
    for must in ("make serve", "make test", "initserve.Client("):
        assert must in text


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert broken == [], f"{page.relative_to(ROOT)}: broken links"


def test_the_readmes_python_works_as_pasted(server) -> None:
    """Every python block of the README, run in order as one session against a real server (its address
    swapped for the README's localhost:50051): each asserts its own bytes."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    code = "\n".join(blocks).replace("localhost:50051", server.target)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the project's own README, run as a user would
