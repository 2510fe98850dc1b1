"""Every entry a worker cannot charge goes to the dead-letter stream with its reason and
is acked; the worker carries on with the next entry."""

from __future__ import annotations

import pytest

from charging import codec
from charging.keys import Keys
from tests.conftest import drain, results

GOOD = {"request_id": "r-bad-x", "account": "account1", "service": "sms", "units": "1"}


def without(field: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != field}


BAD_ENTRIES = [
    ("missing request_id", without("request_id"), "missing_field"),
    ("missing account", without("account"), "missing_field"),
    ("missing service", without("service"), "missing_field"),
    ("missing units", without("units"), "missing_field"),
    ("float units", {**GOOD, "units": "1.5"}, "invalid_units"),
    ("zero units", {**GOOD, "units": "0"}, "invalid_units"),
    ("negative units", {**GOOD, "units": "-3"}, "invalid_units"),
    ("exponent units", {**GOOD, "units": "1e9999"}, "invalid_units"),
    ("NaN units", {**GOOD, "units": "NaN"}, "invalid_units"),
    ("units with spaces", {**GOOD, "units": " 2"}, "invalid_units"),
    ("units over the maximum", {**GOOD, "units": "1000001"}, "invalid_units"),
    ("units of 20 digits", {**GOOD, "units": "9" * 20}, "invalid_units"),
    ("unknown service", {**GOOD, "service": "mms"}, "unknown_service"),
    ("zero amount", {"request_id": "r", "account": "account1", "amount": "0"}, "invalid_amount"),
    ("float amount", {"request_id": "r", "account": "account1", "amount": "2.5"}, "invalid_amount"),
    ("amount and units", {**GOOD, "amount": "5"}, "ambiguous_charge"),
    ("non-UTF-8 account", {**GOOD, "account": b"\xff\xfe"}, "invalid_encoding"),
    ("oversized field", {**GOOD, "account": "a" * 10_000}, "field_too_long"),
    ("account with spaces", {**GOOD, "account": "drop table"}, "invalid_account"),
    ("request id over 128 chars", {**GOOD, "request_id": "r" * 129}, "invalid_request_id"),
    ("empty request id", {**GOOD, "request_id": ""}, "invalid_request_id"),
    ("unknown field", {**GOOD, "unit": "1"}, "unknown_field"),
    ("reply_to outside the reply prefix", {**GOOD, "reply_to": "other:key"}, "invalid_reply_to"),
    ("negative submitted_at", {**GOOD, "submitted_at": "-1"}, "invalid_submitted_at"),
    ("too many fields", {**GOOD, **{f"x{i}": "1" for i in range(20)}}, "too_many_fields"),
    # reservation operations (docs/reservations.md)
    ("unknown op", {**GOOD, "op": "refund"}, "unknown_op"),
    ("charge with a ttl", {**GOOD, "ttl": "60"}, "field_not_allowed"),
    ("charge with a reservation", {**GOOD, "reservation": "account1/r1"}, "field_not_allowed"),
    ("reserve naming a reservation", {**GOOD, "op": "reserve", "reservation": "account1/r1"}, "field_not_allowed"),
    ("reserve without units", {**without("units"), "op": "reserve"}, "missing_field"),
    ("reserve with a zero ttl", {**GOOD, "op": "reserve", "ttl": "0"}, "invalid_ttl"),
    ("reserve with a ttl over the maximum", {**GOOD, "op": "reserve", "ttl": "86401"}, "invalid_ttl"),
    ("reserve with a float ttl", {**GOOD, "op": "reserve", "ttl": "1.5"}, "invalid_ttl"),
    ("commit without a reservation", {**without("service"), "op": "commit"}, "missing_field"),
    ("commit without units or amount", {"request_id": "r", "op": "commit", "reservation": "account1/r1"},
     "missing_field"),
    ("commit with units and amount", {"request_id": "r", "op": "commit", "reservation": "account1/r1",
                                      "units": "1", "amount": "1"}, "ambiguous_charge"),
    ("commit naming a service", {**without("account"), "op": "commit", "reservation": "account1/r1"},
     "field_not_allowed"),
    ("commit with a ttl", {"request_id": "r", "op": "commit", "reservation": "account1/r1", "units": "1",
                           "ttl": "5"}, "field_not_allowed"),
    ("commit with negative units", {"request_id": "r", "op": "commit", "reservation": "account1/r1",
                                    "units": "-1"}, "invalid_units"),
    ("reservation without an account part", {"request_id": "r", "op": "release", "reservation": "r1"},
     "invalid_reservation"),
    ("reservation with a bad account part", {"request_id": "r", "op": "release", "reservation": "a b/r1"},
     "invalid_reservation"),
    ("reservation of another account", {"request_id": "r", "op": "release", "reservation": "account1/r1",
                                        "account": "account2"}, "invalid_reservation"),
    ("release with units", {"request_id": "r", "op": "release", "reservation": "account1/r1", "units": "1"},
     "field_not_allowed"),
    ("extend without a request id", {"op": "extend", "reservation": "account1/r1", "units": "1"}, "missing_field"),
]


