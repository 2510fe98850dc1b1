"""`charging demo` stopped the ways a newcomer stops it: Ctrl-C at any point, and its own
end while another worker serves the same Redis. Either way it says one short line, and
nothing it started is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CHARGING, environment
from tests.test_first_hour import left_running

STOPPED_WITHIN_S = 2


def demo(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The demo as a terminal runs it: a process group of its own (the foreground job), a
    TMPDIR of its own that its server and workers inherit (left_running looks for it)."""
    env = {**os.environ, **(env or {}), "TMPDIR": str(tmp_path)}
    if "--redis-url" not in args:
        env.pop("CHARGING_REDIS_URL", None)
    return subprocess.Popen([CHARGING, "demo", "--accounts", "5", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(moment: str, running: subprocess.Popen, tmp_path: Path) -> None:
    if moment == "starting":  # its temp dir exists: its redis-server is starting
        while not list(tmp_path.iterdir()):
            time.sleep(0.01)
        return
    for line in running.stdout:
        if "accounts reset" in line:  # next: its workers start
            break
    if moment == "mid-load":
        time.sleep(1.5)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["starting", "workers-starting", "mid-load"])
def test_ctrl_c_stops_the_demo_within_2_s_saying_only_that_it_stopped(tmp_path, moment):
    running = demo(tmp_path, "--charges", "500000")
    wait_for(moment, running, tmp_path)
    pressed = time.monotonic()
    os.killpg(running.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    stdout, stderr = running.communicate(timeout=60)
    took = time.monotonic() - pressed

    assert took < STOPPED_WITHIN_S, f"{moment}: stopped after {took:.1f} s"
    assert (running.returncode, stderr) == (130, ""), moment
    assert stdout.splitlines()[-1] == "demo stopped", stdout
    assert "workers stopped" not in stdout and "redis-server stopped" not in stdout
    assert left_running(tmp_path) == [], "the demo left its workers or its server running"
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_demo_on_a_redis_another_worker_serves_ends_clean(settings, tmp_path):
    """The other worker settles the demo's few charges before the demo's own workers have
    started: the demo stops them while they start, which is no failure, and its check holds."""
    env = {**os.environ, **environment(settings), "CHARGING_LOG_LEVEL": "warning"}
    other = subprocess.Popen([CHARGING, "worker", "--consumer", "other"], env=env, stderr=subprocess.DEVNULL)
    try:
        running = demo(tmp_path, "--redis-url", settings.redis_url.get_secret_value(), "--charges", "50",
                       env=environment(settings))
        stdout, stderr = running.communicate(timeout=120)
    finally:
        other.terminate()
        other.wait(20)

    assert running.returncode == 0, stderr
    assert "check sum(approved) == balance drop" in stdout and "OK" in stdout.splitlines()[-3]
    assert stdout.splitlines()[-1] == "workers stopped"
    assert left_running(tmp_path) == []
