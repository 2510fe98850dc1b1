"""The library trusts nothing: five edge states where a careful reading and direct calls of
lua/charging.lua once broke the money rules (an expired hold that blocked charges, an entry
acked with no outcome, charges with no record, negative balances, loose numbers and repeated
fields). Each test reproduces one and asserts the expected result; tests/test_model.py
checks the same rules after every step of random sequences."""

from __future__ import annotations

import time

import pytest
import redis

from charging import codec
from charging.app.audit import audit
from charging.keys import Keys, keys_of
from charging.schema import parse_request
from tests.conftest import BOTH_BACKENDS, drain, results
from tests.records import recorded

SHORT_TTL_MS = 50


def snapshot(client, settings) -> dict:
    """Every key of the test's namespace with its value: what 'nothing was written' compares."""
    found = {}
    for key in client.scan_iter(match=f"{settings.namespace}:*", count=1000):
        kind = client.type(key)
        found[key] = {b"hash": client.hgetall, b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                      b"stream": client.xrange, b"string": client.get}[kind](key)
    return found


def charge(settings, account: str, amount: int, request_id: str):
    return parse_request({"request_id": request_id, "account": account, "amount": amount}, settings)


def reserve(settings, account: str, amount: int, request_id: str):
    return parse_request({"op": "reserve", "request_id": request_id, "account": account, "amount": amount}, settings)


def pending_to_w0(client, settings, *entries: dict) -> Keys:
    """The entries XADDed to their partition's stream and read by consumer w0 of the workers'
    group, so they are pending to it, as a worker's crash or a refused pump leaves them: the
    next pump of w0 settles them. Take a snapshot after this."""
    keys = keys_of(entries[0]["account"], settings)
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    for fields in entries:
        client.xadd(keys.requests, fields)
    client.xreadgroup(settings.group, "w0", {keys.requests: ">"})
    return keys


def pump(client, settings, keys: Keys) -> codec.Summary:
    return codec.summary(codec.pump(client, settings, keys, "w0", 10))


def refused(call) -> str:
    with pytest.raises(redis.ResponseError) as error:
        call()
    return str(error.value)


# ---- 1. an expired hold never counts -------------------------------------------------------

def test_an_expired_hold_never_blocks_a_charge_whatever_the_sweep_has_reached(client, settings, producer):
    """20 expired holds of other accounts of the partition, then the caller's own expired
    hold: its charge is judged on balance - holds not yet expired, with no worker running."""
    others = [f"account{i}" for i in range(1, 21)]
    codec.set_balances(client, settings, [(a, 100) for a in others] + [("account30", 100)])
    for account in others:
        codec.settle(client, settings, reserve(settings, account, 10, f"h-{account}"), 10, given={"ttl_ms": SHORT_TTL_MS})
    codec.settle(client, settings, reserve(settings, "account30", 100, "h-30"), 100, given={"ttl_ms": SHORT_TTL_MS})
    time.sleep(3 * SHORT_TTL_MS / 1000)

    first = producer.authorize({"request_id": "after-expiry", "account": "account30", "amount": 50})
    second = producer.authorize({"request_id": "after-expiry-2", "account": "account30", "amount": 50})
    replayed = producer.authorize({"request_id": "after-expiry", "account": "account30", "amount": 50})

    assert (first.status, first.balance, second.status, second.balance) == ("approved", 50, "approved", 0)
    assert (replayed.status, replayed.duplicate) == ("approved", True)
    keys = keys_of("account30", settings)
    # The charge released its own account's expired hold, not the partition's oldest.
    assert client.hget(keys.held, "account30") is None and client.hlen(keys.reservations) == 20
    assert codec.expire_reservations(client, settings.model_copy(update={"sweep_batch": 8}), keys) == 8
    assert audit(client, settings, {}).held_mismatch == {}