@pytest.mark.parametrize("name,fields,reason", BAD_ENTRIES, ids=[b[0] for b in BAD_ENTRIES])
def test_bad_entry_is_dead_lettered_with_reason_and_next_entry_still_charged(client, settings, name, fields, reason):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("account1", 100)])
    bad_id = client.xadd(keys.requests, fields).decode()
    client.xadd(keys.requests, {**GOOD, "request_id": "good-after-bad"})

    drain(settings)

    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"].decode() == reason
    assert dead[b"entry_id"].decode() == bad_id
    assert dead[b"detail"]
    assert [r["request_id"] for r in results(client, settings)] == ["good-after-bad"]
    assert int(client.hget(keys.balances, "account1")) == 99
    assert client.xpending(keys.requests, settings.group)["pending"] == 0


def test_dead_letter_keeps_original_fields_but_caps_their_size(client, settings):
    keys = Keys(settings.namespace, 0)
    client.xadd(keys.requests, {**GOOD, "account": "a" * 10_000})
    drain(settings)
    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"request_id"] == b"r-bad-x"
    assert dead[b"account"] == b"a" * codec.DEADLETTER_FIELD_BYTES


@pytest.mark.parametrize("reader", ["w0", "dead-consumer"], ids=["own-pending", "reclaimed"])
def test_entry_deleted_while_pending_is_dead_lettered(client, settings, reader):
    """A consumer reads an entry and dies; then someone XDELs it, and the pending list keeps
    the id. Settled by the same consumer restarting (its own pending entries), or by another
    consumer reclaiming it (XAUTOCLAIM reports the deleted id): dead-lettered either way."""
    keys = Keys(settings.namespace, 0)
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    entry_id = client.xadd(keys.requests, GOOD)
    client.xreadgroup(settings.group, reader, {keys.requests: ">"}, count=10)
    client.xdel(keys.requests, entry_id)

    drain(settings)  # the drain's consumer is named w0

    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"entry_deleted"
    assert dead[b"entry_id"] == entry_id
    assert client.xpending(keys.requests, settings.group)["pending"] == 0


def test_entry_delivered_more_than_max_deliveries_is_dead_lettered(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("account1", 100)])
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    entry_id = client.xadd(keys.requests, GOOD)
    client.xreadgroup(settings.group, "crashing", {keys.requests: ">"}, count=10)
    for _ in range(settings.max_deliveries):  # it kept crashing whoever took it
        client.xclaim(keys.requests, settings.group, "crashing", 0, [entry_id])

    drain(settings)

    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"max_deliveries"
    assert results(client, settings) == []
    assert int(client.hget(keys.balances, "account1")) == 100


def test_rated_amount_over_the_maximum_charge_is_dead_lettered(client, settings):
    settings = settings.model_copy(update={"max_amount": 1000})
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("account1", 10**6)])
    client.xadd(keys.requests, {**GOOD, "service": "data", "units": "101"})  # 1010 > 1000
    drain(settings)
    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"invalid_amount"
    assert int(client.hget(keys.balances, "account1")) == 10**6
