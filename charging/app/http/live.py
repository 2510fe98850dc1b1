"""The live page's feed: GET /v1/live streams a snapshot every second as Server-Sent
Events: charges settled per second, submit -> settle latency, and what `charging status`
shows (lag and pending per partition, dead letters by reason, open reservations, held
funds). One reader per gateway process, however many pages are open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from charging.app.http import metrics
from charging.app.http.access import Caller
from charging.app.http.endpoints import Endpoint
from charging.app.http.gateway import Gateway, check_every_account, log
from charging.app.http.outcomes import SSE_HEADERS
from charging.app.status import status_reading
from charging.keys import all_partitions
from charging.plan import Plan
from charging.schema import Outcome
from charging.streams import text

INTERVAL_S = 1.0
SAMPLE = 200  # newest outcomes per partition and interval that the latency is read from


class LiveFeed:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.listeners: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None
        self._added: int | None = None  # results ever added, all partitions, at the last snapshot
        self._at: float = 0.0
        self._newest: dict[str, str] = {}  # results stream -> newest id seen

    def listen(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        self.listeners.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return queue

    def leave(self, queue: asyncio.Queue) -> None:
        self.listeners.discard(queue)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self.listeners:
            snapshot = await self.snapshot()
            for queue in list(self.listeners):
                if queue.full():  # a slow page skips a snapshot rather than holding the others back
                    queue.get_nowait()
                queue.put_nowait(snapshot)
            await asyncio.sleep(INTERVAL_S)

    async def snapshot(self) -> dict[str, Any]:
        try:
            status = await self.gateway.run(status_reading(self.gateway.settings))
            added, latencies = await self.gateway.run(self._throughput())
        except Exception as exc:  # noqa: BLE001 - the page shows it and the feed goes on
            log.warning("live_snapshot_failed", error=str(exc))
            return {"at": _now_ms(), "error": getattr(exc, "detail", str(exc))}
        now = time.monotonic()
        rate = None if self._added is None else (added - self._added) / (now - self._at)
        self._added, self._at = added, now
        return {"at": _now_ms(), "settled_per_s": rate, "latency_ms": _percentiles(latencies), "status": status}

    def _throughput(self) -> Plan[tuple[int, list[int]]]:
        """Outcomes ever added to the results streams (XINFO STREAM entries-added, which
        trimming does not lower), and the submit -> settle times of the newest since the
        last snapshot."""
        settings = self.gateway.settings
        streams = [keys.results for keys in all_partitions(settings.namespace, settings.partitions)]

        def queue(pipe: Any) -> Any:
            for stream in streams:
                pipe.xinfo_stream(stream)
                pipe.xrevrange(stream, min="(" + self._newest[stream] if stream in self._newest else "-",
                               count=SAMPLE)
            return pipe.execute(raise_on_error=False)

        answers = iter((yield lambda client: queue(client.pipeline(transaction=False))))
        added, latencies = 0, []
        for stream, info, entries in zip(streams, answers, answers):  # two answers per stream
            if isinstance(info, Exception) or isinstance(entries, Exception):
                continue  # no results stream yet
            added += int(info.get("entries-added", info["length"]))
            first = stream not in self._newest
            if entries:
                self._newest[stream] = text(entries[0][0])
            if first:  # outcomes from before the page opened say nothing about now
                continue
            for _, fields in entries:
                outcome = Outcome.from_fields(fields)
                if outcome.submitted_at:
                    latencies.append(outcome.processed_at - outcome.submitted_at)
        return added, latencies


def _percentiles(values: list[int]) -> dict[str, Any] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pick(quantile: float) -> int:
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]
    return {"p50": pick(0.5), "p99": pick(0.99), "samples": len(ordered)}


def _now_ms() -> int:
    return int(time.time() * 1000)


async def live(request: Request, caller: Caller, gateway: Gateway) -> StreamingResponse:
    check_every_account(caller)
    return StreamingResponse(_snapshots(request.app.state.live), media_type="text/event-stream", headers=SSE_HEADERS)


async def _snapshots(feed: LiveFeed) -> AsyncIterator[str]:
    queue = feed.listen()
    metrics.STREAMS.inc()
    try:
        yield "retry: 2000\n\n"
        while True:
            snapshot = await queue.get()
            yield f"event: snapshot\ndata: {json.dumps(snapshot)}\n\n"
    finally:
        feed.leave(queue)
        metrics.STREAMS.dec()


ENDPOINTS = [
    Endpoint("GET", "/v1/live", "read", "A snapshot every second as Server-Sent Events: settled/s, latency, "
             "and what `charging status` shows (keys without account limits)", live, "operations",
             media_type="text/event-stream", errors=(403,)),
]
