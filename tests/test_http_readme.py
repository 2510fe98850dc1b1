"""The examples of the "HTTP API" page (docs/http-api.md), run as written: each transcript's `$` lines go to bash
(with real curl) against a `charging serve` and a `charging worker` of this test, and each
command must print what the page shows under it. Two kinds of value differ from run to
run and are compared as "some whole number": the times (submitted_at, processed_at,
expires_at). Port 8000 on the page is the test gateway's free port, 8001 another free one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from charging.tools.redis_server import free_port
from tests import documents
from tests.conftest import CHARGING, environment
from tests.gateway import Served

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed "
                                                   "(scripts/install-system-deps installs it)")]

TIMES = ("submitted_at", "processed_at", "expires_at")
MARK = "@@@ command {} @@@"


def transcripts() -> list[list[tuple[str, str]]]:
    """Every code block of the "HTTP API" section that holds `$` lines: (command, output) pairs."""
    section = documents.section("HTTP API")
    found = []
    for language, block in re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M):
        pairs: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                pairs.append((line[2:], []))
            elif pairs:
                pairs[-1][1].append(line)
        if pairs and not language:
            found.append([(command, "\n".join(out)) for command, out in pairs])
    return found


def run(commands: list[str], ports: dict[str, int], cwd: Path, env: dict[str, str]) -> list[str]:
    script = ""
    for number, command in enumerate(commands):
        for shown, port in ports.items():
            command = command.replace(f"localhost:{shown}", f"127.0.0.1:{port}").replace(
                f"--port {shown}", f"--port {port}")
        script += f"echo '{MARK.format(number)}'\n{command}\n"
    done = subprocess.run(["bash", "-c", script + "wait\n"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    outputs = re.split(r"@@@ command \d+ @@@\n", done.stdout)[1:]
    assert len(outputs) == len(commands), done.stdout
    return [o.rstrip("\n") for o in outputs]


def same(shown: str, printed: str) -> bool:
    if shown == printed:
        return True
    try:
        want, got = json.loads(shown), json.loads(printed)
    except ValueError:
        return False
    for name in TIMES:
        if name in want and isinstance(want[name], int) and isinstance(got.get(name), int):
            want[name] = got[name]
    return want == got


def test_the_http_page_has_examples():
    assert len(transcripts()) >= 2 and sum(len(t) for t in transcripts()) >= 10


def test_every_http_example_prints_what_the_page_shows(settings, tmp_path):
    env = {**os.environ, **environment(settings)}
    worker = subprocess.Popen([CHARGING, "worker", "--consumer", "readme"], env=env, stderr=subprocess.DEVNULL)
    try:
        run_the_page(settings, tmp_path)
    finally:
        worker.terminate()
        worker.wait(20)


def run_the_page(settings, cwd: Path) -> None:
    """Every transcript of the page, in order, against a gateway of these settings (a worker
    of them running), each command checked against what the page shows under it."""
    env = {**os.environ, **environment(settings), "PATH": f"{Path(CHARGING).parent}:{os.environ['PATH']}"}
    ports = {"8001": free_port()}
    with Served(settings) as served:
        ports["8000"] = served.port
        for transcript in transcripts():
            outputs = run([command for command, _ in transcript], ports, cwd, env)
            for (command, shown), printed in zip(transcript, outputs):
                assert same(shown, printed), f"$ {command}\ndocs/http-api.md:\n{shown}\nprinted:\n{printed}"
