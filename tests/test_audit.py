"""The independent checker must see violations, not only confirm good runs."""

from __future__ import annotations

from charging import codec
from charging.app.audit import audit, audit_deadletters
from charging.keys import Keys
from tests.conftest import drain


def test_audit_passes_a_clean_run_and_counts_outcomes(client, settings, producer):
    codec.set_balances(client, settings, [("a1", 30)])
    ids = producer.submit([{"account": "a1", "service": "voice", "units": 2} for _ in range(4)])
    producer.submit([{"account": "a1", "service": "voice", "units": 2, "request_id": ids[0]}])
    drain(settings)
    report = audit(client, settings, {"a1": 30}, ids)
    assert report.ok
    assert (report.outcomes, report.approved, dict(report.rejected), report.duplicates) == (
        5, 3, {"insufficient_funds": 1}, 1)


def test_audit_reports_missing_outcomes_money_drift_and_negative_balances(client, settings, producer):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("a1", 30), ("a2", 5)])
    producer.authorize({"account": "a1", "service": "sms", "units": 1, "request_id": "seen"})
    client.hincrby(keys.balances, "a2", -10)  # corruption from outside the engine, on purpose
    report = audit(client, settings, {"a1": 30, "a2": 5}, ["seen", "never-sent"])
    assert not report.ok
    assert report.missing == ["never-sent"]
    assert report.money == {"a2": (0, 10)}
    assert report.negative == {"a2": -5}


def test_audit_reports_a_request_settled_twice(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("a1", 30)])
    fields = {"request_id": "twice", "account": "a1", "status": "rejected", "reason": "unknown_account",
              "charged": 0, "balance": 0, "duplicate": 0, "submitted_at": "", "processed_at": 1, "entry_id": ""}
    client.xadd(keys.results, fields)
    client.xadd(keys.results, fields)
    assert audit(client, settings, {"a1": 30}).repeated == ["twice"]


def _outcome(request_id: str, entry_id: str, duplicate: int = 0, status: str = "approved", reason: str = "",
             charged: int = 0, balance: int = 30) -> dict:
    return {"request_id": request_id, "account": "a1", "status": status, "reason": reason, "charged": charged,
            "balance": balance, "duplicate": duplicate, "submitted_at": "", "processed_at": 1, "entry_id": entry_id}


def test_audit_reports_an_entry_settled_twice_and_a_replay_not_answered_with_the_stored_outcome(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("a1", 30)])
    client.xadd(keys.results, _outcome("r1", "1-1"))
    client.xadd(keys.results, _outcome("r1", "1-1", duplicate=1))  # the same entry settled again: a stalled worker
    client.xadd(keys.results, _outcome("r2", "1-2", status="rejected", reason="insufficient_funds"))
    client.xadd(keys.results, _outcome("r2", "1-3", duplicate=1, charged=5, balance=25))  # replay judged anew
    client.xadd(keys.results, _outcome("r3", "1-4"))
    client.xadd(keys.results, _outcome("r3", "1-5", duplicate=1, status="rejected", reason="idempotency_conflict"))

    report = audit(client, settings, {"a1": 30})

    assert not report.ok
    assert report.resettled == ["p0:1-1"]
    assert report.replay_mismatches == ["r2"]
    assert report.conflicts == {"r3"}
    assert report.repeated == []


def test_deadletter_audit_reports_missing_wrong_reason_repeated_and_good_requests(client, settings):
    keys = Keys(settings.namespace, 0)

    def dead(entry_id: str, error: str, request_id: str = "x") -> None:
        client.xadd(keys.deadletter, {"request_id": request_id, "error": error, "detail": "d", "entry_id": entry_id})

    dead("1-1", "invalid_units")
    dead("1-2", "invalid_units")
    dead("1-3", "missing_field")
    dead("1-3", "missing_field")
    dead("1-9", "max_deliveries", request_id="good-1")
    expected = {"p0:1-1": "invalid_units", "p0:1-2": "unknown_service", "p0:1-3": "missing_field",
                "p0:1-4": "invalid_amount"}

    report = audit_deadletters(client, settings, expected, good=["good-1"])

    assert not report.ok
    assert (report.expected, report.found) == (4, 1)
    assert report.wrong_reason == {"p0:1-2": ("unknown_service", "invalid_units")}
    assert report.repeated == ["p0:1-3"]
    assert report.missing == ["p0:1-4"]
    assert (report.good, report.others) == (["good-1"], 1)
