"""Subscribers of the results streams, at least once: an outcome is acked only after its
handler returned, a member re-reads its own pending outcomes first, and the outcomes of a
member that died are taken over by another. Nothing is lost, whatever stops a member."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from charging import codec
from charging.connection import connect, connect_async
from charging.keys import all_partitions
from producer import AsyncSubscriber, Outcome, Producer, Subscriber
from tests.conftest import BOTH_BACKENDS, CHARGING, cli, environment


def settled(client, settings, n: int, prefix: str = "o") -> list[str]:
    """n outcomes on the results streams (authorize posts one each); their request ids."""
    codec.set_balances(client, settings, [(f"account{i}", 10 * n) for i in range(1, 4)])
    producer = Producer(client, settings)
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, request_id in enumerate(ids):
        assert producer.authorize({"request_id": request_id, "account": f"account{1 + i % 3}", "amount": 1}).approved
    return ids


def pending(client, settings, group: str, consumer: str | None = None) -> list[str]:
    """Request ids of the outcomes pending in group (at consumer, if given)."""
    found = []
    for keys in all_partitions(settings.namespace, settings.partitions):
        entries = client.xpending_range(keys.results, group, min="-", max="+", count=10_000,
                                        **({"consumername": consumer} if consumer else {}))
        for entry in entries:
            [(_, fields)] = client.xrange(keys.results, entry["message_id"], entry["message_id"])
            found.append(fields[b"request_id"].decode())
    return found


def test_results_group_with_count_then_without_shows_every_outcome_exactly_once_across_calls(settings):
    # Three partitions: one read may deliver from several streams, more than --count asks.
    settings = settings.model_copy(update={"partitions": 3, "namespace": settings.namespace + "p3"})
    client = connect(settings)
    ids = settled(client, settings, 12)

    printed = []
    for args in (["--count", "1"], ["--count", "4"], ["--count", "2"], []):
        done = cli(settings, "results", "--group", "billing", "--json", *args)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line)["request_id"] for line in done.stdout.splitlines()]
        assert len(lines) == (int(args[1]) if args else 12 - 7)
        printed += lines
    again = cli(settings, "results", "--group", "billing")

    assert sorted(printed) == sorted(ids), "every outcome once"
    assert again.returncode == 0 and again.stdout == ""
    assert pending(client, settings, "billing") == []


def test_results_group_from_now_skips_what_was_settled_before_the_group(client, settings):
    before = settled(client, settings, 3, "before")
    first = cli(settings, "results", "--group", "live", "--from", "now")
    after = settled(client, settings, 2, "after")
    second = cli(settings, "results", "--group", "live", "--json")

    assert first.stdout == "" and before
    assert [json.loads(line)["request_id"] for line in second.stdout.splitlines()] == after


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_results_follow_stopped_by_a_signal_acks_what_it_printed_and_the_next_call_goes_on(client, settings, stop):
    first = settled(client, settings, 5, "first")
    follower = subprocess.Popen([CHARGING, "results", "--group", "billing", "--follow", "--json"], text=True,
                                stdout=subprocess.PIPE, env={**os.environ, **environment(settings)})
    printed: list[str] = []
    reading = threading.Thread(target=lambda: printed.extend(
        json.loads(follower.stdout.readline())["request_id"] for _ in first))
    reading.start()
    reading.join(timeout=60)
    follower.send_signal(stop)
    assert follower.wait(timeout=60) == 0
    later = settled(client, settings, 3, "later")
    second = cli(settings, "results", "--group", "billing", "--json")

    assert printed == first
    assert [json.loads(line)["request_id"] for line in second.stdout.splitlines()] == later
    assert pending(client, settings, "billing") == []


MEMBER = textwrap.dedent("""
    import sys, time
    from charging.connection import connect
    from charging.settings import Settings
    from producer import Subscriber

    settings = Settings()
    handled = open(sys.argv[1], "a")

    def handle(outcome):
        handled.write(outcome.request_id + "\\n")
        handled.flush()
        time.sleep(0.02)  # a slow handler: the kill lands in the middle of a batch

    Subscriber(connect(settings), settings, "billing", "member-a", batch=10).run(handle)
""")


@pytest.mark.slow
def test_subscriber_killed_mid_batch_loses_nothing_and_repeats_only_what_it_had_not_acked(client, settings, tmp_path):
    ids = settled(client, settings, 100)
    log = tmp_path / "member-a.txt"
    member = subprocess.Popen([sys.executable, "-c", MEMBER, str(log)], env={**os.environ, **environment(settings)})
    try:
        deadline = time.monotonic() + 60
        while len(log.read_text().splitlines() if log.exists() else []) < 25:
            assert member.poll() is None and time.monotonic() < deadline, "member-a did not get going"
            time.sleep(0.01)
    finally:
        member.send_signal(signal.SIGKILL)
        member.wait()
    by_a = log.read_text().splitlines()
    unacked = pending(client, settings, "billing", "member-a")
    assert unacked, "the kill landed with outcomes in hand"

    by_b: list[str] = []
    other = Subscriber(client, settings, "billing", "member-b", claim_idle_ms=200, claim_interval_s=0.1)

    def handle(outcome: Outcome) -> None:
        by_b.append(outcome.request_id)
        if set(by_a) | set(by_b) >= set(ids):
            other.stop()

    taking_over = threading.Thread(target=other.run, args=(handle,))
    taking_over.start()
    taking_over.join(timeout=60)
    other.stop()
    taking_over.join()

    assert set(by_a) | set(by_b) == set(ids), "none lost"
    assert len(by_b) == len(set(by_b)), "member-b handled each once"
    assert set(by_a) & set(by_b) <= set(unacked), "twice only what member-a had not acked"
    assert pending(client, settings, "billing") == []


@BOTH_BACKENDS
def test_a_handler_that_raises_leaves_its_outcome_and_the_rest_for_the_next_run(client, settings):
    ids = settled(client, settings, 10)
    handled: list[str] = []

    def fail_on_the_fourth(outcome: Outcome) -> None:
        if len(handled) == 3:
            raise RuntimeError("handler failed")
        handled.append(outcome.request_id)

    with pytest.raises(RuntimeError):
        Subscriber(client, settings, "billing", "m1").run(fail_on_the_fourth, follow=False)
    assert len(handled) == 3
    assert sorted(pending(client, settings, "billing", "m1")) == sorted(set(ids) - set(handled))

    Subscriber(client, settings, "billing", "m1").run(lambda o: handled.append(o.request_id), follow=False)
    assert sorted(handled) == sorted(ids)
    assert pending(client, settings, "billing") == []


@BOTH_BACKENDS
def test_async_subscriber_hands_each_outcome_once_to_an_async_batch_handler(client, settings):
    ids = settled(client, settings, 30)
    batches: list[list[str]] = []

    async def handle(outcomes: list[Outcome]) -> None:
        await asyncio.sleep(0)
        batches.append([o.request_id for o in outcomes])

    async def main() -> tuple[int, int]:
        aclient = await connect_async(settings)
        try:
            subscriber = AsyncSubscriber(aclient, settings, "audit", "a1", batch=8)
            first = await subscriber.run_batches(handle, follow=False)
            second = await subscriber.run_batches(handle, follow=False)
            return first, second
        finally:
            await aclient.aclose()

    first, second = asyncio.run(main())

    assert (first, second) == (30, 0)
    assert all(len(batch) <= 8 for batch in batches)
    assert sorted(rid for batch in batches for rid in batch) == sorted(ids)
    assert pending(client, settings, "audit") == []
