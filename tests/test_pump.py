"""pump (lua/charging.lua): the library reads a consumer's own pending and new entries,
reclaims those of dead consumers, judges, rates and settles them, and answers with a
summary; the worker only calls it."""

from __future__ import annotations

import time

import pytest
import redis

from charging import codec
from charging.keys import Keys
from tests.conftest import results


@pytest.fixture
def keys(client, settings) -> Keys:
    keys = Keys(settings.namespace, 0)
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    codec.set_balances(client, settings, [("account1", 100), ("account2", 1)])
    return keys


def pump(client, settings, keys, consumer="w0", count=25, reclaim_idle_ms=0, waited=""):
    return codec.summary(codec.pump(client, settings, keys, consumer, count, reclaim_idle_ms, waited))


def test_one_call_settles_what_it_reads_and_counts_each_kind(client, settings, keys):
    entries = [
        {"request_id": "a", "account": "account1", "amount": "10"},
        {"request_id": "a", "account": "account1", "amount": "10"},  # a replay
        {"request_id": "b", "account": "account2", "amount": "10"},  # insufficient funds
        {"request_id": "c", "account": "account1", "amount": "zero"},  # dead-lettered
        {"op": "reserve", "request_id": "d", "account": "account1", "amount": "5"},
        {"op": "release", "request_id": "e", "reservation": "account1/d"},
    ]
    ids = [client.xadd(keys.requests, e).decode() for e in entries]

    done = pump(client, settings, keys)

    assert (done.read, done.reclaimed, done.last_id) == (6, 0, ids[-1])
    assert (done.approved, done.duplicate, done.refused, done.error) == (1, 1, 0, "")
    assert done.rejected == {"insufficient_funds": 1} and done.dead == {"invalid_amount": 1}
    assert done.operations == {("reserve", "approved"): 1, ("release", "approved"): 1}
    assert len(results(client, settings)) == 5 and client.xlen(keys.deadletter) == 1
    assert int(client.hget(keys.balances, "account1")) == 90
    assert client.xpending(keys.requests, settings.group)["pending"] == 0
    assert pump(client, settings, keys) == codec.Summary()  # nothing left


def test_own_pending_entries_are_settled_before_new_ones_and_count_bounds_a_call(client, settings, keys):
    first = client.xadd(keys.requests, {"request_id": "p1", "account": "account1", "amount": "1"}).decode()
    client.xreadgroup(settings.group, "w0", {keys.requests: ">"}, count=1)  # read before a crash
    for i in range(3):
        client.xadd(keys.requests, {"request_id": f"n{i}", "account": "account1", "amount": "1"})

    done = pump(client, settings, keys, count=2)

    assert (done.read, done.approved) == (2, 2)
    assert results(client, settings)[0]["entry_id"] == first
    assert pump(client, settings, keys, count=2).read == 2
    assert int(client.hget(keys.balances, "account1")) == 96


def test_an_entry_the_workers_wait_delivered_counts_no_try(client, settings, keys):
    """The worker waits with a blocking XREADGROUP of COUNT 1; that delivery is no try,
    so even max_deliveries 1 settles the entry."""
    strict = settings.model_copy(update={"max_deliveries": 1})
    entry_id = client.xadd(keys.requests, {"request_id": "w", "account": "account1", "amount": "1"}).decode()
    client.xreadgroup(settings.group, "w0", {keys.requests: ">"}, count=1, block=10)

    assert pump(client, strict, keys, waited=entry_id).approved == 1
    assert client.xlen(keys.deadletter) == 0


def test_reclaim_takes_over_a_dead_consumers_entries_and_dead_letters_deleted_ones(client, settings, keys):
    kept = client.xadd(keys.requests, {"request_id": "r1", "account": "account1", "amount": "3"})
    gone = client.xadd(keys.requests, {"request_id": "r2", "account": "account1", "amount": "3"})
    client.xreadgroup(settings.group, "dead", {keys.requests: ">"}, count=10)
    client.xdel(keys.requests, gone)

    assert pump(client, settings, keys).read == 0  # not idle yet: not taken
    time.sleep(0.01)  # idle is counted in whole ms: all of the above can fit in one
    done = pump(client, settings, keys, reclaim_idle_ms=1)

    assert (done.reclaimed, done.read, done.approved, done.dead) == (1, 1, 1, {"entry_deleted": 1})
    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"entry_deleted" and dead[b"entry_id"] == gone
    assert [f["entry_id"] for f in results(client, settings)] == [kept.decode()]
    assert client.xpending(keys.requests, settings.group)["pending"] == 0


def test_a_refused_entry_writes_nothing_stays_pending_and_is_read_again(client, settings, keys):
    client.hset(keys.balances, "account1", "not a number")
    client.xadd(keys.requests, {"request_id": "x", "account": "account1", "amount": "1"})
    client.xadd(keys.requests, {"request_id": "y", "account": "account2", "amount": "1"})

    done = pump(client, settings, keys)

    assert (done.read, done.refused, done.approved) == (2, 1, 1) and "corrupt_balance" in done.error
    assert client.xpending(keys.requests, settings.group)["pending"] == 1
    assert len(results(client, settings)) == 1
    again = pump(client, settings, keys)
    assert (again.read, again.refused) == (1, 1)


def test_malformed_pump_calls_are_refused(client, settings, keys):
    names = codec.entries_keys(keys)
    header = codec.entries_header(settings, keys)
    for args in (["w0", 0, 0, "", *header], ["w0", 1001, 0, "", *header], ["", 1, 0, "", *header],
                 ["w0", 1, -1, "", *header], ["w0", 1, 0, "x", *header], ["w0", 1, 0, ""]):
        with pytest.raises(redis.ResponseError):
            client.fcall("pump", len(names), *names, *args)
    assert client.xinfo_groups(keys.requests)[0]["consumers"] == 0  # nothing read


