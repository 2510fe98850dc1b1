"""Redis back empty: restarted without its AOF, failed over to an empty node, or flushed.
The workers make their groups again and go on (loading the library where their ACL user
may, else waiting for the maintainer), and the maintainer goes on too. Each test runs its
own redis-server, since it empties it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from charging import codec
from charging.app.audit import audit
from charging.connection import connect
from charging.settings import Settings
from charging.tools.redis_server import RedisServer
from producer import Producer
from tests.conftest import CHARGING, cli, environment
from tests.roles import ROOT, acl_server, role, root
from tests.test_redis_restart import ACCOUNTS, START, charges, wait_for

pytestmark = pytest.mark.slow

EMPTIED = ["restart_without_data", "flushall"]


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def private(server) -> Settings:
    return Settings(redis_url=server.url, namespace="empty", reclaim_idle_ms=500, maintenance_interval_s=0.2,
                    block_ms=200, retry_attempts=1)


def empty(server: RedisServer, client: redis.Redis, how: str) -> None:
    """Lose everything: FLUSHALL (which keeps the library), or a restart with no AOF or
    RDB to load."""
    if how == "flushall":
        client.flushall()
        return
    server.kill()
    for path in server.data_dir.iterdir():
        if path.name != "redis.log":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    server.restart()


def start(settings: Settings, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([CHARGING, *args], env={**os.environ, **environment(settings),
                                                    "CHARGING_RETRY_ATTEMPTS": "1"},
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def stop(process: subprocess.Popen, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()[-3000:]


def library_loaded(client: redis.Redis) -> bool:
    return bool(client.function_list(library="charging"))


def charged_after_emptying(client: redis.Redis, settings: Settings, prefix: str) -> None:
    """Balances set again and charges made: every one is settled."""
    codec.set_balances(client, settings, [(a, START) for a in ACCOUNTS])
    ids = Producer(client, settings).submit(charges(40, prefix))
    wait_for(lambda: audit(client, settings, {a: START for a in ACCOUNTS}, ids).ok, timeout=30)


@pytest.mark.parametrize("how", EMPTIED)
def test_a_worker_makes_its_group_and_the_library_again_when_redis_comes_back_empty(server, private, tmp_path, how):
    client = connect(private)
    log = tmp_path / "worker.log"
    worker = start(private, log, "worker", "--consumer", "w")
    try:
        charged_after_emptying(client, private, "before")

        empty(server, client, how)
        wait_for(lambda: library_loaded(client) or worker.poll() is not None, timeout=30)
        assert worker.poll() is None, log.read_text()[-3000:]
        charged_after_emptying(client, private, "after")
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        stop(worker, log)
    found = events(log)
    assert {"event": "group_recreated", "partition": 0} in [
        {k: e.get(k) for k in ("event", "partition")} for e in found]
    assert not [e for e in found if e["event"] == "worker_crashed"]


def test_a_worker_that_may_not_load_the_library_waits_for_the_maintainer_when_redis_comes_back_empty(tmp_path):
    with acl_server(tmp_path) as server:
        scene, worker_role = root(server), role(server, "worker")
        log = tmp_path / "worker.log"
        worker = start(worker_role, log, "worker", "--consumer", "w")
        try:
            charged_after_emptying(scene, role(server, ROOT), "before")
            empty(server, scene, "restart_without_data")
            time.sleep(2)  # the worker finds the group gone, and no library it may load
            assert worker.poll() is None, log.read_text()[-3000:]
            assert not library_loaded(scene)

            maintained = cli(role(server, "maintainer"), "maintain", "--once")
            assert maintained.returncode == 0, maintained.stderr
            charged_after_emptying(scene, role(server, ROOT), "after")
        finally:
            stop(worker, log)
    names = [e["event"] for e in events(log)]
    assert "group_recreated" in names and "functions_missing" in names and "worker_crashed" not in names


@pytest.mark.parametrize("how", EMPTIED)
def test_the_maintainer_loads_the_library_again_when_redis_comes_back_empty(server, private, tmp_path, how):
    client = connect(private)
    log = tmp_path / "maintainer.log"
    maintainer = start(private, log, "maintain")
    try:
        wait_for(lambda: "maintainer_started" in log.read_text())
        empty(server, client, how)
        wait_for(lambda: library_loaded(client) or maintainer.poll() is not None, timeout=30)
        time.sleep(1)  # a few more rounds on the empty server
        assert maintainer.poll() is None, log.read_text()[-3000:]
    finally:
        stop(maintainer, log)
