"""Backpressure: past CHARGING_MAX_BACKLOG entries in a request stream the producer gets a
clear `backlog full` error and writes nothing, instead of growing Redis without bound."""

from __future__ import annotations

import pytest

from charging import codec
from charging.keys import Keys
from producer import BacklogFull, Producer
from tests.conftest import cli, drain
from worker.loop import Worker


def sms(n: int, prefix: str) -> list[dict]:
    return [{"request_id": f"{prefix}-{i}", "account": "account1", "service": "sms", "units": 1} for i in range(n)]


def test_a_full_request_stream_refuses_the_whole_batch_until_workers_catch_up(client, settings):
    settings = settings.model_copy(update={"max_backlog": 10})
    codec.set_balances(client, settings, [("account1", 100)])
    producer = Producer(client, settings)
    requests = Keys(settings.namespace, 0).requests
    producer.submit(sms(8, "first"))

    with pytest.raises(BacklogFull, match=r"backlog full: .* holds 8 entries; adding 3 would pass the limit of 10"):
        producer.submit(sms(3, "second"))
    assert client.xlen(requests) == 8, "nothing of the refused batch was written"

    drain(settings)
    Worker(client, settings, "upkeep").maintain()  # trims what the group has acked
    assert client.xlen(requests) == 1  # the trim bound: the group's last-delivered entry stays
    assert len(producer.submit(sms(9, "second"))) == 9


def test_the_cli_reports_backlog_full_and_exits_1(settings, monkeypatch):
    monkeypatch.setenv("CHARGING_MAX_BACKLOG", "1")
    cli(settings, "accounts", "reset", "--count", "1")
    assert cli(settings, "produce", "--account", "account1", "--amount", "1").returncode == 0

    refused = cli(settings, "produce", "--account", "account1", "--amount", "1")

    assert refused.returncode == 1
    message = " ".join(refused.stderr.split())  # the console wraps long lines
    assert "error: backlog full" in message and "nothing was submitted" in message
