"""settle_batch (one FCALL settling many entries, what the worker sends) must answer each
entry exactly as the entry's own function (charge, reserve, ...) would, and keep a failing
entry from taking the others along."""

from __future__ import annotations

import redis

from charging import codec
from charging.app.audit import audit
from charging.keys import Keys
from charging.schema import parse_request
from charging.tariff import price
from tests.conftest import BOTH_BACKENDS, drain
from tests.records import recorded

REQUESTS = [
    {"request_id": "b1", "account": "rich", "service": "voice", "units": "3"},
    {"request_id": "b2", "account": "poor", "service": "data", "units": "3"},  # insufficient funds
    {"request_id": "b1", "account": "rich", "service": "voice", "units": "3"},  # duplicate in the same call
    {"request_id": "b3", "account": "nobody", "amount": "5"},  # unknown account
    {"request_id": "b1", "account": "rich", "amount": "15"},  # same id, other content: conflict
    {"request_id": "b4", "account": "poor", "service": "data", "units": "2"},
    {"request_id": "b5", "account": "poor", "service": "sms", "units": "6"},  # the money ran out
    # A session on the same account in the same call: reserve, a commit above it, a commit in units.
    {"op": "reserve", "request_id": "s1", "account": "rich", "service": "voice", "units": "10"},
    {"op": "commit", "request_id": "s2", "account": "rich", "reservation": "rich/s1", "units": "11"},
    {"op": "commit", "request_id": "s3", "account": "rich", "reservation": "rich/s1", "units": "4"},
    {"op": "release", "request_id": "s4", "account": "rich", "reservation": "rich/s1"},  # already closed
]
PROCESSED_AT, EXPIRES_AT = 5, 8  # reply fields that carry the server's clock


def _plan(settings, requests=REQUESTS):
    plan = []
    for fields in requests:
        request = parse_request(fields, settings)
        plan.append((request, price(request, settings), ""))
    return plan


def _timeless(reply) -> list:
    return [v for i, v in enumerate(reply) if i not in (PROCESSED_AT, EXPIRES_AT)]


def _outcomes(client, keys: Keys) -> list[dict]:
    clock = {b"processed_at", b"expires_at"}
    return [{k: v for k, v in fields.items() if k not in clock} for _, fields in client.xrange(keys.results)]


def test_one_settle_batch_call_answers_exactly_as_the_entries_own_functions(client, settings):
    one_by_one = settings.model_copy(update={"namespace": settings.namespace + "a"})
    batched = settings.model_copy(update={"namespace": settings.namespace + "b"})
    for s in (one_by_one, batched):
        codec.set_balances(client, s, [("rich", 1000), ("poor", 25)])

    singles = [codec.settle(client, one_by_one, request, amount) for request, amount, _ in _plan(one_by_one)]
    batch = codec.settle_batch(client, batched, Keys(batched.namespace, 0), _plan(batched))

    assert [_timeless(r) for r in batch] == [_timeless(r) for r in singles]
    assert [(r[0], r[1]) for r in batch] == [
        (b"approved", b""), (b"rejected", b"insufficient_funds"), (b"approved", b""),
        (b"rejected", b"unknown_account"), (b"rejected", b"idempotency_conflict"), (b"approved", b""),
        (b"rejected", b"insufficient_funds"), (b"approved", b""), (b"rejected", b"exceeds_reservation"),
        (b"approved", b""), (b"rejected", b"unknown_reservation")]
    a, b = Keys(one_by_one.namespace, 0), Keys(batched.namespace, 0)
    assert client.hgetall(a.balances) == client.hgetall(b.balances) == {b"rich": b"965", b"poor": b"5"}
    assert client.hgetall(a.held) == client.hgetall(b.held) == {}
    assert _outcomes(client, a) == _outcomes(client, b)


