"""The independent checker must see violations, not only confirm good runs."""

from __future__ import annotations

from charging import functions
from charging.audit import audit
from charging.keys import Keys
from tests.conftest import drain


def test_audit_passes_a_clean_run_and_counts_outcomes(client, settings, producer):
    functions.set_balances(client, settings, [("a1", 30)])
    ids = producer.submit([{"account": "a1", "service": "voice", "units": 2} for _ in range(4)])
    producer.submit([{"account": "a1", "service": "voice", "units": 2, "request_id": ids[0]}])
    drain(settings)
    report = audit(client, settings, {"a1": 30}, ids)
    assert report.ok
    assert (report.outcomes, report.approved, dict(report.rejected), report.duplicates) == (
        5, 3, {"insufficient_funds": 1}, 1)


def test_audit_reports_missing_outcomes_money_drift_and_negative_balances(client, settings, producer):
    keys = Keys(settings.namespace, 0)
    functions.set_balances(client, settings, [("a1", 30), ("a2", 5)])
    producer.authorize({"account": "a1", "service": "sms", "units": 1, "request_id": "seen"})
    client.hincrby(keys.balances, "a2", -10)  # corruption from outside the engine, on purpose
    report = audit(client, settings, {"a1": 30, "a2": 5}, ["seen", "never-sent"])
    assert not report.ok
    assert report.missing == ["never-sent"]
    assert report.money == {"a2": (0, 10)}
    assert report.negative == {"a2": -5}


def test_audit_reports_a_request_settled_twice(client, settings):
    keys = Keys(settings.namespace, 0)
    functions.set_balances(client, settings, [("a1", 30)])
    fields = {"request_id": "twice", "account": "a1", "status": "rejected", "reason": "unknown_account",
              "charged": 0, "balance": 0, "duplicate": 0, "submitted_at": "", "processed_at": 1, "entry_id": ""}
    client.xadd(keys.results, fields)
    client.xadd(keys.results, fields)
    assert audit(client, settings, {"a1": 30}).repeated == ["twice"]
