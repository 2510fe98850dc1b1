"""Reservations (sessions): reserve, extend, commit, release and expiry hold and charge money
exactly once, never let available funds go below zero, and never charge more than was
committed, through the stream and synchronously."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import redis

from charging import codec
from charging.app import accounts
from charging.app.audit import audit
from charging.connection import connect
from charging.keys import Keys, all_partitions, keys_of
from producer import Producer, run_session
from tests.conftest import BOTH_BACKENDS, cli, drain, results
from worker.loop import Worker


def funds(client, settings, account="account1") -> tuple[int, int]:
    return accounts.funds(client, settings, account)


def voice_reserve(request_id: str, units: int = 60, account: str = "account1", **extra) -> dict:
    return {"op": "reserve", "request_id": request_id, "account": account, "service": "voice", "units": units,
            **extra}


def open_reservations(client, settings) -> int:
    return sum(client.hlen(k.reservations) for k in all_partitions(settings.namespace, settings.partitions))


@contextmanager
def running_workers(settings, count: int = 2):
    workers = [Worker(connect(settings), settings, f"rw-{i}") for i in range(count)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(20)


# ---- one session ------------------------------------------------------------------------

@BOTH_BACKENDS
def test_voice_call_reserve_extend_commit_charges_what_was_used_and_releases_the_rest(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])

    reserved = producer.reserve({"request_id": "call-1", "account": "account1", "service": "voice", "units": 60,
                                 "ttl": 120})
    assert (reserved.status, reserved.reservation, reserved.reserved, reserved.held, reserved.charged) == (
        "approved", "account1/call-1", 300, 300, 0)
    assert reserved.expires_at - reserved.processed_at == 120_000
    assert funds(client, settings) == (1000, 300)

    extended = producer.extend({"reservation": "account1/call-1", "units": 30})
    assert (extended.status, extended.reserved, extended.held, extended.available) == ("approved", 450, 450, 550)

    committed = producer.commit({"reservation": "account1/call-1", "units": 42})
    assert (committed.status, committed.charged, committed.reserved, committed.held, committed.balance) == (
        "approved", 210, 450, 0, 790)
    assert funds(client, settings) == (790, 0)
    assert open_reservations(client, settings) == 0
    assert audit(client, settings, {"account1": 1000}).ok


@BOTH_BACKENDS
def test_the_same_session_through_the_request_stream(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    with running_workers(settings):
        reserved = producer.charge(voice_reserve("call-s"), timeout=30)
        extended = producer.charge({"op": "extend", "reservation": reserved.reservation, "units": 30}, timeout=30)
        committed = producer.charge({"op": "commit", "reservation": reserved.reservation, "units": 42}, timeout=30)
    assert [o.status for o in (reserved, extended, committed)] == ["approved"] * 3
    assert (committed.op, committed.charged, committed.balance, committed.held) == ("commit", 210, 790, 0)
    assert [(o["op"], o["reservation"], o["reserved"]) for o in results(client, settings)] == [
        ("reserve", "account1/call-s", "300"), ("extend", "account1/call-s", "450"),
        ("commit", "account1/call-s", "450")]
    assert funds(client, settings) == (790, 0)
    assert audit(client, settings, {"account1": 1000}, [o.request_id for o in (reserved, extended, committed)]).ok


def test_release_returns_everything_and_charges_nothing(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    producer.reserve({"request_id": "r", "account": "account1", "amount": 70})
    released = producer.release({"reservation": "account1/r"})
    assert (released.status, released.charged, released.reserved, released.held) == ("approved", 0, 70, 0)
    assert funds(client, settings) == (100, 0)
    again = producer.release({"reservation": "account1/r"})
    assert (again.status, again.reason) == ("rejected", "unknown_reservation")


def test_commit_in_units_uses_the_unit_price_of_the_reserve_even_after_a_tariff_change(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.reserve(voice_reserve("priced", units=10))  # voice at 5: 50 held
    dearer = settings.model_copy(update={"tariff": {"sms": 1, "voice": 7, "data": 10}})
    committed = Producer(client, dearer).commit({"reservation": "account1/priced", "units": 8})
    assert committed.charged == 40


def test_commit_of_an_amount_reservation_counts_units_as_minor_units(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.reserve({"request_id": "amt", "account": "account1", "amount": 90})
    assert producer.commit({"reservation": "account1/amt", "units": 33}).charged == 33


# ---- the rules ----------------------------------------------------------------------------

@BOTH_BACKENDS
def test_a_charge_cannot_spend_funds_held_by_a_reservation(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    producer.reserve({"request_id": "hold", "account": "account1", "amount": 80})
    poor = producer.authorize({"account": "account1", "amount": 30})
    assert (poor.status, poor.reason, poor.balance) == ("rejected", "insufficient_funds", 100)
    assert producer.authorize({"account": "account1", "amount": 20}).approved
    assert producer.reserve({"request_id": "more", "account": "account1", "amount": 1}).reason == "insufficient_funds"
    producer.release({"reservation": "account1/hold"})
    assert producer.authorize({"account": "account1", "amount": 80}).approved
    assert funds(client, settings) == (0, 0)


def test_commit_of_more_than_reserved_is_rejected_and_leaves_the_reservation_open(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.reserve(voice_reserve("over", units=10))
    over = producer.commit({"reservation": "account1/over", "units": 11})
    assert (over.status, over.reason, over.charged, over.reserved, over.held) == (
        "rejected", "exceeds_reservation", 0, 50, 50)
    assert producer.commit({"reservation": "account1/over", "amount": 50}).charged == 50
    assert funds(client, settings) == (950, 0)


def test_extend_short_of_available_funds_is_rejected_and_the_reservation_stays(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 400)])
    producer.reserve(voice_reserve("ext", units=60))
    short = producer.extend({"reservation": "account1/ext", "units": 30})
    assert (short.status, short.reason, short.reserved, short.held) == ("rejected", "insufficient_funds", 300, 300)
    assert producer.extend({"reservation": "account1/ext", "units": 20}).held == 400
    assert producer.commit({"reservation": "account1/ext", "units": 80}).balance == 0


@BOTH_BACKENDS
def test_repeated_commits_with_the_same_request_id_charge_once(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.reserve(voice_reserve("sync"))
    first, *replays = [producer.commit({"request_id": "c-1", "reservation": "account1/sync", "units": 42})
                       for _ in range(3)]
    assert (first.charged, first.duplicate) == (210, False)
    assert [(o.status, o.charged, o.balance, o.duplicate) for o in replays] == [("approved", 210, 790, True)] * 2
    late = producer.commit({"request_id": "c-2", "reservation": "account1/sync", "units": 42})
    assert (late.status, late.reason, late.charged) == ("rejected", "unknown_reservation", 0)

    producer.reserve(voice_reserve("stream"))
    for _ in range(3):
        producer.submit([{"op": "commit", "request_id": "c-3", "reservation": "account1/stream", "units": 10}])
    drain(settings, consumers=2)
    commits = [o for o in results(client, settings) if o["request_id"] == "c-3"]
    assert sorted((o["charged"], o["duplicate"]) for o in commits) == [("50", "0"), ("50", "1"), ("50", "1")]
    assert funds(client, settings) == (1000 - 210 - 50, 0)


def test_a_replayed_reserve_returns_the_same_reservation_and_holds_once(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    first = producer.reserve(voice_reserve("twice"))
    again = producer.reserve(voice_reserve("twice"))
    assert (again.reservation, again.reserved, again.expires_at, again.duplicate) == (
        first.reservation, 300, first.expires_at, True)
    assert funds(client, settings) == (1000, 300)


def test_a_request_id_reused_for_another_op_is_an_idempotency_conflict(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.authorize({"request_id": "same", "account": "account1", "service": "voice", "units": 60})
    conflict = producer.reserve(voice_reserve("same"))
    assert (conflict.status, conflict.reason, conflict.held) == ("rejected", "idempotency_conflict", 0)
    producer.reserve(voice_reserve("held"))
    first = producer.commit({"request_id": "c", "reservation": "account1/held", "units": 10})
    changed = producer.commit({"request_id": "c", "reservation": "account1/held", "units": 11})
    assert (first.charged, changed.reason, changed.charged) == (50, "idempotency_conflict", 0)
    assert funds(client, settings) == (1000 - 300 - 50, 0)


def test_an_old_reserve_replayed_after_the_dedupe_window_cannot_replace_the_open_reservation(client, settings):
    short = settings.model_copy(update={"dedupe_window_s": 1})
    producer = Producer(client, short)
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.reserve(voice_reserve("long", ttl=60))
    time.sleep(1.1)  # the reserve's dedupe record is gone, the reservation is still open
    replay = producer.reserve(voice_reserve("long", ttl=60))
    assert (replay.status, replay.reason, replay.reserved) == ("rejected", "reservation_exists", 300)
    assert funds(client, settings) == (1000, 300)


# ---- expiry -------------------------------------------------------------------------------

def test_an_expired_reservation_is_released_never_charged_and_a_late_commit_says_so(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    producer.reserve({"request_id": "short", "account": "account1", "amount": 60, "ttl": 1})
    time.sleep(1.1)
    late = producer.commit({"reservation": "account1/short", "units": 10})
    assert (late.status, late.reason, late.charged, late.reserved, late.held) == (
        "rejected", "reservation_expired", 0, 60, 0)
    assert funds(client, settings) == (100, 0)


def test_the_next_touch_of_the_account_releases_its_expired_reservation(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    producer.reserve({"request_id": "lazy", "account": "account1", "amount": 60, "ttl": 1})
    time.sleep(1.1)
    assert funds(client, settings) == (100, 60)  # nobody touched it yet
    assert producer.authorize({"account": "account1", "amount": 100}).approved  # the charge released it first
    assert funds(client, settings) == (0, 0)
    gone = producer.commit({"reservation": "account1/lazy", "units": 10})
    assert (gone.reason, gone.charged) == ("unknown_reservation", 0)


def test_an_extend_pushes_the_expiry_back(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 1000)])
    producer.reserve(voice_reserve("kept", ttl=1))
    producer.extend({"reservation": "account1/kept", "units": 1, "ttl": 30})
    time.sleep(1.1)
    assert producer.commit({"reservation": "account1/kept", "units": 61}).charged == 305


def test_the_sweep_releases_expired_reservations_in_bounded_batches(client, settings, producer):
    """The batch bounds the expired reservations a sweep takes from the index; with each it
    ends every other expired one of the same account, as the account's next call would."""
    settings = settings.model_copy(update={"sweep_batch": 3})
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [(f"account{i}", 1000) for i in range(1, 6)])
    for i in range(1, 6):
        producer.reserve({"request_id": f"s{i}", "account": f"account{i}", "amount": 10, "ttl": 1})
    producer.reserve({"request_id": "s0", "account": "account5", "amount": 10, "ttl": 1})
    producer.reserve({"request_id": "lives", "account": "account1", "amount": 10, "ttl": 60})
    time.sleep(1.1)
    assert [codec.expire_reservations(client, settings, keys) for _ in range(3)] == [3, 3, 0]
    assert funds(client, settings) == (1000, 10)
    assert client.zcard(keys.expiries) == 1


