"""pump (one FCALL settling many entries, what the worker sends) must settle each entry
exactly as the entry's own function (charge, reserve, ...) would, and keep a failing entry
from taking the others along."""

from __future__ import annotations

import pytest
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
CLOCK = {b"processed_at", b"expires_at", b"entry_id"}  # the server's clock, and the entry (none for a call)


def _outcomes(client, keys: Keys) -> list[dict]:
    return [{k: v for k, v in fields.items() if k not in CLOCK} for _, fields in client.xrange(keys.results)]


def _pump(client, settings, keys: Keys, requests, consumer="w0") -> codec.Summary:
    """XADD the requests to the partition's stream, then one pump call reads and settles them."""
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    for fields in requests:
        client.xadd(keys.requests, fields)
    return codec.summary(codec.pump(client, settings, keys, consumer, len(requests)))


def test_one_pump_call_settles_each_entry_exactly_as_its_own_function(client, settings):
    one_by_one = settings.model_copy(update={"namespace": settings.namespace + "a"})
    batched = settings.model_copy(update={"namespace": settings.namespace + "b"})
    for s in (one_by_one, batched):
        codec.set_balances(client, s, [("rich", 1000), ("poor", 25)])

    singles = [codec.settled(codec.settle(client, one_by_one, request, price(request, one_by_one)))
               for request in (parse_request(fields, one_by_one) for fields in REQUESTS)]
    done = _pump(client, batched, Keys(batched.namespace, 0), REQUESTS)

    assert [(r.status, r.reason) for r in singles] == [
        ("approved", ""), ("rejected", "insufficient_funds"), ("approved", ""),
        ("rejected", "unknown_account"), ("rejected", "idempotency_conflict"), ("approved", ""),
        ("rejected", "insufficient_funds"), ("approved", ""), ("rejected", "exceeds_reservation"),
        ("approved", ""), ("rejected", "unknown_reservation")]
    assert (done.read, done.approved, done.duplicate, done.refused) == (11, 2, 1, 0)
    assert done.rejected == {"insufficient_funds": 2, "unknown_account": 1, "idempotency_conflict": 1}
    assert done.operations == {("reserve", "approved"): 1, ("commit", "exceeds_reservation"): 1,
                               ("commit", "approved"): 1, ("release", "unknown_reservation"): 1}
    a, b = Keys(one_by_one.namespace, 0), Keys(batched.namespace, 0)
    assert client.hgetall(a.balances) == client.hgetall(b.balances) == {b"rich": b"965", b"poor": b"5"}
    assert client.hgetall(a.held) == client.hgetall(b.held) == {}
    assert _outcomes(client, a) == _outcomes(client, b)


def test_a_failing_entry_is_refused_alone_and_the_rest_of_the_call_is_settled(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("rich", 1000)])
    broken_reply = keys.reply("broken")
    client.set(broken_reply, "not a stream")  # XADD to it fails with WRONGTYPE
    requests = [{"request_id": f"f{i}", "account": "rich", "amount": "10"} for i in range(3)]
    requests[1]["reply_to"] = broken_reply

    done = _pump(client, settings, keys, requests)

    assert (done.approved, done.refused) == (2, 1) and "WRONGTYPE" in done.error
    (pending,) = client.xpending_range(keys.requests, settings.group, "-", "+", 10)
    assert client.xrange(keys.requests, pending["message_id"], pending["message_id"])[0][1][b"request_id"] == b"f1"
    assert recorded(client, settings, "f1") == [] and int(client.hget(keys.balances, "rich")) == 980
    again = codec.settled(codec.settle(client, settings, parse_request(requests[2], settings), 10))
    assert again.duplicate  # settled once: a replay is answered as a duplicate


@pytest.mark.parametrize("amount", [-50, "2.5", 0, "1e3", " 5"])
def test_an_amount_that_is_not_a_whole_number_above_zero_is_refused_and_writes_nothing(client, settings, amount):
    """A client allowed to FCALL a settling function directly cannot turn a charge into a top-up."""
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("rich", 100)])
    request = parse_request({"request_id": "n1", "account": "rich", "amount": "10"}, settings)

    with pytest.raises(redis.ResponseError, match="invalid_amount"):
        codec.settle(client, settings, request, amount)

    assert int(client.hget(keys.balances, "rich")) == 100 and client.xlen(keys.results) == 0
    assert recorded(client, settings, "n1") == []
    assert codec.settled(codec.settle(client, settings, request, 10)).charged == 10  # judged anew, not replayed


def test_a_pump_call_whose_keys_are_not_its_partitions_is_refused_before_anything_is_written(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("rich", 100)])
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    client.xadd(keys.requests, {"request_id": "m1", "account": "rich", "amount": "10"})
    names = codec.entries_keys(keys)
    other = codec.entries_keys(Keys(settings.namespace, 1))
    args = ["w0", 1, 0, "", *codec.entries_header(settings, keys)]

    for wrong in (names[:-1], [*names[:2], other[2], *names[3:]], [*names, keys.reply("x")]):
        with pytest.raises(redis.ResponseError, match="wrong_arguments"):
            client.fcall("pump", len(wrong), *wrong, *args)
    assert int(client.hget(keys.balances, "rich")) == 100 and client.xlen(keys.results) == 0
    assert client.xinfo_groups(keys.requests)[0]["consumers"] == 0  # nothing read


@BOTH_BACKENDS
def test_workers_settle_every_entry_once_in_every_partition(client, settings, producer):
    """On a cluster (12 partitions) each pump call must keep to one partition's slot."""
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
