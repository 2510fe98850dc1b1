"""AsyncProducer on redis.asyncio: the same guarantees as Producer, many calls at once in
one event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from charging import codec
from charging.app import accounts
from charging.connection import connect_async
from producer import AsyncProducer, Invalid, Outcome, WaitTimeout
from tests.conftest import BOTH_BACKENDS, worker_running

pytestmark = BOTH_BACKENDS


def with_producer(settings, use: Callable[[AsyncProducer], Awaitable[Any]]) -> Any:
    """asyncio.run(use(producer)) on a client of its own, closed at the end."""
    async def main() -> Any:
        client = await connect_async(settings)
        try:
            return await use(AsyncProducer(client, settings))
        finally:
            await client.aclose()
    return asyncio.run(main())


def one_each(n: int, account: str = "account1") -> list[dict]:
    return [{"request_id": f"c-{i}", "account": account, "amount": 1} for i in range(n)]


def test_two_hundred_concurrent_async_charges_on_an_account_of_100_approve_exactly_100(client, settings):
    codec.set_balances(client, settings, [("account1", 100)])

    async def charge_all(producer: AsyncProducer) -> list[Outcome]:
        return await asyncio.gather(*(producer.charge(data, timeout=60) for data in one_each(200)))

    with worker_running(settings):
        outcomes = with_producer(settings, charge_all)

    assert sorted(o.request_id for o in outcomes) == sorted(d["request_id"] for d in one_each(200))
    assert sum(o.approved for o in outcomes) == 100
    assert {o.reason for o in outcomes if not o.approved} == {"insufficient_funds"}
    assert accounts.balance(client, settings, "account1") == 0


def test_two_hundred_concurrent_async_authorize_calls_approve_exactly_100(client, settings):
    codec.set_balances(client, settings, [("account1", 100)])

    async def authorize_all(producer: AsyncProducer) -> list[Outcome]:
        return await asyncio.gather(*(producer.authorize(data) for data in one_each(200)))

    outcomes = with_producer(settings, authorize_all)

    assert sum(o.approved for o in outcomes) == 100
    assert accounts.balance(client, settings, "account1") == 0


def test_async_session_reserve_extend_commit_charges_what_was_used(client, settings):
    codec.set_balances(client, settings, [("account1", 1000)])

    async def session(producer: AsyncProducer) -> list[Outcome]:
        held = await producer.reserve({"account": "account1", "service": "voice", "units": 60, "request_id": "s1"})
        more = await producer.extend({"reservation": held.reservation, "units": 30, "request_id": "s1.x"})
        done = await producer.commit({"reservation": held.reservation, "units": 42, "request_id": "s1.c"})
        return [held, more, done]

    held, more, done = with_producer(settings, session)

    assert (held.approved, more.approved, done.approved) == (True, True, True)
    assert (held.reserved, more.reserved, done.charged) == (300, 450, 210)
    assert accounts.funds(client, settings, "account1") == (790, 0)


def test_async_submit_then_wait_and_a_replay_is_a_duplicate(client, settings):
    codec.set_balances(client, settings, [("account1", 10)])

    async def twice(producer: AsyncProducer) -> list[Outcome]:
        ids = await producer.submit([{"request_id": "r1", "account": "account1", "amount": 3}], reply=True)
        first = (await producer.wait(ids, timeout=60))["r1"]
        again = await producer.charge({"request_id": "r1", "account": "account1", "amount": 3}, timeout=60)
        return [first, again]

    with worker_running(settings):
        first, again = with_producer(settings, twice)

    assert (first.approved, first.duplicate, again.approved, again.duplicate) == (True, False, True, True)
    assert accounts.balance(client, settings, "account1") == 7


def test_async_charge_without_a_worker_raises_wait_timeout_and_invalid_raises_before_writing(client, settings):
    codec.set_balances(client, settings, [("account1", 10)])

    async def attempts(producer: AsyncProducer) -> tuple[BaseException, BaseException]:
        with pytest.raises(WaitTimeout) as timeout:
            await producer.charge({"request_id": "late", "account": "account1", "amount": 1}, timeout=0.3)
        with pytest.raises(Invalid) as invalid:
            await producer.submit([{"request_id": "ok", "account": "account1", "amount": 1},
                                   {"request_id": "bad", "account": "account1", "amount": -1}])
        return timeout.value, invalid.value

    timeout, invalid = with_producer(settings, attempts)

    assert timeout.missing == ["late"]
    assert invalid.reason == "invalid_amount" and "request #1" in str(invalid)
    assert sum(client.xlen(k) for k in client.scan_iter(f"{settings.namespace}:*:requests")) == 1, "only 'late'"