def test_an_extend_and_a_reserve_see_only_unexpired_holds_of_their_account(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    codec.settle(client, settings, reserve(settings, "account1", 90, "gone"), 90, given={"ttl_ms": SHORT_TTL_MS})
    long = producer.reserve({"request_id": "long", "account": "account1", "amount": 10})
    time.sleep(3 * SHORT_TTL_MS / 1000)

    more = producer.extend({"reservation": long.reservation, "amount": 80})
    held = producer.reserve({"request_id": "late", "account": "account1", "amount": 10})

    assert (more.status, more.held, held.status, held.held) == ("approved", 90, "approved", 100)


# ---- 2. no entry is acked without an outcome -----------------------------------------------

@pytest.mark.parametrize("value", ["1.5", "1e3", "inf", " 100", "9" * 20, "-77", "0x10", ""])
def test_set_balances_refuses_a_balance_that_is_not_plain_digits_and_sets_nothing(client, settings, value):
    keys = Keys(settings.namespace, 0)
    message = refused(lambda: client.fcall("set_balances", 1, keys.balances, "good", 5, "acct", value))
    assert "invalid_balance" in message or "balance_too_large" in message
    assert client.hgetall(keys.balances) == {}


def test_an_entry_on_a_corrupt_balance_stays_pending_until_dead_lettered_never_acked_without_outcome(
        client, settings, producer):
    """A balance written from outside the engine ('1.5'): the function refuses before its
    first write, so the entry is never acked without an outcome; after max deliveries it is
    dead-lettered, and nothing was charged or recorded."""
    keys = Keys(settings.namespace, 0)
    client.hset(keys.balances, "acct", "1.5")  # an operator's raw write, not through set_balances
    [rid] = producer.submit([{"account": "acct", "amount": 1}])

    drain(settings)

    assert results(client, settings) == []
    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"max_deliveries" and dead[b"request_id"] == rid.encode()
    assert recorded(client, settings, rid) == [] and client.hget(keys.balances, "acct") == b"1.5"


@pytest.mark.parametrize("pumped", [False, True], ids=["call", "pump"])
def test_a_balance_with_a_leading_zero_is_refused_before_the_charge_not_failed_after_the_ack(
        client, settings, pumped):
    """'0100' reads as 100 to the library's checks, but HINCRBY (a single call's write) refuses
    it: the charge acked its entry, then failed (found by review). Such a balance, written
    raw, is refused as corrupt by both paths before anything is written."""
    keys = Keys(settings.namespace, 0)
    client.hset(keys.balances, "acct", "0100")  # an operator's raw write, not through set_balances
    if pumped:
        pending_to_w0(client, settings, {"request_id": "z1", "account": "acct", "amount": "10"})
    before = snapshot(client, settings)

    if pumped:
        done = pump(client, settings, keys)
        message = done.error if done.refused == 1 else f"not refused: {done}"
    else:
        message = refused(lambda: codec.settle(client, settings, charge(settings, "acct", 10, "z1"), 10))

    assert "corrupt_balance" in message and snapshot(client, settings) == before
    if pumped:
        assert client.xpending(keys.requests, settings.group)["pending"] == 1


def test_set_balances_stores_a_balance_given_with_leading_zeros_as_its_digits(client, settings):
    keys = Keys(settings.namespace, 0)
    assert client.fcall("set_balances", 1, keys.balances, "acct", "0100", "zero", "000") == 2
    assert client.hmget(keys.balances, ["acct", "zero"]) == [b"100", b"0"]
    assert codec.settled(codec.settle(client, settings, charge(settings, "acct", 10, "z2"), 10)).balance == 90


def test_a_reply_to_of_another_type_is_refused_before_the_charge(client, settings, producer):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 100)])
    reply_to = keys.reply("taken")
    client.set(reply_to, "someone else's string")
    request = parse_request({"request_id": "r1", "account": "acct", "amount": 10, "reply_to": reply_to}, settings)
    before = snapshot(client, settings)

    assert "WRONGTYPE" in refused(lambda: codec.settle(client, settings, request, 10))
    assert snapshot(client, settings) == before

    producer.submit([{"request_id": "r2", "account": "acct", "amount": 10, "reply_to": reply_to}])
    drain(settings)
    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"max_deliveries" and results(client, settings) == []
    assert client.hget(keys.balances, "acct") == b"100"


