"""`charging worker --metrics-port P`, scraped over HTTP after real traffic: the counters
match what was sent, with one process and with --processes 2 (summed by the supervisor).
Its log is one JSON object per line, with request_id, account and partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from charging import codec
from charging.keys import Keys
from charging.tools.redis_server import free_port
from tests.conftest import CHARGING

pytestmark = pytest.mark.slow


def traffic(client, settings, producer) -> int:
    """5 approved, 3 insufficient_funds, 2 unknown_account, 2 replays, 1 idempotency
    conflict, 2 dead letters: 15 entries."""
    codec.set_balances(client, settings, [("rich", 50), ("poor", 0)])
    approved = [{"request_id": f"ok-{i}", "account": "rich", "amount": 10} for i in range(5)]
    producer.submit(approved
                    + [{"request_id": f"poor-{i}", "account": "poor", "amount": 1} for i in range(3)]
                    + [{"request_id": f"ghost-{i}", "account": "ghost", "amount": 1} for i in range(2)]
                    + approved[:2]
                    + [{"request_id": "ok-4", "account": "rich", "amount": 11}])
    requests = Keys(settings.namespace, 0).requests
    client.xadd(requests, {"request_id": "bad-1", "account": "rich"})
    client.xadd(requests, {"request_id": "bad-2", "account": "rich", "service": "sms", "units": "1.5"})
    return 15


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(port: int, ready, worker: subprocess.Popen, timeout: float = 60) -> dict:
    """Scrape until ready(samples) holds (metrics follow the results by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        assert worker.poll() is None, worker.communicate()[1]
        try:
            samples = scrape(port)
            if ready(samples):
                return samples
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, "metrics never showed the traffic"
        time.sleep(0.2)


@pytest.mark.parametrize("processes", [1, 2])
def test_scraped_counters_match_the_traffic_sent(client, settings, producer, processes):
    port = free_port()
    env = {**os.environ, "CHARGING_REDIS_URL": settings.redis_url.get_secret_value(),
           "CHARGING_NAMESPACE": settings.namespace, "CHARGING_MAINTENANCE_INTERVAL_S": "0.2", "CHARGING_BLOCK_MS": "200", "CHARGING_LOG_LEVEL": "debug"}
    worker = subprocess.Popen([CHARGING, "worker", "--processes", str(processes), "--metrics-port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sent = traffic(client, settings, producer)
        # gauges are read at maintenance (every 0.2 s here), so wait for one after the traffic
        samples = wait_for(port, lambda s: s.get(("charging_entries_processed_total", ())) == sent
                           and s.get(("charging_consumer_lag", (("partition", "0"),))) == 0
                           and s.get(("charging_pending_entries", (("partition", "0"),))) == 0, worker)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=30)

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("charging_charges_approved_total") == 5
    assert value("charging_charges_rejected_total", reason="insufficient_funds") == 3
    assert value("charging_charges_rejected_total", reason="unknown_account") == 2
    assert value("charging_charges_rejected_total", reason="idempotency_conflict") == 1
    assert value("charging_duplicates_total") == 2
    assert value("charging_dead_letters_total", reason="missing_field") == 1
    assert value("charging_dead_letters_total", reason="invalid_units") == 1
    assert value("charging_settle_errors_total") == 0
    assert value("charging_batch_size_sum") == sent
    assert value("charging_batch_seconds_count") == value("charging_batch_size_count") >= 1
    assert value("charging_oldest_pending_age_seconds", partition="0") == 0
    assert worker.returncode == 0, log

    events = [json.loads(line) for line in log.splitlines()]  # every line is one JSON object
    calls = [e for e in events if e["event"] == "entries_settled"]  # one line per pump call that read
    assert sum(e["read"] for e in calls) == sent
    assert all(e["consumer"] and e["partition"] == 0 and e["last_id"] for e in calls)
    dead = [e for e in events if e["event"] == "entry_dead_lettered"]  # the detail is in the dead letter
    assert sorted((e["reason"], e["count"]) for e in dead) == [("invalid_units", 1), ("missing_field", 1)]
