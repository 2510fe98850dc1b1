"""`charging status`: what each partition's streams hold and how far the workers are."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import redis

from charging.connection import text
from charging.keys import Keys, all_partitions
from charging.settings import Settings


def partition_status(client: redis.Redis, settings: Settings, keys: Keys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.requests)
    pipe.xlen(keys.results)
    pipe.xlen(keys.deadletter)
    pipe.hgetall(keys.deadletter_reasons)
    pipe.hlen(keys.reservations)
    pipe.hvals(keys.held)  # one field per account with funds on hold: as many as live sessions
    length, results, deadletters, reasons, reservations, held = pipe.execute()
    status = {
        "partition": keys.partition,
        "requests_stream": keys.requests, "results_stream": keys.results, "deadletter_stream": keys.deadletter,
        "length": length, "results": results, "deadletters": deadletters,
        # Counted by the dead_letter function since the start; the stream itself is trimmed.
        "deadletter_reasons": {text(r): int(n) for r, n in sorted(reasons.items())},
        "open_reservations": reservations, "held": sum(int(v) for v in held),
        "pending": 0, "lag": None, "oldest_pending_age_ms": None, "consumers": [],
    }
    group = _group(client, keys.requests, settings.group)
    if group is None:
        return status
    # lag is null after trimming or deletion: report it as unknown (None), never as 0.
    status.update(pending=group["pending"], lag=group.get("lag"))
    if group["pending"]:
        oldest = client.xpending(keys.requests, settings.group)["min"].decode()
        status["oldest_pending_age_ms"] = max(0, int(time.time() * 1000) - int(oldest.split("-")[0]))
    status["consumers"] = [
        {"name": text(c["name"]), "pending": c["pending"], "idle_ms": c["idle"]}
        for c in client.xinfo_consumers(keys.requests, settings.group)
    ]
    return status


def _group(client: redis.Redis, stream: str, name: str) -> dict | None:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return None
    return next((g for g in groups if text(g["name"]) == name), None)


def status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Totals over all partitions at the top level, one entry per partition below.
    lag is None (unknown) if any partition's lag is unknown."""
    parts = [partition_status(client, settings, k) for k in all_partitions(settings.namespace, settings.partitions)]
    first = parts[0]
    lags = [p["lag"] for p in parts]
    return {
        "requests_stream": first["requests_stream"] if len(parts) == 1 else f"{settings.namespace}:{{p*}}:requests",
        "results_stream": first["results_stream"] if len(parts) == 1 else f"{settings.namespace}:{{p*}}:results",
        "deadletter_stream": (first["deadletter_stream"] if len(parts) == 1
                              else f"{settings.namespace}:{{p*}}:deadletter"),
        "group": settings.group,
        "length": sum(p["length"] for p in parts),
        "results": sum(p["results"] for p in parts),
        "deadletters": sum(p["deadletters"] for p in parts),
        "deadletter_reasons": dict(sorted(sum((Counter(p["deadletter_reasons"]) for p in parts), Counter()).items())),
        "pending": sum(p["pending"] for p in parts),
        "open_reservations": sum(p["open_reservations"] for p in parts),
        "held": sum(p["held"] for p in parts),
        "lag": None if None in lags else sum(lags),
        "consumers": sorted({c["name"] for p in parts for c in p["consumers"]}),
        "partitions": parts,
    }
