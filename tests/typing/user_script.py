"""A user's script of the library: tests/test_library.py checks it with mypy --strict."""

import asyncio

from charging.connection import connect, connect_async
from charging.settings import Settings
from producer import AsyncProducer, AsyncSubscriber, ChargingError, Outcome, Producer, Subscriber


def charge_one(settings: Settings) -> bool:
    producer = Producer(connect(settings), settings)
    ids: list[str] = producer.submit([{"account": "account1", "amount": 1}], reply=True)
    outcomes: dict[str, Outcome] = producer.wait(ids, timeout=5)
    outcome = producer.authorize({"account": "account1", "amount": 1})
    held = producer.reserve({"account": "account1", "amount": 5})
    assert held.reservation is not None
    producer.commit({"reservation": held.reservation, "amount": 2})
    return outcome.approved and all(o.approved for o in outcomes.values())


def follow(settings: Settings) -> int:
    def handle(outcome: Outcome) -> None:
        print(outcome.request_id, outcome.status, outcome.charged)

    return Subscriber(connect(settings), settings, "billing", "billing-1").run(handle, limit=10, follow=False)


async def charge_async(settings: Settings) -> int:
    client = await connect_async(settings)
    producer = AsyncProducer(client, settings)
    try:
        outcome = await producer.charge({"account": "account1", "service": "sms", "units": 1}, timeout=5)
        more = await asyncio.gather(*(producer.authorize({"account": "account1", "amount": 1}) for _ in range(3)))
    except ChargingError as exc:
        print(f"not charged: {exc}")
        return 0
    finally:
        await client.aclose()
    return outcome.charged + sum(o.charged for o in more)


async def follow_async(settings: Settings) -> int:
    async def handle(outcomes: list[Outcome]) -> None:
        await asyncio.sleep(0)

    subscriber = AsyncSubscriber(await connect_async(settings), settings, "audit")
    return await subscriber.run_batches(handle, follow=False)
