"""Subscribers of the outcomes: a consumer group over the results streams of every
partition (or over reply streams), each outcome handed to a handler and acked only after
the handler returned.

At least once: an outcome is acked after its handler returned, so none is lost whatever
stops a member (Ctrl-C, a crash, SIGKILL, a lost connection), and one may be handled twice:
a member that dies after its handler ran but before the ack leaves the outcome pending, and
it is handled again, by the same member when it restarts (it re-reads its own pending
outcomes first) or by another member of the group (which takes over outcomes idle longer
than claim_idle_ms). Make handlers idempotent by request_id.

Subscriber runs on redis.Redis, AsyncSubscriber on redis.asyncio; both run the same plan
(charging/plan.py). outcomes() reads without a group (nothing acked, nothing promised)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, Literal, TypeVar

from charging.connection import AsyncClient, Client
from charging.keys import all_partitions
from charging.log import logger
from charging.plan import Plan, run, run_async
from charging.schema import Outcome
from charging.settings import Settings
from charging.streams import autoclaim, ensure_group, read_streams, text

log = logger("charging.subscriber")

Handler = Callable[[Outcome], object]
BatchHandler = Callable[[list[Outcome]], object]
Start = Literal["start", "now"]
Message = tuple[bytes, dict[bytes, bytes] | None]


def results_streams(settings: Settings) -> list[str]:
    return [k.results for k in all_partitions(settings.namespace, settings.partitions)]


C = TypeVar("C")  # the client: redis.Redis (or RedisCluster), or a redis.asyncio one


class Subscription(Generic[C]):
    """What Subscriber and AsyncSubscriber share: the group, this member, and the plan.

    group: the consumer group; it is made on first use, reading from the oldest outcome
    the streams hold (start="start") or only from outcomes settled after it (start="now").
    An existing group goes on where it stopped. Name it in CHARGING_RESULTS_GROUPS, so the
    workers never trim an outcome it has not acked.
    consumer: this member's name, stable across restarts so a restarted member finds its
    own pending outcomes (default: the host name). Each running member needs its own.
    streams: the streams to read (default: the results stream of every partition).
    claim_idle_ms: take over outcomes pending longer than this at another member (default
    CHARGING_RECLAIM_IDLE_MS); longer than a handler ever takes, or live members' outcomes
    are handled twice. Looked for every claim_interval_s (default
    CHARGING_MAINTENANCE_INTERVAL_S).
    batch: outcomes per read; block_ms: how long a read waits (default CHARGING_BLOCK_MS),
    so how long stop() may take."""

    def __init__(self, client: C, settings: Settings, group: str, consumer: str | None = None, *,
                 streams: Sequence[str] | None = None, start: Start = "start", claim_idle_ms: int | None = None,
                 claim_interval_s: float | None = None, batch: int = 100, block_ms: int | None = None):
        self.client = client
        self.group = group
        self.consumer = consumer or socket.gethostname()
        self.streams = list(streams) if streams else results_streams(settings)
        self.start = {"start": "0", "now": "$"}[start]
        self.claim_idle_ms = settings.reclaim_idle_ms if claim_idle_ms is None else claim_idle_ms
        self.claim_interval_s = settings.maintenance_interval_s if claim_interval_s is None else claim_interval_s
        self.batch = batch
        self.block_ms = settings.block_ms if block_ms is None else block_ms
        self.stopping = False
        self.handled = 0

    def stop(self) -> None:
        """Stop after the outcomes in hand (callable from a signal handler or a handler)."""
        self.stopping = True

    def _subscribing(self, handler: Callable[[Any], object], each: bool, limit: int | None,
                     follow: bool) -> Plan[int]:
        """Own pending outcomes first, then outcomes other members left idle, then new ones,
        until limit outcomes were handled, stop(), or (follow=False) nothing is left."""
        self.stopping, self.handled = False, 0
        for stream in self.streams:
            yield from ensure_group(stream, self.group, self.start)
        for stream in self.streams:
            yield from self._own_pending(stream, handler, each, limit)
        next_claim = 0.0
        while self._room(limit):
            if time.monotonic() >= next_claim:
                for stream in self.streams:
                    yield from autoclaim(stream, self.group, self.consumer, self.claim_idle_ms, self._count(limit),
                                         lambda messages, deleted: self._claimed(stream, messages, deleted, handler,
                                                                                 each, limit))
                next_claim = time.monotonic() + self.claim_interval_s
            if not self._room(limit):
                break
            found = yield from read_streams({s: ">" for s in self.streams}, self._count(limit),
                                            self.block_ms if follow else None, self.group, self.consumer)
            for stream, messages in found:
                yield from self._deliver(text(stream), messages, handler, each, limit)
            if not found and not follow:
                break
        return self.handled

    def _own_pending(self, stream: str, handler: Callable[[Any], object], each: bool,
                     limit: int | None) -> Plan[None]:
        """Outcomes delivered to this member before (it stopped, crashed or lost the
        connection before their ack): XREADGROUP from id 0 returns them, oldest first."""
        after = "0"
        while self._room(limit):
            found = yield lambda client: client.xreadgroup(self.group, self.consumer, {stream: after},
                                                           count=self._count(limit))
            messages = [message for _, messages in found or [] for message in messages]
            if not messages:
                return
            yield from self._deliver(stream, messages, handler, each, limit)
            after = text(messages[-1][0])

    def _claimed(self, stream: str, messages: list[Message], deleted: list[bytes], handler: Callable[[Any], object],
                 each: bool, limit: int | None) -> Plan[bool]:
        for entry_id in deleted:
            log.warning("outcome_trimmed", stream=stream, group=self.group, entry_id=text(entry_id))
        yield from self._deliver(stream, messages, handler, each, limit)
        return self._room(limit)

    def _deliver(self, stream: str, messages: list[Message], handler: Callable[[Any], object], each: bool,
                 limit: int | None) -> Plan[None]:
        """Hand the outcomes to the handler, then ack what it finished, even when it (or a
        Ctrl-C) raised half way: the rest stay pending, for this member's next start. Past
        the limit, outcomes stay pending unread."""
        if limit is not None:
            messages = messages[:limit - self.handled]
        done, ready = [], []
        for entry_id, fields in messages:
            if fields:
                ready.append((entry_id, Outcome.from_fields(fields)))
            else:  # deleted or trimmed while pending: nothing left to hand over
                log.warning("outcome_trimmed", stream=stream, group=self.group, entry_id=text(entry_id))
                done.append(entry_id)
        try:
            if each:
                for entry_id, outcome in ready:
                    yield lambda _client: handler(outcome)
                    done.append(entry_id)
                    self.handled += 1
            elif ready:
                yield lambda _client: handler([outcome for _, outcome in ready])
                done += [entry_id for entry_id, _ in ready]
                self.handled += len(ready)
        finally:
            if done:
                yield lambda client: client.xack(stream, self.group, *done)

    def _room(self, limit: int | None) -> bool:
        return not self.stopping and (limit is None or self.handled < limit)

    def _count(self, limit: int | None) -> int:
        return self.batch if limit is None else max(1, min(self.batch, limit - self.handled))


class Subscriber(Subscription[Client]):
    """Subscriber(connect(settings), settings, group): run(handler) hands each outcome to
    handler(outcome) and acks it after the handler returned (see the module's notes on at
    least once)."""

    def run(self, handler: Handler, *, limit: int | None = None, follow: bool = True) -> int:
        """handler(outcome) for each outcome, until stop(), limit outcomes, or (follow=False)
        none is left. An exception of the handler stops the run and is raised here; that
        outcome and the rest of the batch stay pending and come first at the next run.
        Returns how many outcomes were handled."""
        return run(self.client, self._subscribing(handler, True, limit, follow))

    def run_batches(self, handler: BatchHandler, *, limit: int | None = None, follow: bool = True) -> int:
        """run(), with handler(outcomes) called once per read (up to batch outcomes of one
        stream), all acked after it returned, none if it raised."""
        return run(self.client, self._subscribing(handler, False, limit, follow))


class AsyncSubscriber(Subscription[AsyncClient]):
    """Subscriber for asyncio: AsyncSubscriber(await connect_async(settings), settings,
    group); handlers may be coroutine functions (awaited) or plain ones."""

    async def run(self, handler: Handler, *, limit: int | None = None, follow: bool = True) -> int:
        """Subscriber.run."""
        return await run_async(self.client, self._subscribing(handler, True, limit, follow))

    async def run_batches(self, handler: BatchHandler, *, limit: int | None = None, follow: bool = True) -> int:
        """Subscriber.run_batches."""
        return await run_async(self.client, self._subscribing(handler, False, limit, follow))


def outcomes(client: Client, settings: Settings, follow: bool = False, start: Start = "start",
             limit: int | None = None) -> Iterator[Outcome]:
    """Read the results streams without a group: from the oldest outcome they hold (or
    only later ones, start="now"), then (follow) as they come. Nothing is acked."""
    last = {s: _newest_id(client, s) if start == "now" else "0-0" for s in results_streams(settings)}
    seen = 0
    while limit is None or seen < limit:
        found = run(client, read_streams(last, 1000, 1000 if follow else None))
        if not found and not follow:
            return
        for stream, messages in found:
            for entry_id, fields in messages:
                last[text(stream)] = text(entry_id)
                yield Outcome.from_fields(fields)
                seen += 1
                if seen == limit:
                    return


def _newest_id(client: Client, stream: str) -> str:
    """The id of the newest entry of stream ('0-0' when empty): reading after it gets only
    later entries, also when read again and again (as '$' would not)."""
    newest = client.xrevrange(stream, count=1)
    return text(newest[0][0]) if newest else "0-0"
