"""The producer library for upstream systems and backends: submit charges and reservation
operations to the request streams (fire-and-forget, or wait for the outcome), or settle
them synchronously. Producer runs on redis.Redis, AsyncProducer on redis.asyncio; both run
the same plans (producer/requests.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable
from typing import Any

from charging.connection import AsyncClient, Client
from charging.plan import Plan, Step, run, run_async
from charging.schema import Outcome
from charging.settings import Settings
from producer.requests import Request, Requests


class Producer(Requests[Client, Outcome]):
    """Producer(connect(settings), settings). Give each thread a producer of its own, on
    the process's one client (its pool is thread-safe)."""

    def submit(self, requests: Iterable[Request], reply: bool = False) -> list[str]:
        """Append requests to their partitions' request streams (fire and forget), one round
        trip per 1,000; their request ids. Validates every request first: an invalid one
        raises Invalid and nothing is written; a full backlog raises BacklogFull.
        reply=True: the outcomes also go to this producer's reply streams, for wait()."""
        return run(self.client, self._submitting(requests, reply))

    def wait(self, request_ids: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome]:
        """Outcomes of requests this producer submitted with reply=True, by request id.
        Raises WaitTimeout naming the ones still missing after timeout seconds."""
        return run(self.client, self._waiting(request_ids, timeout))

    def _settle(self, plan: Plan[Outcome]) -> Outcome:
        return run(self.client, plan)


class AsyncProducer(Requests[AsyncClient, Coroutine[Any, Any, Outcome]]):
    """Producer for asyncio: AsyncProducer(await connect_async(settings), settings), the
    same methods as Producer as coroutines. Many calls may run at once on one producer:
    concurrent waits share one reader of the reply streams instead of a connection each."""

    def __init__(self, client: AsyncClient, settings: Settings, producer_id: str | None = None):
        super().__init__(client, settings, producer_id)
        self._read: asyncio.Event | None = None  # set when the reading waiter has stored what it read

    async def submit(self, requests: Iterable[Request], reply: bool = False) -> list[str]:
        """Producer.submit."""
        return await run_async(self.client, self._submitting(requests, reply))

    async def wait(self, request_ids: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome]:
        """Producer.wait."""
        return await run_async(self.client, self._waiting(request_ids, timeout))

    def _settle(self, plan: Plan[Outcome]) -> Coroutine[Any, Any, Outcome]:
        return run_async(self.client, plan)

    def _arrival(self, timeout: float) -> Step:
        if self._read is None:
            self._read = asyncio.Event()
        read = self._read

        async def arrival(_client: object) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read.wait(), timeout)
        return arrival

    def _arrived(self) -> None:
        if self._read is not None:
            self._read.set()
            self._read = None
