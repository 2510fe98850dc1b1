"""Reading streams and consumer groups: several streams in one call, a group made once,
entries taken over from dead consumers, and what a partition's streams hold. The reads
are plans (charging/plan.py), run by the sync and the asyncio client alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from charging.connection import is_cluster
from charging.keys import Keys
from charging.plan import Pause, Plan, pipelined, run
from charging.settings import Settings

CLUSTER_POLL_MS = 20  # pause between empty polls of several streams on a cluster


def ensure_group(stream: str, group: str, start: str = "0") -> Plan[bool]:
    """Create group on stream (and the stream) unless it exists; True if it was made. Id 0
    (the default): a group made after entries were added still sees every one of them;
    "$": only later ones."""
    try:
        yield lambda client: client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def group_lost(error: Exception) -> bool:
    """The stream or the group a command named is gone: the server lost its data (restarted
    without it, failed over to an empty node, flushed). A read blocked on the stream when
    it went is answered UNBLOCKED; any command after that, NOGROUP."""
    return isinstance(error, redis.ResponseError) and str(error).startswith(
        ("NOGROUP", "UNBLOCKED the stream key no longer exists"))


def read_streams(streams: dict[str, str], count: int, block_ms: int | None, group: str | None = None,
                 consumer: str | None = None) -> Plan[list[Any]]:
    """XREAD (or XREADGROUP when group is given) over several streams, in XREAD's reply
    shape; block_ms None does not wait. One call on a single node; on a cluster, streams
    of different slots cannot share a call, so one pipelined non-blocking read per stream,
    and a short pause when all were empty."""
    def read(target: Any, names: dict[str, str], block: int | None) -> Any:
        if group is None:
            return target.xread(names, count=count, block=block)
        return target.xreadgroup(group, consumer, names, count=count, block=block)

    cluster = yield is_cluster
    if not cluster or len(streams) == 1:
        return (yield lambda client: read(client, streams, block_ms)) or []
    answers = yield pipelined(lambda pipe: [read(pipe, {name: last}, None) for name, last in streams.items()])
    found = [item for answer in answers if answer for item in answer]
    if not found and block_ms:
        yield Pause(min(block_ms, CLUSTER_POLL_MS) / 1000)
    return found


Claimed = Callable[[list[tuple[bytes, dict[bytes, bytes]]], list[bytes]], Plan[bool]]


def autoclaim(stream: str, group: str, consumer: str, min_idle_ms: int, count: int, claimed: Claimed) -> Plan[None]:
    """Take over entries of stream idle longer than min_idle_ms from other consumers of
    group (dead or stalled). XAUTOCLAIM scans a bounded slice per call and may return fewer
    than count with more to come, so loop on its cursor until 0-0. Each slice goes to the
    plan claimed(messages, deleted): messages are (id, fields) now pending for consumer;
    deleted are ids of entries deleted while pending, already dropped from the pending list
    by Redis. The plan returns False to stop."""
    cursor: bytes | str = "0-0"
    while True:
        cursor, messages, deleted = yield lambda client: client.xautoclaim(
            stream, group, consumer, min_idle_time=min_idle_ms, start_id=cursor, count=count)
        go_on = yield from claimed(messages, deleted)
        if text(cursor) == "0-0" or not go_on:
            return


def partition_status(client: redis.Redis, settings: Settings, keys: Keys) -> dict[str, Any]:
    """What a partition's streams hold and how far the group is, in one round trip."""
    return run(client, partition_reading(settings, keys))


def partition_reading(settings: Settings, keys: Keys) -> Plan[dict[str, Any]]:
    """partition_status as a plan, for the sync and the asyncio client."""
    def queue(pipe: Any) -> Any:
        pipe.xlen(keys.requests)
        pipe.xlen(keys.results)
        pipe.xlen(keys.deadletter)
        pipe.hgetall(keys.deadletter_reasons)
        pipe.hlen(keys.reservations)
        pipe.hvals(keys.held)  # one field per account with funds on hold: as many as live sessions
        pipe.xinfo_groups(keys.requests)
        pipe.xpending(keys.requests, settings.group)
        pipe.xinfo_consumers(keys.requests, settings.group)
        # A stream or group that does not exist yet answers an error, read as such below.
        return pipe.execute(raise_on_error=False)

    replies = yield lambda client: queue(client.pipeline(transaction=False))
    return read_partition_status(replies, settings, keys, int(time.time() * 1000))


def read_partition_status(replies: list, settings: Settings, keys: Keys, now_ms: int) -> dict[str, Any]:
    failed = [r for r in replies if isinstance(r, Exception) and not _no_such_group(r)]
    if failed:  # not a stream or group that does not exist yet: real (NOPERM, a lost connection)
        raise failed[0]
    length, results, deadletters, reasons, reservations, held, groups, pending, consumers = replies
    status = {
        "partition": keys.partition,
        "requests_stream": keys.requests, "results_stream": keys.results, "deadletter_stream": keys.deadletter,
        "length": length, "results": results, "deadletters": deadletters,
        # Counted with each dead letter since the start; the stream itself is trimmed.
        "deadletter_reasons": {text(r): int(n) for r, n in sorted(reasons.items())},
        "open_reservations": reservations, "held": sum(int(v) for v in held),
        "pending": 0, "lag": None, "oldest_pending_age_ms": None, "consumers": [],
        "stray_groups": [] if isinstance(groups, Exception) else stray_groups(groups, settings.group),
    }
    group = _group(groups, settings.group)
    if group is None:  # no stream yet, or no group on it
        return status
    # lag is null after trimming or deletion: report it as unknown (None), never as 0.
    status.update(pending=group["pending"], lag=group.get("lag"))
    if group["pending"]:
        oldest = text(pending["min"])
        status["oldest_pending_age_ms"] = max(0, now_ms - int(oldest.split("-")[0]))
    status["consumers"] = [
        {"name": text(c["name"]), "pending": c["pending"], "idle_ms": c["idle"]}
        for c in consumers
    ]
    return status


def stray_groups(groups: list, workers: str) -> list[str]:
    """The groups of an XINFO GROUPS reply on a request stream other than the workers'. No
    worker reads them, and trimming and repair pass them by (lua/charging.lua), so a reader
    of one misses entries: an operator should find out who made it and remove it."""
    return sorted(name for g in groups if (name := text(g["name"])) != workers)


def _no_such_group(error: Exception) -> bool:
    return isinstance(error, redis.ResponseError) and str(error).startswith(("no such key", "NOGROUP"))


def _group(groups: list | Exception, name: str) -> dict | None:
    if isinstance(groups, Exception):  # no such stream yet
        return None
    return next((g for g in groups if text(g["name"]) == name), None)


def text(value: bytes | str | int) -> str:
    """A reply value as str. Clients keep raw bytes (no decode_responses) so an entry that is
    not UTF-8 reaches the schema, which dead-letters it instead of failing the whole read."""
    return value.decode() if isinstance(value, bytes) else str(value)
