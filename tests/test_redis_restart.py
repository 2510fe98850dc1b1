"""Redis killed with SIGKILL and restarted from its AOF: with appendfsync always nothing it
confirmed is lost, and workers ride the outage out by themselves, including a worker that
was started while Redis was down. Each test runs its own redis-server, since it kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from charging import codec
from charging.app.audit import audit
from charging.connection import connect
from charging.keys import Keys
from charging.settings import Settings
from charging.tools.redis_server import RedisServer
from producer import Producer
from tests.conftest import CHARGING, environment

pytestmark = pytest.mark.slow

ACCOUNTS = [f"acct{i}" for i in range(20)]
START = 1_000


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis", appendfsync="always") as server:
        yield server


@pytest.fixture
def private(server) -> Settings:
    return Settings(redis_url=server.url, namespace="restart", reclaim_idle_ms=500, maintenance_interval_s=0.2,
                    block_ms=200, retry_attempts=1)


def charges(n: int, prefix: str) -> list[dict]:
    return [{"request_id": f"{prefix}-{i}", "account": ACCOUNTS[i % len(ACCOUNTS)], "service": "sms", "units": 1}
            for i in range(n)]


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_redis_restarted_from_its_aof_keeps_every_confirmed_charge(server, private):
    client = connect(private)
    codec.set_balances(client, private, [(a, START) for a in ACCOUNTS])
    producer = Producer(client, private)
    approved = [producer.authorize(c) for c in charges(50, "auth")]
    queued = producer.submit(charges(200, "queued"))
    port = server.port

    server.kill()
    server.restart()

    assert server.port == port  # the same client reconnects by itself
    report = audit(client, private, {a: START for a in ACCOUNTS}, [o.request_id for o in approved])
    assert report.ok and report.approved == 50
    assert [fields[b"request_id"].decode() for _, fields in client.xrange(Keys("restart", 0).requests)] == queued


def test_worker_started_while_redis_is_down_waits_for_it_then_settles(server, private):
    client = connect(private)
    codec.set_balances(client, private, [(a, START) for a in ACCOUNTS])
    server.kill()
    worker = subprocess.Popen([CHARGING, "worker", "--consumer", "early"], env={**os.environ, **environment(private), "CHARGING_RETRY_ATTEMPTS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # several connection attempts fail meanwhile
        assert worker.poll() is None, f"the worker gave up: {worker.stderr.read()}"

        server.restart()
        ids = Producer(client, private).submit(charges(100, "after"))
        wait_for(lambda: audit(client, private, {a: START for a in ACCOUNTS}, ids).ok)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert worker.returncode == 0
