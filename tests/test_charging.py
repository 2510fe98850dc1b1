"""The money guarantees: no overdraft under concurrency, one charge per request id, and the
same outcome whichever path (stream or authorize) a request takes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from charging import codec
from charging.app import accounts
from charging.app.audit import audit
from charging.connection import connect
from charging.keys import partition_of
from producer import Producer
from tests.conftest import BOTH_BACKENDS, drain, results


def voice(request_id: str, account: str = "account1", units: int = 2) -> dict:
    return {"request_id": request_id, "account": account, "service": "voice", "units": units}


pytestmark = BOTH_BACKENDS


def balance(client, settings, account="account1") -> int:
    return accounts.balance(client, settings, account)


def at_once(settings, callers: int, call) -> list:
    """call(producer, i) from callers threads, each with its own connection, released together."""
    start = threading.Barrier(callers)

    def one(i):
        producer = Producer(connect(settings, load=False), settings)
        start.wait()
        return call(producer, i)

    with ThreadPoolExecutor(callers) as pool:
        return list(pool.map(one, range(callers)))


def test_forty_concurrent_voice_charges_through_workers_approve_exactly_ten(client, settings):
    codec.set_balances(client, settings, [("account1", 100)])
    at_once(settings, 40, lambda producer, i: producer.submit([voice(f"w-{i}")]))
    drain(settings, consumers=4)

    outcomes = results(client, settings)
    assert len(outcomes) == 40
    assert sum(o["status"] == "approved" for o in outcomes) == 10
    assert {o["reason"] for o in outcomes if o["status"] == "rejected"} == {"insufficient_funds"}
    assert min(int(o["balance"]) for o in outcomes) == 0
    assert balance(client, settings) == 0


def test_forty_concurrent_authorize_calls_approve_exactly_ten(client, settings):
    codec.set_balances(client, settings, [("account1", 100)])
    outcomes = at_once(settings, 40, lambda producer, i: producer.authorize(voice(f"a-{i}")))

    assert sum(o.approved for o in outcomes) == 10
    assert all(o.balance >= 0 for o in outcomes)
    assert sorted(o.balance for o in outcomes if o.approved) == list(range(0, 100, 10))
    assert balance(client, settings) == 0


def test_workers_and_authorize_at_once_share_one_balance_without_overdraft(client, settings):
    codec.set_balances(client, settings, [("account1", 100)])
    workers = []

    def run_worker(i):
        from worker.loop import Worker

        w = Worker(connect(settings), settings, f"both-{i}")
        workers.append(w)
        w.run()

    threads = [threading.Thread(target=run_worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    def one(producer, i):
        if i % 2:
            return producer.authorize(voice(f"both-a-{i}"))
        return producer.charge(voice(f"both-s-{i}"), timeout=30)

    try:
        outcomes = at_once(settings, 50, one)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(10)

    assert sum(o.approved for o in outcomes) == 10
    assert balance(client, settings) == 0
    assert len(results(client, settings)) == 50


def test_same_request_id_submitted_three_times_is_charged_once(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    for _ in range(3):
        producer.submit([voice("same-id")])
    drain(settings)

    outcomes = results(client, settings)
    assert [(o["status"], o["charged"], o["duplicate"]) for o in outcomes] == [
        ("approved", "10", "0"), ("approved", "10", "1"), ("approved", "10", "1")]
    assert balance(client, settings) == 90


def test_replayed_request_id_through_authorize_returns_stored_outcome(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    first = producer.authorize(voice("auth-replay"))
    again = producer.authorize(voice("auth-replay"))
    assert (first.status, first.charged, first.duplicate) == ("approved", 10, False)
    assert (again.status, again.charged, again.balance, again.duplicate) == ("approved", 10, 90, True)
    assert balance(client, settings) == 90


def test_replayed_request_id_with_different_content_is_a_conflict_and_charges_nothing(client, settings, producer):
    # Request ids are scoped to a partition (docs/wire-format.md): the other account shares account1's.
    other = next(a for a in (f"account{i}" for i in range(2, 1000))
                 if partition_of(a, settings.partitions) == partition_of("account1", settings.partitions))
    codec.set_balances(client, settings, [("account1", 100), (other, 100)])
    producer.authorize(voice("conflict"))
    for changed in (voice("conflict", units=3), voice("conflict", account=other),
                    {"request_id": "conflict", "account": "account1", "amount": 10}):
        outcome = producer.authorize(changed)
        assert (outcome.status, outcome.reason, outcome.charged) == ("rejected", "idempotency_conflict", 0)
    assert balance(client, settings) == 90
    assert balance(client, settings, other) == 100


def test_stored_rejection_is_returned_on_replay_even_after_a_top_up(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 5)])
    assert producer.authorize(voice("poor")).reason == "insufficient_funds"
    codec.top_up(client, settings, "account1", 100)
    replay = producer.authorize(voice("poor"))
    assert (replay.status, replay.reason, replay.duplicate) == ("rejected", "insufficient_funds", True)
    assert producer.authorize(voice("poor-retry")).approved  # a new judgement needs a new request id
    assert balance(client, settings) == 95


def test_unknown_account_is_rejected_with_reason(client, settings, producer):
    outcome = producer.authorize(voice("nobody", account="nobody"))
    assert (outcome.status, outcome.reason, outcome.charged) == ("rejected", "unknown_account", 0)
    assert "nobody" not in dict(accounts.all_balances(client, settings))


def test_explicit_amount_is_charged_as_given(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    outcome = producer.authorize({"request_id": "amt", "account": "account1", "amount": 37})
    assert (outcome.charged, outcome.balance) == (37, 63)


def test_producer_waits_for_its_own_outcome_through_the_reply_stream(client, settings, producer):
    codec.set_balances(client, settings, [("account1", 100)])
    ids = producer.submit([voice(f"wait-{i}") for i in range(3)], reply=True)
    drain(settings)
    outcomes = producer.wait(ids, timeout=5)
    assert [outcomes[i].balance for i in ids] == [90, 80, 70]
    assert all(o.submitted_at for o in outcomes.values())


def test_stalled_worker_settling_an_entry_already_settled_by_another_changes_nothing(client, settings):
    """A worker whose wait read an entry, stalled, and woke after the entry was reclaimed
    and settled by another consumer: its late pump call finds nothing of its own and
    changes nothing."""
    from worker.loop import Worker

    codec.set_balances(client, settings, [("account1", 100)])
    Producer(client, settings).submit([voice("stall-1")])
    stalled = Worker(connect(settings), settings, "stalled")
    stalled.ensure_groups()
    stalled.wait()  # read, then "stall" before settling
    assert stalled.waited
    drain(settings, prefix="rescuer")  # reclaims after reclaim_idle_ms and settles
    assert not stalled.pump_round()  # wakes up

    assert balance(client, settings) == 90
    assert len(results(client, settings)) == 1
    assert audit(client, settings, {}).pending == 0


def test_a_replay_returns_a_balance_of_fifteen_digits_exactly(client, settings, producer):
    """Dedupe records are written with every digit (Lua's own number formatting keeps 14)."""
    codec.set_balances(client, settings, [("account1", 10**15 - 1)])
    first = producer.authorize({"request_id": "big", "account": "account1", "amount": 2})
    again = producer.authorize({"request_id": "big", "account": "account1", "amount": 2})
    assert (first.balance, again.balance, again.duplicate) == (10**15 - 3, 10**15 - 3, True)