LAST_ID = "18446744073709551615-18446744073709551615"  # XADD * is refused after it, for good


def exhaust(client, stream: str) -> None:
    """What a role allowed to XADD there can do: an explicit id, the last one possible."""
    client.xadd(stream, {"forged": "1"}, id=LAST_ID)


def test_a_charge_whose_outcome_cannot_be_posted_is_refused_and_takes_nothing(client, settings, producer):
    """Found by an outside probe: with the results stream at the last id, authorize answered
    an error, yet the balance went 100 -> 70 and an approved record was written."""
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 100)])
    exhaust(client, keys.results)
    before = snapshot(client, settings)

    message = refused(lambda: producer.authorize({"request_id": "x1", "account": "acct", "amount": 30}))

    assert "stream_exhausted" in message and snapshot(client, settings) == before
    assert recorded(client, settings, "x1") == []


@pytest.mark.parametrize("stream", ["results", "reply"])
def test_an_entry_whose_outcome_cannot_be_posted_stays_pending_until_dead_lettered(client, settings, producer,
                                                                                   stream):
    """Through a worker the same probe saw settle_failed, the balance 70 -> 50 and the entry
    acked with no outcome and no dead letter. Now the call is refused before it writes: the
    entry stays pending, is retried, and is dead-lettered after max deliveries."""
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 100)])
    exhaust(client, keys.results if stream == "results" else keys.reply(producer.id))
    [rid] = producer.submit([{"account": "acct", "amount": 20}], reply=stream == "reply")

    drain(settings)

    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"max_deliveries" and dead[b"request_id"] == rid.encode()
    assert client.hget(keys.balances, "acct") == b"100" and recorded(client, settings, rid) == []
    assert [f for _, f in client.xrange(keys.results)] == ([{b"forged": b"1"}] if stream == "results" else [])


def test_a_dead_letter_that_cannot_be_posted_leaves_its_entry_pending(client, settings):
    keys = pending_to_w0(client, settings, {"account": "acct"})  # no request_id: a dead letter
    exhaust(client, keys.deadletter)
    before = snapshot(client, settings)

    done = pump(client, settings, keys)

    assert done.refused == 1 and "stream_exhausted" in done.error and snapshot(client, settings) == before
    assert client.xpending(keys.requests, settings.group)["pending"] == 1


@pytest.mark.parametrize("pumped", [False, True], ids=["call", "pump"])
def test_a_charge_that_would_release_an_expired_hold_into_an_index_of_another_type_is_refused(client, settings, pumped):
    """Found by review: a charge on an account with an expired hold writes the expiries index,
    which it never reads: its type is checked before the ack, not found after it."""
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 100)])
    request = parse_request({"op": "reserve", "request_id": "h1", "account": "acct", "amount": 10}, settings)
    codec.settle(client, settings, request, 10, given={"ttl_ms": 1})
    time.sleep(0.01)
    client.delete(keys.expiries)
    client.set(keys.expiries, "someone else's string")
    if pumped:
        pending_to_w0(client, settings, {"request_id": "h2", "account": "acct", "amount": "5"})
    before = snapshot(client, settings)

    if pumped:  # the shared keys are checked once for the whole call
        done = pump(client, settings, keys)
        message = done.error if done.refused == 1 else f"not refused: {done}"
    else:
        message = refused(lambda: codec.settle(client, settings, charge(settings, "acct", 5, "h2"), 5))

    assert "WRONGTYPE" in message and snapshot(client, settings) == before
    assert recorded(client, settings, "h2") == []


def test_a_pump_call_leaves_no_write_of_a_refused_entry(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 100)])
    client.hset(keys.balances, "bad", "abc")
    pending_to_w0(client, settings, {"request_id": "b1", "account": "bad", "amount": "5"},
                  {"request_id": "b2", "account": "acct", "amount": "5"})

    done = pump(client, settings, keys)

    assert (done.refused, done.approved) == (1, 1) and "corrupt_balance" in done.error
    assert recorded(client, settings, "b1") == [] and client.xlen(keys.results) == 1
    assert [r.status for r in recorded(client, settings, "b2")] == ["approved"]
    assert client.xpending(keys.requests, settings.group)["pending"] == 1


