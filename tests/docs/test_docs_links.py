"""The docs' links and cross-references resolve, and no Markdown table is empty (reads files only, no network).

What counts as a reference, and what makes it valid:

- a Markdown link ``[text](target)`` in README.md, CHANGELOG.md or docs/*.md whose target is not a URL: the
  file exists, relative to the page; a ``#anchor`` (alone, or after a ``.md`` target) is the GitHub slug of
  a heading of that page;
- a path to a Markdown file in Python source or comments under fastcontrast/, kernels/, benchmarks/ and
  tests/ (``docs/kernels.md``, ``README.md#first-run-on-a-gpu``): the file exists, relative to the repository
  root or to the source file, and its ``#anchor`` names a heading of it. This is the one form a section
  reference takes; ``§`` is not used (it used to point at a design note that is not part of the repository),
  and neither are the names of documents outside it (``DESIGN``, ``STYLE.md``);
- a quoted heading named as a section of a page, ``README.md's "Install"`` or ``the "Install" section``: a
  heading of that page (of README.md or any docs/ page when the page is not named) has that text.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / "README.md").is_file():
    # The packaging smokes run the test suite copied away from the checkout, without the pages it checks.
    pytest.skip("README.md and docs/ are not beside tests/ here", allow_module_level=True)
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
SOURCE_DIRS = ("fastcontrast", "kernels", "benchmarks", "tests")


FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# Not after a quote: a quoted "name.md" in code is a file name the code builds a path from, not a reference.
SOURCE_MD_PATH = re.compile(r"(?<![\w/.\-\"'])((?:\.\./|\./)*(?:[\w\-]+/)*[\w\-]+\.md)(#[\w\-]+)?")
NAMED_SECTION = re.compile(r"""([\w/.\-]+\.md|README)(?:'s)?\s+"([^"\n]+)"(?:\s+section)?""")
QUOTED_SECTION = re.compile(r""""([^"\n]+)"\s+section|section\s+"([^"\n]+)\"""")
FORBIDDEN = re.compile(r"§|\bDESIGN\b|\bSTYLE\.md\b")


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code marks dropped), lower-cased, every character
    that is not a letter, digit, ``_``, ``-`` or space removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


def _lines_outside_code(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def headings(page: Path) -> list[str]:
    return [m.group(2) for _, line in _lines_outside_code(page.read_text()) if (m := HEADING.match(line))]


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives the page's headings (a repeated slug gets -1, -2, …)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(page):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def _relative(path: Path) -> Path:
    return path.relative_to(ROOT)


def _source_files() -> list[Path]:
    # This file is left out: its docstring and patterns spell out the forms it forbids.
    this = Path(__file__).resolve()
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if p.resolve() != this)


def _check_md_target(target: Path, anchor: str, where: str) -> list[str]:
    if not target.is_file():
        return [f"{where}: {target} does not exist"]
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return [f"{where}: {_relative(target)} has no heading with anchor #{anchor} "
                f"(its anchors: {sorted(anchors(target))})"]
    return []


def _relative_or_none(path: Path):
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return None


def test_github_slug_follows_githubs_rules():
    assert github_slug("Modelled H100 / H200 time (a model, not a measurement)") == (
        "modelled-h100--h200-time-a-model-not-a-measurement"
    )
    assert github_slug('The ring exchange (`exchange="ring"`)') == "the-ring-exchange-exchangering"
    assert github_slug("Choosing `chunk_bytes`") == "choosing-chunk_bytes"
    assert github_slug("[Install](#x) from a checkout") == "install-from-a-checkout"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(_relative(p)))
def test_every_relative_link_of_a_page_resolves(page):
    problems = []
    for number, line in _lines_outside_code(page.read_text()):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            problems += _check_md_target(resolved, anchor, f"{_relative(page)}:{number} ({target})")
    assert not problems, "dead links:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(_relative(p)))
def test_no_markdown_table_of_a_page_is_empty(page):
    lines = list(_lines_outside_code(page.read_text()))
    separator = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
    empty = []
    for index, (number, line) in enumerate(lines):
        if index == 0 or not separator.match(line) or not lines[index - 1][1].lstrip().startswith("|"):
            continue
        body = 0
        for next_number, next_line in lines[index + 1:]:
            if next_number != number + 1 + body or not next_line.lstrip().startswith("|"):
                break
            body += 1
        if body == 0:
            empty.append(f"{_relative(page)}:{lines[index - 1][0]}: {lines[index - 1][1].strip()[:80]}")
    assert not empty, "tables with a header and no rows:\n" + "\n".join(empty)


def test_every_md_path_in_the_sources_resolves():
    problems = []
    for source in _source_files():
        for number, line in enumerate(source.read_text().splitlines(), 1):
            for match in SOURCE_MD_PATH.finditer(line):
                path_text, anchor = match.group(1), (match.group(2) or "")[1:]
                candidates = [ROOT / path_text, source.parent / path_text]
                target = next((c for c in candidates if c.is_file()), candidates[0])
                problems += _check_md_target(target, anchor, f"{_relative(source)}:{number} ({match.group(0)})")
    assert not problems, "dead references to Markdown pages:\n" + "\n".join(problems)


def test_no_section_sign_or_outside_document_is_referenced():
    found = []
    for path in [*_source_files(), *PAGES]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append(f"{_relative(path)}:{number}: {line.strip()[:100]}")
    assert not found, (
        "references to sections by § or to documents outside the repository; name a page and its heading "
        "instead (docs/kernels.md#the-math-two-log-sum-exps):\n" + "\n".join(found)
    )


def test_every_quoted_section_names_a_real_heading():
    all_headings = {h.lower() for page in PAGES for h in headings(page)}
    problems = []
    for path in [*_source_files(), *PAGES]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in NAMED_SECTION.finditer(line):
                page_name, title = match.groups()
                page = ROOT / ("README.md" if page_name == "README" else page_name)
                if not page.is_file():
                    page = path.parent / page_name
                if not page.is_file() or title.lower() not in {h.lower() for h in headings(page)}:
                    problems.append(f"{_relative(path)}:{number}: {page_name} has no section {title!r}")
            for match in QUOTED_SECTION.finditer(line):
                title = match.group(1) or match.group(2)
                if title.lower() not in all_headings:
                    problems.append(f"{_relative(path)}:{number}: no page has a section {title!r}")
    assert not problems, "\n".join(problems)
