"""Every Python example of the README (and of docs/*.md) runs as written: a README that
lies is a failing build. Each example is a program of its own, run against a fresh
namespace after `charging accounts reset` with a worker running. It must not raise, must
not write to stderr (the library prints nothing unless the application configures
logging), and must print exactly the ```text block that follows it, or nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from charging import codec
from charging.app import accounts
from tests.conftest import environment, worker_running

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Example:
    document: str
    line: int
    code: str
    prints: str  # the ```text block right after the example (only blank lines between), or ""


def examples(text: str, document: str = "README.md") -> list[Example]:
    blocks = list(FENCE.finditer(text))
    found = []
    for block, after in zip(blocks, blocks[1:] + [None]):
        if block["lang"] != "python":
            continue
        prints = ""
        if after is not None and after["lang"] == "text" and not text[block.end():after.start()].strip():
            prints = after["body"]
        found.append(Example(document, text.count("\n", 0, block.start()) + 1, block["body"], prints))
    return found


EXAMPLES = [example for path in DOCUMENTS for example in examples(path.read_text(), path.name)]


def test_the_examples_are_found_with_what_they_print():
    assert len(EXAMPLES) >= 3
    sample = "```python\nprint(1)\n```\n\n```text\n1\n```\n```python\npass\n```\n```sh\nls\n```\n"
    assert examples(sample) == [Example("README.md", 1, "print(1)\n", "1\n"), Example("README.md", 8, "pass\n", "")]


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e.document}:{e.line}" for e in EXAMPLES])
def test_example_runs_and_prints_what_the_document_shows(example, client, settings, tmp_path):
    codec.set_balances(client, settings, [(account, 100) for account in accounts.numbered(100)])
    env = {**os.environ, **environment(settings)}

    with worker_running(settings):
        done = subprocess.run([sys.executable, "-c", example.code], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == example.prints
