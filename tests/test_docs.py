"""The reference under docs/ is an MkDocs site that builds with `mkdocs build --strict`: a
broken link, an anchor that no heading makes or a page left out of the navigation is a
warning, and a warning fails the build. The README, which MkDocs does not read, links into
it: those links are checked here the same way."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from markdown.extensions.toc import slugify

from tests.documents import DOCS, FENCE, ROOT, headings, name

LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
LANDING_PAGE_LINES = 250


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], env=env, capture_output=True, text=True, timeout=300)


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [m["target"] for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m["target"])]


def anchors(path: Path) -> set[str]:
    return {slugify(h["title"].replace("`", ""), "-") for h in headings(path.read_text())}


def test_the_site_builds_strict_with_a_page_for_every_document(tmp_path):
    done = build(ROOT / "mkdocs.yml", tmp_path / "site")

    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
    for page in DOCS.rglob("*.md"):
        built = page.relative_to(DOCS).with_suffix("")
        html = tmp_path / "site" / ("index.html" if built.name == "index" else built / "index.html")
        assert html.exists(), f"{name(page)} was not built"


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    with (tmp_path / "docs" / "index.md").open("a") as page:
        page.write("\n[gone](no-such-page.md) and [nowhere](settings.md#no-such-heading)\n")

    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")

    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr and "#no-such-heading" in done.stderr


def test_every_readme_link_reaches_a_file_and_its_heading():
    readme = ROOT / "README.md"
    for target in links(readme):
        file, _, anchor = target.partition("#")
        path = (readme.parent / file) if file else readme
        assert path.exists(), f"README links to {target}: no such file"
        if anchor:
            assert anchor in anchors(path), f"README links to {target}: no such heading in {name(path)}"


def test_the_readme_links_every_page_of_the_reference():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert not {name(page) for page in DOCS.rglob("*.md") if page.resolve() not in linked}


def test_the_readme_is_a_landing_page_with_the_two_commands_on_top():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= LANDING_PAGE_LINES
    top = "\n".join(lines[:60])
    assert "make demo" in top and "make test" in top