def test_a_context_is_never_taken_for_another_calls_whose_parts_join_to_the_same_text(client, settings, keys):
    """Found by review: the checked context a pump call keeps was keyed by its tag and header
    joined with the library's separator, which a crafted tag or argument may hold: a call
    with an invalid group then ran on another call's context (and dead-lettered an entry
    that judged valid)."""
    header = [str(v) for v in codec.entries_header(settings, keys)]
    crafted_tag = f"{keys.tag}\x1fx:{{p0}}"
    crafted = [f"{crafted_tag}:{name.rsplit(':', 1)[-1]}" if not name.endswith("deadletter:reasons")
               else f"{crafted_tag}:deadletter:reasons" for name in codec.entries_keys(keys)]
    with pytest.raises(redis.ResponseError):  # its context is checked (and kept), then it finds no group
        client.fcall("pump", len(crafted), *crafted, "w0", 25, 0, "", *header)
    client.xadd(keys.requests, {"request_id": "q1", "account": "account1", "amount": "5",
                                "reply_to": f"{keys.tag}:reply:abc"})
    joined_alike = ["x:{p0}", *header[:13], f"{header[13]}\x1f{header[14]}"]
    names = codec.entries_keys(keys)

    with pytest.raises(redis.ResponseError, match="invalid_group"):
        client.fcall("pump", len(names), *names, "w0", 25, 0, "", *joined_alike)

    assert client.xlen(keys.deadletter) == 0 and pump(client, settings, keys).approved == 1


def test_a_worker_asks_for_more_entries_per_call_while_calls_come_back_full(client, settings):
    """A backlog: each full call doubles the next one's size up to MAX_ENTRIES_PER_CALL (fewer,
    cheaper calls); the first call that is not full goes back to ENTRIES_PER_CALL (short
    calls, so authorize callers barely wait). CHARGING_BATCH caps both."""
    from worker.loop import ENTRIES_PER_CALL, MAX_ENTRIES_PER_CALL, Worker

    worker = Worker(client, settings, "w0")
    sizes = [worker.size(0)]
    for _ in range(3):
        worker.resize(0, codec.Summary(read=worker.size(0)))
        sizes.append(worker.size(0))
    worker.resize(0, codec.Summary(read=3))

    assert sizes == [ENTRIES_PER_CALL, 2 * ENTRIES_PER_CALL, MAX_ENTRIES_PER_CALL, MAX_ENTRIES_PER_CALL]
    assert worker.size(0) == ENTRIES_PER_CALL
    capped = Worker(client, settings.model_copy(update={"batch": 40}), "w1")
    capped.resize(0, codec.Summary(read=25))
    assert capped.size(0) == 40


def test_a_backlog_is_settled_in_calls_that_grow(client, settings, keys):
    from worker.loop import MAX_ENTRIES_PER_CALL, Worker

    for n in range(400):
        client.xadd(keys.requests, {"request_id": f"b{n}", "account": "account1", "amount": "1"})
    worker = Worker(client, settings, "w0", burst=True)
    worker.ensure_groups()
    calls = []
    while (done := worker.pump([keys], 0)[0]).read:
        calls.append(done.read)

    assert sum(calls) == 400 and max(calls) == MAX_ENTRIES_PER_CALL and len(calls) < 400 // 25


def test_a_quiet_partition_is_called_while_another_drains_a_backlog(client, settings):
    """Found by review: a partition whose call was not full dropped out of the round, so an
    entry that reached it next waited for another partition's whole backlog."""
    from worker.loop import Worker

    two = settings.model_copy(update={"partitions": 2})
    busy, quiet = Keys(two.namespace, 0), Keys(two.namespace, 1)
    worker = Worker(client, two, "w0")
    worker.ensure_groups()
    for n in range(400):
        client.xadd(busy.requests, {"request_id": f"b{n}", "account": "account1", "amount": "1"})
    calls, pump_ = [], worker.pump

    def pump(todo, reclaim_idle_ms):
        summaries = pump_(todo, reclaim_idle_ms)
        calls.append({keys.partition: summary.read for keys, summary in zip(todo, summaries)})
        if len(calls) == 1:  # it arrives just after the quiet partition's first call
            client.xadd(quiet.requests, {"request_id": "q", "account": "account2", "amount": "1"})
        return summaries

    worker.pump = pump
    worker.pump_round()

    settled_quiet_at = next(i for i, call in enumerate(calls) if call.get(1))
    assert settled_quiet_at == 1 and calls[settled_quiet_at][0] > 0  # while the backlog was still being read
    assert sum(call.get(0, 0) for call in calls) == 400


def test_a_pausing_partition_is_not_read_by_the_wait(client, settings, keys):
    """Found by review: the wait read every partition, a pausing one included, so its unread
    entries were pulled one per wait (a busy loop), each counting a delivery nobody tried."""
    from worker.loop import Worker

    worker = Worker(client, settings, "w0")
    worker.ensure_groups()
    for n in range(3):
        client.xadd(keys.requests, {"request_id": f"p{n}", "account": "account1", "amount": "1"})
    worker.resume_at[keys.partition] = time.monotonic() + 0.05

    started = time.monotonic()
    worker.wait()

    assert time.monotonic() - started >= 0.04 and worker.waited == {}
    assert client.xpending(keys.requests, settings.group)["pending"] == 0