def test_a_worker_sweeps_expired_reservations_of_idle_accounts(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    producer.reserve({"request_id": "idle", "account": "account1", "amount": 60, "ttl": 1})
    time.sleep(1.1)
    drain(settings)  # a burst worker runs its maintenance first
    assert funds(client, settings) == (100, 0)


@BOTH_BACKENDS
def test_expired_reservations_are_released_exactly_once_when_sweeps_and_commits_race(client, settings):
    """Commits aimed at the moment of expiry race each other's lazy release and the sweep:
    each reservation ends exactly once, committed (charged its use) or released (charged
    nothing), and no release is applied twice (the held total would go below the sum of
    the open reservations)."""
    codec.set_balances(client, settings, [("account1", 10_000)])
    keys = keys_of("account1", settings)
    producer = Producer(client, settings)
    made = [producer.reserve({"request_id": f"race-{i}", "account": "account1", "amount": 100, "ttl": 1})
            for i in range(40)]
    expiry = made[0].expires_at / 1000
    start = threading.Barrier(48)

    def commit(i):
        own = Producer(connect(settings, load=False), settings)
        start.wait()
        time.sleep(max(0.0, expiry - time.time() - 0.05) + i * 0.003)  # straddle the expiry
        return own.commit({"request_id": f"commit-{i}", "reservation": f"account1/race-{i}", "amount": 60})

    def sweep(_):
        own = connect(settings, load=False)
        start.wait()
        released = 0
        while time.time() < expiry + 0.3:
            released += codec.expire_reservations(own, settings.model_copy(update={"sweep_batch": 2}), keys)
        return released

    with ThreadPoolExecutor(48) as pool:
        committing, sweeping = pool.map(commit, range(40)), pool.map(sweep, range(8))  # all 48 start together
        commits, swept = list(committing), sum(sweeping)

    approved = [o for o in commits if o.approved]
    assert {o.reason for o in commits if not o.approved} <= {"reservation_expired", "unknown_reservation"}
    assert all(o.charged == 60 for o in approved)
    assert swept <= 40 - len(approved)
    assert funds(client, settings) == (10_000 - 60 * len(approved), 0)
    assert open_reservations(client, settings) == 0 and client.zcard(keys.expiries) == 0
    report = audit(client, settings, {"account1": 10_000})
    assert report.ok and report.held == 0


# ---- concurrency --------------------------------------------------------------------------

@BOTH_BACKENDS
def test_concurrent_sessions_and_charges_on_one_account_never_overdraw_or_overcharge(client, settings):
    """60 callers at once on an account of 1,000: sessions (reserve 100, then commit a part
    or release), through the stream and synchronously, and plain charges of 50. Every
    outcome shows available funds >= 0, nothing is charged beyond what was committed, and
    the money adds up."""
    codec.set_balances(client, settings, [("account1", 1000)])
    start = threading.Barrier(60)

    def caller(i):
        producer = Producer(connect(settings, load=False), settings)
        rng = random.Random(i)
        start.wait()
        if i % 3 == 0:
            return [producer.authorize({"request_id": f"plain-{i}", "account": "account1", "amount": 50})]
        used = rng.choice([0, rng.randint(1, 100)])
        session = []
        settle = (lambda data: producer.charge(data, timeout=60)) if i % 3 == 1 else producer.authorize
        session.append(settle({"op": "reserve", "request_id": f"s-{i}", "account": "account1", "amount": 100}))
        if session[0].approved:
            end = {"request_id": f"s-{i}.end", "reservation": f"account1/s-{i}"}
            session.append(settle({**end, "op": "commit", "amount": used} if used else {**end, "op": "release"}))
        return session

    with running_workers(settings), ThreadPoolExecutor(60) as pool:
        outcomes = [o for batch in pool.map(caller, range(60)) for o in batch]

    for o in outcomes:
        assert o.available is None or o.available >= 0, o
        assert o.balance >= 0
    reserves = [o for o in outcomes if o.op == "reserve"]
    commits = [o for o in outcomes if o.op == "commit"]
    charges = [o for o in outcomes if o.op is None]
    assert any(not o.approved for o in reserves + charges)  # the account did run short
    assert all(o.approved and o.charged <= o.reserved for o in commits)
    assert all(o.approved for o in outcomes if o.op in ("commit", "release"))
    spent = sum(o.charged for o in commits + charges if o.approved)
    assert funds(client, settings) == (1000 - spent, 0)
    report = audit(client, settings, {"account1": 1000}, [o.request_id for o in outcomes])
    assert report.ok, report.as_dict()


def test_run_session_plays_reserve_extends_commit_and_caps_use_at_what_was_granted(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 550)])
    outcomes = run_session(producer, "account1", "voice", 60, extends=[30, 30], used=100, session_id="call-9")
    assert [(o.op, o.status, o.reason) for o in outcomes] == [
        ("reserve", "approved", ""), ("extend", "approved", ""), ("extend", "rejected", "insufficient_funds"),
        ("commit", "approved", "")]
    assert outcomes[-1].charged == 90 * 5  # 100 s asked, 90 s granted
    assert run_session(producer, "account1", "voice", 60, session_id="call-9")[0].duplicate
    assert funds(client, settings) == (100, 0)


