"""A worker killed with SIGKILL in the middle of a load loses nothing and repeats nothing,
whether it is restarted under its own name or its entries are reclaimed by another."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import redis

from charging import codec
from charging.app.audit import audit
from charging.connection import connect
from charging.keys import Keys, all_partitions
from tests.conftest import BOTH_BACKENDS, CHARGING, cli, environment
from worker.loop import Worker

pytestmark = pytest.mark.slow

ACCOUNTS = [f"acct{i}" for i in range(200)]
START = 500


def load(client, settings, producer, n: int) -> list[str]:
    codec.set_balances(client, settings, [(a, START) for a in ACCOUNTS])
    rng = random.Random(1)
    requests = [{"request_id": f"k-{i}", "account": rng.choice(ACCOUNTS), "service": rng.choice(["sms", "voice", "data"]),
                 "units": rng.randint(1, 5)} for i in range(n)]
    return producer.submit(requests)


def settled(client, settings) -> int:
    return sum(client.xlen(k.results) for k in all_partitions(settings.namespace, settings.partitions))


def start_worker(settings, consumer: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **environment(settings), "CHARGING_LOG_LEVEL": "warning"}
    return subprocess.Popen([CHARGING, "worker", "--consumer", consumer, "--batch", "50", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_midway(client, settings, consumer: str, at_least: int) -> None:
    worker = start_worker(settings, consumer)
    deadline = time.monotonic() + 60
    while settled(client, settings) < at_least:
        assert time.monotonic() < deadline, worker.stderr.read() if worker.poll() is not None else "too slow"
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()


def assert_exactly_once(client, settings, request_ids: list[str]) -> None:
    report = audit(client, settings, {a: START for a in ACCOUNTS}, request_ids)
    assert report.outcomes == len(request_ids), "every entry has exactly one outcome"
    assert (report.missing, report.repeated, report.money, report.negative, report.pending) == ([], [], {}, {}, 0)
    assert report.ok


@BOTH_BACKENDS
def test_worker_killed_mid_load_then_restarted_settles_every_entry_exactly_once(client, settings, producer):
    ids = load(client, settings, producer, 10_000)
    kill_midway(client, settings, "victim", at_least=3_000)
    assert settled(client, settings) < 10_000, "killed before the end"

    done = cli(settings, "worker", "--consumer", "victim", "--burst", timeout=120)

    assert done.returncode == 0, done.stderr
    assert_exactly_once(client, settings, ids)


@BOTH_BACKENDS
def test_entries_of_a_killed_worker_are_reclaimed_by_another_consumer(client, settings, producer):
    ids = load(client, settings, producer, 10_000)
    kill_midway(client, settings, "dead-one", at_least=2_000)
    pending = audit(client, settings, {}).pending

    done = cli(settings, "worker", "--consumer", "rescuer", "--processes", "2", "--burst", timeout=120)

    assert done.returncode == 0, done.stderr
    assert_exactly_once(client, settings, ids)
    if pending:  # the kill usually lands with a batch in hand; then it must have been reclaimed
        assert "entries_reclaimed" in done.stderr


def test_worker_reloads_the_function_library_a_server_lost(client, settings, producer):
    """A server restarted without its AOF, or a failover to an empty node, has no library:
    the first function call of any kind (maintenance included) reloads it and goes on."""
    codec.set_balances(client, settings, [("acct1", 100)])
    [request_id] = producer.submit([{"account": "acct1", "amount": 7}])
    worker = Worker(connect(settings), settings, "after-flush", burst=True)  # connected: library loaded
    client.function_flush("SYNC")

    assert worker.run() == 0
    assert audit(client, settings, {"acct1": 100}, [request_id]).ok


def children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
def test_consumers_stop_when_their_supervisor_is_killed(client, settings):
    """Found from outside: `kill -9` of `charging worker --processes 2` left both consumers
    pumping on their own; the next supervisor would start a second consumer of each name."""
    supervisor = subprocess.Popen([CHARGING, "worker", "--consumer", "orphan", "--processes", "2"],
                                  env=environment(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(consumers := [c for c in children_of(supervisor.pid) if "spawn_main" in cmdline(c)]) < 2:
        assert time.monotonic() < deadline, "the consumers did not start"
        time.sleep(0.1)
    while consumers_of_group(client, settings) < 2:
        assert time.monotonic() < deadline, "the consumers did not start pumping"
        time.sleep(0.1)

    supervisor.kill()
    supervisor.wait()

    deadline = time.monotonic() + 10
    while any(running(c) for c in consumers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(c) for c in consumers), "consumers outlived their supervisor"


def consumers_of_group(client, settings) -> int:
    try:
        return len(client.xinfo_consumers(Keys(settings.namespace, 0).requests, settings.group))
    except redis.ResponseError:  # no stream or group yet
        return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except FileNotFoundError:
        return ""
