"""Credit lots granted through the request stream, as a producer in any language can: each
grant entry settled once by a worker with its outcome, a malformed one dead-lettered with its
reason, and the lots then spent by charges in the same stream (docs/plans-and-lots.md)."""

from __future__ import annotations

import re
import time

import pytest

from charging import codec
from charging.keys import keys_of
from charging.schema import Invalid
from tests.conftest import cli, drain, results


def test_a_producer_grants_lots_through_the_stream_and_charges_spend_them(client, settings, producer):
    codec.set_balances(client, settings, [("ann", 100)])
    producer.submit([
        {"op": "grant", "request_id": "g1", "account": "ann", "lot": "sms-may", "service": "sms", "units": 10,
         "expires_in": 30 * 86400},
        {"op": "grant", "request_id": "g2", "account": "ann", "lot": "promo", "amount": 50},
        {"op": "grant", "request_id": "g3", "account": "ann", "lot": "promo", "amount": 50},  # the same lot again
        {"op": "grant", "request_id": "g4", "account": "ann", "lot": "promo", "amount": 60},  # other content
    ])
    keys = keys_of("ann", settings)
    client.xadd(keys.requests, {"op": "grant", "request_id": "g5", "account": "ann", "lot": "old", "amount": "5",
                                "expires_at": "1000"})  # a producer of another language, an expiry long past
    producer.submit([{"request_id": "c1", "account": "ann", "service": "sms", "units": 12}])
    drain(settings)

    by_id = {r["request_id"]: r for r in results(client, settings)}
    assert [(by_id[g]["status"], by_id[g]["reason"], by_id[g]["granted"]) for g in ("g1", "g2", "g3", "g4")] == [
        ("approved", "", "10"), ("approved", "", "50"), ("approved", "", "0"),
        ("rejected", "idempotency_conflict", "0")]
    assert by_id["g1"]["expires_at"] and by_id["g2"]["expires_at"] == ""
    assert "g5" not in by_id
    [(_, dead)] = client.xrange(keys.deadletter)
    assert (dead[b"request_id"], dead[b"error"]) == (b"g5", b"invalid_expiry")
    # 10 sms from the bundle, the other 2 at the tariff's sms price from the promotion
    sms = settings.tariff["sms"]
    assert (by_id["c1"]["status"], by_id["c1"]["draws"]) == ("approved", f"sms-may:10u,promo:{2 * sms}")
    assert by_id["c1"]["balance"] == str(100 + 50 - 2 * sms)


def test_authorize_refuses_a_grant_in_one_line(producer):
    with pytest.raises(Invalid, match="field_not_allowed: a grant is settled through the stream"):
        producer.authorize({"op": "grant", "request_id": "g", "account": "ann", "lot": "x", "amount": 5})


def test_charging_results_shows_grants_and_breakage_as_such(client, settings, producer):
    codec.set_balances(client, settings, [("ann", 100)])
    codec.grant(client, settings, "ann", "flash", "money", 7, expires_in_ms=1)
    time.sleep(0.005)
    assert codec.expire_reservations(client, settings, keys_of("ann", settings)) == 0  # no reservation; the lot
    producer.submit([{"op": "grant", "request_id": "g1", "account": "ann", "lot": "promo", "amount": 50},
                     {"request_id": "c1", "account": "ann", "amount": 20}])
    drain(settings)

    shown = cli(settings, "results")

    assert shown.returncode == 0, shown.stderr
    expired, *rest = shown.stdout.splitlines()
    assert re.fullmatch(r"expired:ann/flash@\d+:0 ann expired lot_expired charged=0 balance=100 lot=flash breakage=7",
                        expired), expired
    assert rest == ["g1 ann approved  charged=0 balance=150 lot=promo granted=50",
                    "c1 ann approved  charged=20 balance=130 draws=promo:20"]