def test_run_session_through_the_stream(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 600)])
    with running_workers(settings, 1):
        outcomes = run_session(producer, "account1", "data", 5, extends=[5], used=0, via_stream=True, timeout=30)
    assert [(o.op, o.status) for o in outcomes] == [("reserve", "approved"), ("extend", "approved"),
                                                   ("release", "approved")]
    assert funds(client, settings) == (600, 0)


# ---- the checker and the command line ------------------------------------------------------

def test_audit_reports_held_funds_that_do_not_match_the_open_reservations(client, settings, producer):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("a1", 100), ("a2", 100)])
    producer.reserve({"request_id": "h", "account": "a1", "amount": 40})
    assert audit(client, settings, {"a1": 100}).ok
    client.hincrby(keys.held, "a1", -40)  # a release applied twice, simulated from outside
    client.hset(keys.held, "a2", 150)  # more held than the balance, and no reservation behind it
    report = audit(client, settings, {"a1": 100, "a2": 100})
    assert not report.ok
    assert report.held_mismatch == {"a1": (0, 40), "a2": (150, 0)}
    assert report.negative_available == {"a2": -50}


def test_audit_reports_a_commit_that_charged_more_than_was_reserved(client, settings):
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("a1", 100)])
    client.xadd(keys.results, {"request_id": "c", "account": "a1", "status": "approved", "reason": "", "charged": 70,
                               "balance": 30, "duplicate": 0, "submitted_at": "", "processed_at": 1, "entry_id": "",
                               "op": "commit", "reservation": "a1/r", "held": 0, "reserved": 50, "expires_at": 2})
    assert audit(client, settings, {}).overcommitted == ["c"]


