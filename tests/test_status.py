"""`charging status`: dead letters by reason (counted by the library with each dead letter,
as a counter, so status never scans the stream) and pending entries per consumer."""

from __future__ import annotations

import json

from charging.keys import Keys
from tests.conftest import cli, drain


def test_status_shows_dead_letters_by_reason_and_pending_per_consumer(client, settings):
    cli(settings, "accounts", "reset", "--count", "1")
    requests = Keys(settings.namespace, 0).requests
    for fields in ({"account": "account1", "amount": "1"}, {"request_id": "r2"},
                   {"request_id": "r3", "account": "account1", "service": "sms", "units": "-1"}):
        client.xadd(requests, fields)
    drain(settings)
    client.xadd(requests, {"request_id": "r4", "account": "account1", "amount": "1"})
    client.xreadgroup(settings.group, "stalled", {requests: ">"})  # read, never settled

    as_json = json.loads(cli(settings, "status", "--json").stdout)
    shown = cli(settings, "status")

    assert as_json["deadletter_reasons"] == {"invalid_units": 1, "missing_field": 2}
    assert as_json["partitions"][0]["deadletter_reasons"] == as_json["deadletter_reasons"]
    assert {c["name"]: c["pending"] for c in as_json["partitions"][0]["consumers"]} == {"w0": 0, "stalled": 1}
    assert "dead letters by reason (ever): invalid_units=1 missing_field=2" in shown.stdout
    assert "pending per consumer: stalled=1 w0=0" in shown.stdout