# ---- 3. every charge has its record --------------------------------------------------------

@pytest.mark.parametrize("window", ["abc", "-5", "0", "1.5", "", str(10**16)])
def test_a_malformed_dedupe_window_is_refused_before_anything_is_charged(client, settings, window):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 1000)])
    before = snapshot(client, settings)
    for _ in range(5):
        message = refused(lambda: codec.settle(client, settings, charge(settings, "acct", 100, "w1"), 100,
                                               given={"window_ms": window}))
        assert "invalid_window" in message
    assert snapshot(client, settings) == before
    assert client.hget(keys.balances, "acct") == b"1000"


# ---- 4. no balance or held total below zero ------------------------------------------------

@pytest.mark.parametrize("amount", ["-5000", "0", "1.5", "1e3", " 5"])
def test_top_up_refuses_anything_but_a_whole_number_above_zero(client, settings, amount):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 1000)])
    assert "invalid_amount" in refused(lambda: client.fcall("top_up", 1, keys.balances, "acct", amount))
    assert client.hget(keys.balances, "acct") == b"1000"


def test_the_balance_cap_is_the_librarys_not_the_callers(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 10**15 - 10)])
    assert "wrong_arguments" in refused(lambda: client.fcall("top_up", 1, keys.balances, "acct", 100, 10**16))
    assert "balance_too_large" in refused(lambda: codec.top_up(client, settings, "acct", 11))
    assert codec.top_up(client, settings, "acct", 10) == 10**15
    assert "balance_too_large" in refused(lambda: codec.set_balances(client, settings, [("acct", 10**15 + 1)]))


def test_a_negative_held_total_never_lets_a_charge_below_zero(client, settings, producer):
    """Corrupt data (a held total written from outside): the function refuses to decide on it."""
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 100)])
    client.hset(keys.held, "acct", -50)
    assert "corrupt_held" in refused(lambda: producer.authorize({"account": "acct", "amount": 120}))
    assert client.hget(keys.balances, "acct") == b"100" and client.xlen(keys.results) == 0


def test_a_held_total_smaller_than_its_reservations_is_refused(client, settings, producer):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 100)])
    producer.reserve({"request_id": "h", "account": "acct", "amount": 60})
    client.hset(keys.held, "acct", 10)  # would leave 90 available: refused instead
    assert "corrupt_held" in refused(lambda: producer.authorize({"account": "acct", "amount": 80}))
    assert client.hget(keys.balances, "acct") == b"100"


# ---- 5. numbers are digits, a field is given once ------------------------------------------

@pytest.mark.parametrize("amount", ["1e3", "0x10", " 5", "5 ", "+5", "1.0", "inf", "nan"])
def test_a_direct_charge_refuses_an_amount_that_is_not_plain_digits(client, settings, amount):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 10_000)])
    message = refused(lambda: codec.settle(client, settings, charge(settings, "acct", 5, "n1"), amount))
    assert "invalid_amount" in message
    assert client.hget(keys.balances, "acct") == b"10000" and recorded(client, settings, "n1") == []


@BOTH_BACKENDS
def test_a_field_given_twice_is_dead_lettered_and_charges_nothing(client, settings):
    """XADD takes a name twice; redis-py's dict would keep the last value (777)."""
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 1000)])
    entry = client.execute_command("XADD", keys.requests, "*", "request_id", "dup1", "account", "acct",
                                   "amount", "1", "amount", "777")

    drain(settings)

    [(_, dead)] = client.xrange(keys.deadletter)
    assert (dead[b"error"], dead[b"entry_id"]) == (b"duplicate_field", entry)
    assert b"amount" in dead[b"detail"] and results(client, settings) == []
    assert client.hget(keys.balances, "acct") == b"1000"