def test_cli_reserve_extend_commit_release_and_accounts_show(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "1000")
    reserved = cli(settings, "reserve", "--account", "account1", "--service", "voice", "--units", "60", "--ttl", "120",
                   "--request-id", "call-1", "--json")
    assert reserved.returncode == 0, reserved.stderr
    assert json.loads(reserved.stdout) | {"processed_at": 0, "submitted_at": 0, "expires_at": 0} == {
        "request_id": "call-1", "account": "account1", "status": "approved", "reason": "", "charged": 0,
        "balance": 1000, "duplicate": False, "submitted_at": 0, "processed_at": 0, "op": "reserve",
        "reservation": "account1/call-1", "held": 300, "available": 700, "reserved": 300, "expires_at": 0}
    assert cli(settings, "extend", "--reservation", "account1/call-1", "--units", "30").returncode == 0
    shown = json.loads(cli(settings, "accounts", "show", "account1", "--json").stdout)
    assert shown == {"account": "account1", "balance": 1000, "held": 450, "available": 550, "plan": "default",
                     "lots": [], "breakage": {}}
    human = cli(settings, "commit", "--reservation", "account1/call-1", "--units", "42", "--request-id", "c-1")
    assert human.returncode == 0 and "charged=210 balance=790" in human.stdout, human.stdout
    assert "commit account1/call-1: reserved=450" in human.stdout
    closed = cli(settings, "release", "--reservation", "account1/call-1")
    assert closed.returncode == 1 and "unknown_reservation" in closed.stdout
    for args, reason in ((["commit", "--reservation", "account1"], "invalid_reservation"),
                         (["commit", "--reservation", "account1/x"], "missing_field"),
                         (["extend", "--reservation", "account1/x", "--units", "1.5"], "invalid_units"),
                         (["reserve", "--account", "account1", "--amount", "5", "--ttl", "0"], "invalid_ttl"),
                         (["reserve", "--account", "account1", "--amount", "5", "--ttl", "86401"], "invalid_ttl")):
        bad = cli(settings, *args)
        assert bad.returncode == 2 and reason in bad.stderr, (args, bad.stderr)
    assert json.loads(cli(settings, "accounts", "show", "account1", "--json").stdout)["balance"] == 790