def test_a_failing_entry_gets_its_own_error_and_the_rest_of_the_call_is_settled(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("rich", 1000)])
    broken_reply = keys.reply("broken")
    client.set(broken_reply, "not a stream")  # XADD to it fails with WRONGTYPE
    requests = [{"request_id": f"f{i}", "account": "rich", "amount": "10"} for i in range(3)]
    requests[1]["reply_to"] = broken_reply

    replies = codec.settle_batch(client, settings, keys, _plan(settings, requests))

    assert replies[0][0] == b"approved" and replies[2][0] == b"approved"
    assert isinstance(replies[1], redis.ResponseError) and "WRONGTYPE" in str(replies[1])
    again = codec.settle(client, settings, parse_request(requests[2], settings), 10)
    assert again[4] == 1  # settled once: a replay is answered as a duplicate


def test_an_amount_that_is_not_a_whole_number_above_zero_is_refused_for_that_entry_only(client, settings):
    """A client allowed to FCALL settle_batch directly cannot turn a charge into a top-up."""
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("rich", 100)])
    plan = [(parse_request({"request_id": f"n{i}", "account": "rich", "amount": "10"}, settings), amount, "")
            for i, amount in enumerate((10, -50, "2.5", 0, 10))]

    replies = codec.settle_batch(client, settings, keys, plan)

    assert [replies[0][0], replies[4][0]] == [b"approved", b"approved"]
    assert all(isinstance(r, redis.ResponseError) and "invalid_amount" in str(r) for r in replies[1:4])
    assert int(client.hget(keys.balances, "rich")) == 80
    assert [recorded(client, settings, rid) for rid in ("n1", "n2", "n3")] == [[], [], []]
    assert [r.charged for rid in ("n0", "n4") for r in recorded(client, settings, rid)] == [10, 10]


def test_a_call_whose_keys_do_not_match_its_entries_is_refused_before_anything_is_written(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("rich", 100)])
    args = ["charge", 0, "m1", "rich", "rich|amount|10", "", "", 60_000, "", 60_000, 10, "", "", "", ""]
    shared = [keys.balances, keys.results, keys.requests, keys.held, keys.reservations, keys.expiries]

    for names, extra in ((shared, []), (shared + [keys.seen("m1")], ["charge"])):
        try:
            client.fcall("settle_batch", len(names), *names, *args, *extra)
            raise AssertionError("settle_batch accepted a malformed call")
        except redis.ResponseError as exc:
            assert "wrong_arguments" in str(exc)
    assert int(client.hget(keys.balances, "rich")) == 100 and client.xlen(keys.results) == 0


@BOTH_BACKENDS
def test_workers_settle_every_entry_once_in_every_partition(client, settings, producer):
    """On a cluster (12 partitions) each settle_batch call must keep to one partition's slot."""
    accounts = {f"acct{i}": 300 for i in range(40)}
    codec.set_balances(client, settings, accounts.items())
    ids = producer.submit([{"account": f"acct{i % 40}", "service": "voice", "units": 7} for i in range(400)])
    producer.submit([{"request_id": ids[0], "account": "acct0", "service": "voice", "units": 7}])

    drain(settings, consumers=2)

    report = audit(client, settings, accounts, ids)
    assert report.ok
    assert (report.outcomes, report.duplicates) == (401, 1)
    assert report.approved == 40 * (300 // 35)
    assert report.rejected == {"insufficient_funds": 400 - 40 * (300 // 35)}


def test_worker_reloads_the_library_when_the_server_lost_it_and_settles_the_batch(client, settings, producer):
    from charging.connection import connect
    from worker.loop import Worker

    codec.set_balances(client, settings, [("acct", 100)])
    worker = Worker(connect(settings), settings, "w-reload", burst=True)  # connect() loaded the library
    worker.ensure_groups()
    ids = producer.submit([{"account": "acct", "service": "voice", "units": 2} for _ in range(5)])
    client.function_flush()  # a server restarted without its AOF, or a failover to an empty node

    assert worker.run() == 0 and worker.settled == 5

    report = audit(client, settings, {"acct": 100}, ids)
    assert report.ok and report.approved == 5
    assert int(client.hget(Keys(settings.namespace, 0).balances, "acct")) == 50
