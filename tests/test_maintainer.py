"""`charging maintain`, the maintainer's process, on a single node and on a cluster: it
records request entries a client removed before the workers read them, rewinds a request
stream a client pushed to the last possible id, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from charging import codec
from charging.keys import keys_of
from charging.plan import run
from charging.streams import ensure_group
from producer import Producer
from tests.conftest import BOTH_BACKENDS, CHARGING, cli, drain, environment

LAST_ID = "18446744073709551615-18446744073709551615"


@BOTH_BACKENDS
def test_maintain_records_entries_a_client_trimmed_before_any_worker_read_them(client, settings):
    keys = keys_of("account1", settings)
    run(client, ensure_group(keys.requests, settings.group))
    for n in range(3):
        client.xadd(keys.requests, {"n": str(n)})
    client.xadd(keys.requests, {"n": "3"}, maxlen=0, approximate=False)

    done = cli(settings, "maintain", "--once")

    assert done.returncode == 0, done.stderr
    [(_, dead)] = client.xrange(keys.deadletter)
    assert (dead[b"error"], dead[b"removed"]) == (b"entries_removed", b"4")
    assert client.hgetall(keys.deadletter_reasons) == {b"entries_removed": b"1"}


@BOTH_BACKENDS
def test_maintain_rewinds_a_request_stream_a_client_pushed_to_the_last_id(client, settings, producer):
    keys = keys_of("account1", settings)
    run(client, ensure_group(keys.requests, settings.group))
    client.xadd(keys.requests, {"request_id": "forged", "account": "account1", "amount": "1"}, id=LAST_ID)
    drain(settings)  # the worker dead-letters it: id_in_future

    done = cli(settings, "maintain", "--once")
    producer.submit([{"account": "account1", "amount": 1}])  # refused ("exhausted") before the rewind

    assert done.returncode == 0, done.stderr
    assert client.hgetall(keys.deadletter_reasons) == {b"id_in_future": b"1"}
    [(entry_id, _)] = client.xrange(keys.requests)
    assert int(entry_id.split(b"-")[0]) < time.time() * 1000 + settings.max_clock_skew_ms


def test_maintain_refuses_partitions_the_deployment_does_not_have(settings):
    done = cli(settings, "maintain", "--once", "--partitions", "0-9")
    assert done.returncode == 2 and "outside 0-0" in done.stderr, done.stderr


def test_maintain_runs_until_sigterm_and_then_exits_0(settings):
    process = subprocess.Popen([CHARGING, "maintain"], env={**os.environ, **environment(settings)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while "maintainer_started" not in (line := process.stderr.readline()):
        assert line and time.monotonic() < deadline, "the maintainer did not start"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "maintainer_stopped" in process.stderr.read()


def test_producers_sharing_an_id_each_get_their_own_outcomes_and_keep_none_of_the_others(client, settings):
    shared = settings.model_copy(update={"producer_id": "billing"})
    first, second = Producer(client, shared), Producer(client, shared)
    codec.set_balances(client, settings, [("account1", 100)])
    mine = first.submit([{"account": "account1", "amount": 1}], reply=True)
    theirs = second.submit([{"account": "account1", "amount": 2}], reply=True)
    drain(settings)

    assert first.wait(mine, timeout=10)[mine[0]].charged == 1
    assert second.wait(theirs, timeout=10)[theirs[0]].charged == 2
    assert not first._outcomes and not second._outcomes  # each read the other's outcome and dropped it