def test_a_call_in_the_layout_of_an_older_version_changes_nothing_and_leaves_its_entry_pending(client, settings):
    """During an upgrade a worker of the previous version may still call charge with its
    4 or 5 keys: refused before the ack, so an upgraded worker settles the entry later."""
    keys = Keys(settings.namespace, 0)
    codec.set_balances(client, settings, [("account1", 100)])
    client.xgroup_create(keys.requests, settings.group, id="0", mkstream=True)
    entry_id = client.xadd(keys.requests, {"request_id": "old", "account": "account1", "amount": "5"})
    client.xreadgroup(settings.group, "old-version", {keys.requests: ">"})
    with pytest.raises(redis.ResponseError, match="wrong_arguments"):
        client.fcall("charge", 4, keys.balances, f"{keys.tag}:seen:old", keys.results, keys.requests,
                     "old", "account1", 5, "account1|amount|5", entry_id, settings.group, 60_000, "", 300_000)
    assert client.xpending(keys.requests, settings.group)["pending"] == 1
    drain(settings)  # an upgraded worker reclaims and settles it
    assert funds(client, settings) == (95, 0)


def test_the_worker_counts_reservation_operations_and_swept_expiries(client, settings, producer):
    from prometheus_client import REGISTRY

    def count(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    ops = "charging_reservation_operations_total"
    keys = [("reserve", "approved"), ("reserve", "insufficient_funds"), ("reserve", "duplicate"),
            ("commit", "unknown_reservation")]
    before = {k: count(ops, op=k[0], result=k[1]) for k in keys}
    before_charges = count("charging_charges_approved_total")
    before_expired = count("charging_reservations_expired_total")
    codec.set_balances(client, settings, [("account1", 100)])
    producer.reserve({"request_id": "expiring", "account": "account1", "amount": 10, "ttl": 1})
    time.sleep(1.1)
    producer.submit([{"op": "reserve", "request_id": "m1", "account": "account1", "amount": 60},
                     {"op": "reserve", "request_id": "m2", "account": "account1", "amount": 60},
                     {"op": "reserve", "request_id": "m1", "account": "account1", "amount": 60},
                     {"op": "commit", "reservation": "account1/none", "amount": 1}])
    drain(settings)  # maintenance sweeps "expiring" before the batch is read
    assert {k: count(ops, op=k[0], result=k[1]) - before[k] for k in keys} == dict.fromkeys(keys, 1.0)
    assert count("charging_reservations_expired_total") - before_expired == 1
    assert count("charging_charges_approved_total") == before_charges