def test_the_field_count_limit_counts_pairs_not_distinct_names(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("acct", 1000)])
    pairs = ["account", "acct", "amount", "1"] + ["request_id", "same"] * 41
    client.execute_command("XADD", keys.requests, "*", *pairs)

    drain(settings)

    [(_, dead)] = client.xrange(keys.deadletter)
    assert dead[b"error"] == b"too_many_fields" and b"43 fields" in dead[b"detail"]
    assert client.hget(keys.balances, "acct") == b"1000"


# ---- the library's limits ------------------------------------------------------------------

def test_the_settings_never_allow_more_than_the_library_takes():
    """charging.settings mirrors the limits lua/charging.lua applies to every caller."""
    import re

    from charging.connection import library_source
    from charging.settings import LIBRARY_MAX_BALANCE, LIBRARY_MAX_DURATION_S

    source = library_source()
    assert int(re.search(r"local MAX_BALANCE = (\d+)", source)[1]) == LIBRARY_MAX_BALANCE
    assert int(re.search(r"local MAX_DURATION_MS = (\d+)", source)[1]) == LIBRARY_MAX_DURATION_S * 1000


def test_accounts_of_other_partitions_cannot_share_a_call(client, settings):
    """Keys are checked against the names their roles give them, in one partition."""
    other = Keys(settings.namespace, 1)
    keys = Keys(settings.namespace, 0)
    names = codec.settle_keys(keys)
    names[1] = other.results
    args = codec.settle_arguments(settings, charge(settings, "acct", 5, "x1"), 5)
    assert "wrong_arguments" in refused(lambda: client.fcall("charge", len(names), *names, *args))


def test_a_reservation_whose_draw_names_a_lot_the_wallet_does_not_hold_is_refused_not_charged_to_main(
        client, settings, producer):
    """Found by reading the plans-and-lots change before it landed: a commit trusted a stored
    reservation's draws, so one naming a lot the wallet does not hold (a raw HSET by a role
    that may run it) charged the main balance for it. Every draw is now checked against the
    wallet when the account is read, before anything is written."""
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 100)])
    codec.grant(client, settings, "acct", "promo", "money", 50)
    held = producer.reserve({"request_id": "s1", "account": "acct", "amount": 30})
    assert held.draws == "promo:30"
    packed = client.hget(keys.reservations, "acct/s1").decode()
    client.hset(keys.reservations, "acct/s1", packed.replace("promo:30", "gone:30"))
    before = snapshot(client, settings)
    assert "corrupt_reservation" in refused(lambda: producer.commit({"reservation": "acct/s1", "amount": 30}))
    assert snapshot(client, settings) == before
    assert "corrupt_reservation" in refused(lambda: producer.commit({"reservation": "acct/s1", "amount": 30}))
    assert client.hget(keys.balances, "acct") == b"100"


def test_an_accounts_money_with_its_lots_stays_within_the_librarys_limit(client, settings):
    """Found by the model (a grant through the stream): money lots on top of a main balance
    near 10^15 made an outcome's balance exceed the limit, so its dedupe record could never
    be read again (corrupt_record) and the request id was refused for good. A grant, a
    top-up or a reset that would take main balance and lots over 10^15 is refused."""
    keys = keys_of("acct", settings)
    codec.set_balances(client, settings, [("acct", 10**15 - 5)])
    assert "balance_too_large" in refused(lambda: codec.grant(client, settings, "acct", "big", "money", 6))
    assert codec.grant(client, settings, "acct", "fits", "money", 5).status == "granted"
    assert codec.grant(client, settings, "acct", "bundle", "units", 10**6, "sms").status == "granted"  # not money
    before = snapshot(client, settings)
    assert "balance_too_large" in refused(lambda: codec.top_up(client, settings, "acct", 1))
    assert "balance_too_large" in refused(lambda: codec.set_balances(client, settings, [("acct", 10**15)]))
    assert snapshot(client, settings) == before
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    client.xadd(keys.requests, {"op": "grant", "request_id": "g", "account": "acct", "lot": "more", "amount": "1"})
    assert pump(client, settings, keys).operations == {("grant", "balance_too_large"): 1}
