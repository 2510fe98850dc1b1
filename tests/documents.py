"""The project's documents: README.md, the landing page, and the reference pages under
docs/ (an MkDocs site). Tests that check what a document says find its section by heading,
wherever the section lives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOCUMENTS = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(?P<level>#{1,6}) (?P<title>.+?)[ \t]*$", re.MULTILINE)


def name(path: Path) -> str:
    """README.md, docs/settings.md, ...: how a test id or a message names a document."""
    return path.relative_to(ROOT).as_posix()


def headings(text: str) -> list[re.Match]:
    """The headings of a Markdown text, those inside code blocks left out."""
    fenced = [(m.start(), m.end()) for m in FENCE.finditer(text)]
    return [h for h in HEADING.finditer(text) if not any(a <= h.start() < b for a, b in fenced)]


def section(title: str) -> str:
    """The text under the one heading named `title` in all the documents, down to the next
    heading of the same or a higher level."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        marks = headings(text)
        for i, h in enumerate(marks):
            if h["title"] == title:
                level = len(h["level"])
                end = next((m.start() for m in marks[i + 1:] if len(m["level"]) <= level), len(text))
                found.append((name(path), text[h.end():end]))
    assert len(found) == 1, f"heading {title!r} found in {[where for where, _ in found] or 'no document'}"
    return found[0][1]
