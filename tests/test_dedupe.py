"""Dedupe records in time buckets (lua/charging.lua, bucket()): a request id answers as a
duplicate for exactly its window, each bucket expires once its last record has, through a
call of its own and through pump."""

from __future__ import annotations

import time

import pytest

from charging import codec
from charging.keys import keys_of
from charging.schema import parse_request
from tests.conftest import BOTH_BACKENDS
from tests.records import recorded

SEP = codec.RESERVATION_SEP


def charge(settings, request_id: str, amount: int = 10, account: str = "acct"):
    return parse_request({"request_id": request_id, "account": account, "amount": amount}, settings)


def pumped(client, settings, request_id: str, amount: int = 10) -> codec.Summary:
    """The request XADDed to its stream, then settled by one pump call, as a worker would."""
    keys = keys_of("acct", settings)
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    client.xadd(keys.requests, {"request_id": request_id, "account": "acct", "amount": amount})
    return codec.summary(codec.pump(client, settings, keys, "w0", 10))


def server_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_a_record_lives_in_the_bucket_of_its_slice_which_expires_once_its_last_record_has(client, settings):
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 100)])

    reply = codec.settled(codec.settle(client, settings, charge(settings, "d1"), 10))

    window = settings.dedupe_window_ms
    slice_ms = codec.dedupe_slice(window)
    assert window / 4 <= slice_ms < window / 2 and slice_ms & (slice_ms - 1) == 0  # a power of two
    slot = reply.processed_at // slice_ms
    name = keys.dedupe(slice_ms, slot)
    assert client.hget(name, "d1").decode().split(SEP)[:3] == [str(reply.processed_at), "acct|amount|10", "approved"]
    expires_at = (slot + 1) * slice_ms + window  # the end of the slice, plus a window
    assert abs(client.pexpiretime(name) - expires_at) <= 1
    assert [r.charged for r in recorded(client, settings, "d1")] == [10]


@BOTH_BACKENDS
def test_a_request_id_is_a_duplicate_for_exactly_its_window(client, settings):
    """With a window of 400 ms (slices of 100 ms): a replay inside it charges nothing, one
    after it is a new charge, whichever bucket the first one went into."""
    codec.set_balances(client, settings, [("acct", 100)])
    window = {"window_ms": 400}
    first = codec.settled(codec.settle(client, settings, charge(settings, "d2"), 10, given=window))
    again = codec.settled(codec.settle(client, settings, charge(settings, "d2"), 10, given=window))
    assert (again.duplicate, again.balance) == (True, 90)
    while server_ms(client) < first.processed_at + 400:
        time.sleep(0.01)

    later = codec.settled(codec.settle(client, settings, charge(settings, "d2"), 10, given=window))

    assert (later.duplicate, later.status, later.balance) == (False, "approved", 80)


def test_a_corrupt_record_in_a_bucket_is_refused_before_anything_is_written(client, settings):
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 100)])
    window = settings.dedupe_window_ms
    slice_ms = codec.dedupe_slice(window)
    client.hset(keys.dedupe(slice_ms, server_ms(client) // slice_ms), "d3", "not a record")

    with pytest.raises(Exception, match="corrupt_record"):
        codec.settle(client, settings, charge(settings, "d3"), 10)
    done = pumped(client, settings, "d3")

    assert done.refused == 1 and "corrupt_record" in done.error
    assert client.hget(keys.balances, "acct") == b"100" and client.xlen(keys.results) == 0
    assert client.xpending(keys.requests, settings.group)["pending"] == 1


def test_a_window_changed_within_its_slice_still_finds_the_records_of_the_old_one(client, settings):
    """A rolling deploy that moves the window from 60 s to 61 s: both share their buckets."""
    codec.set_balances(client, settings, [("acct", 100)])
    codec.settle(client, settings, charge(settings, "d4"), 10, given={"window_ms": 60_000})

    again = codec.settled(codec.settle(client, settings, charge(settings, "d4"), 10, given={"window_ms": 61_000}))
    pumped_again = pumped(client, settings.model_copy(update={"dedupe_window_s": 61}), "d4")

    assert (again.duplicate, again.balance) == (True, 90)
    assert pumped_again.duplicate == 1 and client.hget(keys_of("acct", settings).balances, "acct") == b"90"


def test_a_record_written_by_a_clock_ahead_is_found_after_the_clock_stepped_back(client, settings):
    """A failover to a replica whose clock is behind: the record sits in the slot after now's."""
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 100)])
    slice_ms = codec.dedupe_slice(settings.dedupe_window_ms)
    ahead = server_ms(client) + slice_ms
    client.hset(keys.dedupe(slice_ms, ahead // slice_ms), "d5", SEP.join([str(ahead), "acct|amount|10", "approved",
                                                                           "", "10", "90"]))

    direct = codec.settled(codec.settle(client, settings, charge(settings, "d5"), 10))
    pumped_again = pumped(client, settings, "d5")

    assert (direct.duplicate, direct.balance) == (True, 90) and pumped_again.duplicate == 1
    assert client.hget(keys.balances, "acct") == b"100"


def test_the_gateway_lookup_forgets_a_record_once_its_window_has_passed(client, settings):
    short = settings.model_copy(update={"dedupe_window_s": 1})
    codec.set_balances(client, short, [("acct", 100)])
    first = codec.settled(codec.settle(client, short, charge(short, "d6"), 10))
    assert [r.charged for r in recorded(client, short, "d6")] == [10]
    while server_ms(client) < first.processed_at + 1000:
        time.sleep(0.02)

    assert recorded(client, short, "d6") == []  # its bucket may live on; the record no longer counts


def test_a_call_reads_the_bucket_it_writes_even_past_a_newer_record_that_no_longer_counts(client, settings):
    """Found by review: a forged, too old record in the slot after now's stopped the lookup
    before now's bucket, which the charge then wrote unread, after the ack."""
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 1000)])
    slice_ms = codec.dedupe_slice(settings.dedupe_window_ms)
    now = server_ms(client)
    client.hset(keys.dedupe(slice_ms, now // slice_ms + 1), "d7", SEP.join(["0", "acct|amount|10", "approved", "",
                                                                             "10", "990"]))
    client.set(keys.dedupe(slice_ms, now // slice_ms), "someone else's string")

    with pytest.raises(Exception, match="WRONGTYPE"):
        codec.settle(client, settings, charge(settings, "d7"), 10)

    assert client.hget(keys.balances, "acct") == b"1000" and client.xlen(keys.results) == 0


def test_the_gateway_lookup_skips_a_record_it_cannot_read(client, settings):
    keys = keys_of("acct", settings)
    slice_ms = codec.dedupe_slice(settings.dedupe_window_ms)
    now = server_ms(client)
    client.hset(keys.dedupe(slice_ms, now // slice_ms), "d8", SEP.join([str(now), "acct|amount|10", "approved"]))

    assert recorded(client, settings, "d8") == []
