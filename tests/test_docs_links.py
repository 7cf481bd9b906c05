"""Relative links in README.md and docs/*.md point at files that exist (and at headings that exist).

Inline links and images ``[text](target)``, ``![alt](target)`` and reference definitions
``[name]: target`` are checked; links inside fenced code blocks and inline code are not links.
External links (``http:``, ``https:``, ``mailto:``) are not fetched. A ``#fragment`` on a
Markdown target (or alone, for the same file) must match a heading's GitHub anchor.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code removed."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, _CODE_SPAN.sub("", line)


def links(text: str) -> list[tuple[int, str]]:
    out = []
    for n, line in _prose_lines(text):
        targets = [m.group(1) for m in _INLINE.finditer(line)]
        m = _REFDEF.match(line)
        if m:
            targets.append(m.group(1))
        out += [(n, t.strip("<>")) for t in targets]
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: text without markup, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>|[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


def broken(path: Path) -> list[str]:
    """Problems with the relative links of the Markdown file ``path``: 'line N: target (why)'."""
    problems = []
    for n, target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"line {n}: {target} (no such file: {dest})")
        elif fragment and dest.suffix == ".md" and unquote(fragment).lower() not in anchors(dest):
            problems.append(f"line {n}: {target} (no heading #{fragment} in {dest.name})")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken(path) == []


def test_readme_and_results_have_links():
    """The parser finds the links it should (a parser that found none would pass everything)."""
    targets = {t for _, t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert "docs/fip-calibration.md" in targets and "docs/results.md" in targets


def test_checker_catches_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# Title\n\n## A section: here\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "ok [a](docs/there.md), [b](docs/there.md#a-section-here), [c](#top), ![img](docs/) "
        "[web](https://example.org/x)\n"
        "bad [d](docs/missing.md) and [e](docs/there.md#nowhere)\n"
        "```\n[f](in/a/code/block.md)\n```\n"
        "`[g](inline/code.md)`\n"
        "[ref]: docs/gone.png\n"
        "# Top\n"
    )
    problems = broken(doc)
    assert len(problems) == 3, problems
    assert "docs/missing.md" in problems[0] and "#nowhere" in problems[1] and "docs/gone.png" in problems[2]
