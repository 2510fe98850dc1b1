"""Every example of the README and of the pages under docs/ runs as written: a document
that lies is a failing build.

A ```python block is a program of its own, run against a fresh namespace after `charging
accounts reset` with a worker running. It must not raise, must not write to stderr (the
library prints nothing unless the application configures logging), and must print exactly
the ```text block that follows it, or nothing.

A ```console block is a terminal session: every `$ charging ...` line is typed as it stands,
against a fresh namespace per document (its sessions run in order, one after the other), and
must print exactly the lines below it on stdout, and exit 0 unless a last line says
`(exit N)`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from charging import codec
from charging.app import accounts
from tests.conftest import CHARGING, environment, worker_running
from tests.documents import DOCUMENTS, FENCE, name

EXIT = re.compile(r"^\(exit (\d+)\)$")


@dataclass(frozen=True)
class Example:
    document: str
    line: int
    code: str
    prints: str  # the ```text block right after the example (only blank lines between), or ""


@dataclass(frozen=True)
class Typed:
    """One `$ charging ...` line of a console block, what it prints and how it exits."""
    document: str
    line: int
    command: str
    prints: str
    exit_code: int


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


def session(text: str, document: str = "README.md") -> list[Typed]:
    """The commands of every console block of a text, in order."""
    typed = []
    for block in FENCE.finditer(text):
        if block["lang"] != "console":
            continue
        first = text.count("\n", 0, block.start()) + 2
        lines = block["body"].splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
        assert starts[:1] == [0], f"{document}:{first}: a console block starts with a `$ ` line"
        for i, end in zip(starts, starts[1:] + [len(lines)]):
            output = lines[i + 1:end]
            exit_code = 0
            if output and (last := EXIT.match(output[-1])):
                exit_code, output = int(last[1]), output[:-1]
            typed.append(Typed(document, first + i, lines[i][2:], "".join(f"{line}\n" for line in output), exit_code))
    return typed


EXAMPLES = [example for path in DOCUMENTS for example in examples(path.read_text(), name(path))]
SESSIONS = {name(path): typed for path in DOCUMENTS if (typed := session(path.read_text(), name(path)))}


def test_the_examples_are_found_with_what_they_print():
    assert len(EXAMPLES) >= 3
    assert {example.document for example in EXAMPLES} > {"README.md"}, "the examples of docs/ are found too"
    sample = "```python\nprint(1)\n```\n\n```text\n1\n```\n```python\npass\n```\n```sh\nls\n```\n"
    assert examples(sample) == [Example("README.md", 1, "print(1)\n", "1\n"), Example("README.md", 8, "pass\n", "")]


def test_the_console_sessions_are_found_with_what_they_print_and_their_exit_codes():
    assert "README.md" in SESSIONS, "the README's tour is typed"
    sample = "```console\n$ charging a\none\ntwo\n$ charging b\n(exit 1)\n```\n\n```console\n$ charging c\n```\n"
    assert session(sample) == [Typed("README.md", 2, "charging a", "one\ntwo\n", 0),
                               Typed("README.md", 5, "charging b", "", 1),
                               Typed("README.md", 10, "charging c", "", 0)]


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e.document}:{e.line}" for e in EXAMPLES])
def test_example_runs_and_prints_what_the_document_shows(example, client, settings, tmp_path):
    codec.set_balances(client, settings, [(account, 100) for account in accounts.numbered(100)])
    env = {**os.environ, **environment(settings)}

    with worker_running(settings):
        run_example(example, env, tmp_path)


def run_example(example: Example, env: dict[str, str], cwd) -> None:
    """Run a ```python example (a worker running) and check what it prints."""
    done = subprocess.run([sys.executable, "-c", example.code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)

    assert done.returncode == 0, f"{example.document}:{example.line}\n{done.stderr}"
    assert done.stderr == ""
    assert done.stdout == example.prints, f"{example.document}:{example.line}"


@pytest.mark.parametrize("document", sorted(SESSIONS))
def test_console_session_prints_what_the_document_shows(document, settings, tmp_path):
    type_session(SESSIONS[document], {**os.environ, **environment(settings)}, tmp_path)


def type_session(session: list[Typed], env: dict[str, str], cwd) -> None:
    """Type a document's `$ charging` lines in order and check what each prints and exits with."""
    for typed in session:
        where = f"{typed.document}:{typed.line}: {typed.command}"
        [program, *args] = shlex.split(typed.command)
        assert program == "charging", f"{where}: only `charging` lines are typed"

        done = subprocess.run([CHARGING, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)

        assert (done.returncode, done.stdout) == (typed.exit_code, typed.prints), f"{where}\n{done.stderr}"
