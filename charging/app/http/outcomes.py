"""GET /v1/outcomes: outcomes as Server-Sent Events.

Without a group, from now (or from the start of the results streams), resumable: every
event's id is the position in every partition's results stream, and a client that
reconnects with it in Last-Event-ID continues after that event (as long as results
trimming has not dropped what followed). With ?group=G, as a member of a consumer group of
the results streams: each outcome goes to one member; a member first gets again what it was
sent but did not confirm, and an outcome is acked once written to the connection.

A stream polls Redis (no blocking read) so that it holds a pooled connection only for the
moment of each read: many open streams never starve the charges of connections."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from charging.app.http import metrics
from charging.app.http.access import Caller
from charging.app.http.endpoints import Endpoint
from charging.app.http.gateway import Gateway, log, problem_of
from charging.app.http.problems import Problem
from charging.keys import all_partitions
from charging.plan import call, pipelined, run_async
from charging.schema import Outcome
from charging.streams import ensure_group, read_streams, text

POLL_S = 0.2  # pause after an empty read
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
BATCH = 500
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
MAX_ID_PART = 2**64 - 1  # a stream id is two unsigned 64-bit integers; Redis refuses a larger one
_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


async def outcomes(request: Request, caller: Caller, gateway: Gateway) -> StreamingResponse:
    streams = [keys.results for keys in all_partitions(gateway.settings.namespace, gateway.settings.partitions)]
    origin = request.query_params.get("from", "now")
    if origin not in ("now", "start"):
        raise Problem(400, "invalid_query", "from must be now or start")
    group = request.query_params.get("group")
    if group is None:
        cursor = _resumed(request.headers.get("last-event-id"), streams) or await _origin(gateway, streams, origin)
        member = None
    else:
        consumer = request.query_params.get("consumer", caller.name)
        if not (_GROUP.fullmatch(group) and _GROUP.fullmatch(consumer)):
            raise Problem(400, "invalid_query", "group and consumer are 1..64 of A-Z a-z 0-9 _ . -")
        for stream in streams:
            await gateway.run(ensure_group(stream, group, "$" if origin == "now" else "0"))
        cursor = {stream: "0" for stream in streams}  # first what this member was sent and did not ack
        member = (group, consumer)
    return StreamingResponse(_events(gateway, caller, cursor, member), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def _resumed(last_event_id: str | None, streams: list[str]) -> dict[str, str] | None:
    if last_event_id is None:
        return None
    ids = last_event_id.split(",")
    if len(ids) != len(streams) or not all(_is_entry_id(i) for i in ids):
        raise Problem(400, "invalid_last_event_id", f"Last-Event-ID must be {len(streams)} stream id(s), "
                                                    "comma separated, as this gateway sent it")
    return dict(zip(streams, ids))


def _is_entry_id(value: str) -> bool:
    match = _ENTRY_ID.fullmatch(value)
    return match is not None and all(int(part) <= MAX_ID_PART for part in match.groups())


async def _origin(gateway: Gateway, streams: list[str], origin: str) -> dict[str, str]:
    if origin == "start":
        return {stream: "0-0" for stream in streams}
    newest = await gateway.run(call(pipelined(lambda pipe: [pipe.xrevrange(s, count=1) for s in streams])))
    return {stream: text(entries[0][0]) if entries else "0-0" for stream, entries in zip(streams, newest)}


async def _events(gateway: Gateway, caller: Caller, cursor: dict[str, str],
                  member: tuple[str, str] | None) -> AsyncIterator[str]:
    group, consumer = member or (None, None)
    quiet_s = 0.0
    metrics.STREAMS.inc()
    try:
        yield "retry: 1000\n\n"
        while True:
            reply = await run_async(gateway.client, read_streams(
                {s: cursor[s] if group is None or cursor[s] == "0" else ">" for s in cursor}, BATCH, None,
                group, consumer))
            sent = []
            for stream, entries in reply:
                stream = text(stream)
                if group is not None and cursor[stream] == "0" and not entries:
                    cursor[stream] = ">"  # nothing left that this member was sent before
                for entry_id, fields in entries:
                    if group is None:
                        cursor[stream] = text(entry_id)
                    sent.append((stream, entry_id))
                    outcome = Outcome.from_fields(fields)
                    if caller.may_touch(outcome.account):
                        yield _event(outcome, None if group else ",".join(cursor.values()))
            if group is not None and sent:  # written to the connection: acked
                await run_async(gateway.client, call(pipelined(
                    lambda pipe, acked=sent: [pipe.xack(s, group, i) for s, i in acked])))
            if reply and any(entries for _, entries in reply):
                quiet_s = 0.0
                continue
            if quiet_s >= HEARTBEAT_S:
                yield ": keep-alive\n\n"
                quiet_s = 0.0
            await asyncio.sleep(POLL_S)
            quiet_s += POLL_S
    except Exception as exc:  # noqa: BLE001 - the headers are sent: the problem goes as an event, the stream ends
        yield f"event: problem\ndata: {_stream_problem(exc).response().body.decode()}\n\n"
    finally:
        metrics.STREAMS.dec()


def _stream_problem(error: Exception) -> Problem:
    """What ends a stream, as its last event; the client reconnects and resumes (Last-Event-ID)."""
    if problem := problem_of(error):
        log.warning("outcome_stream_ended", error=str(error))
        return problem
    log.error("outcome_stream_failed", exception=repr(error), exc_info=error)
    return Problem(500, "internal_error", "the gateway failed on this stream; see its log")


def _event(outcome: Outcome, event_id: str | None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: outcome\ndata: {json.dumps(outcome.as_dict())}\n\n"


ENDPOINTS = [
    Endpoint("GET", "/v1/outcomes", "read", "Outcomes as Server-Sent Events (from now, from the start, or as a "
             "results group); resumable with Last-Event-ID", outcomes, "outcomes",
             answers=((200, None),), media_type="text/event-stream", errors=(400, 403)),
]
