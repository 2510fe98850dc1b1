"""`charging status`: what each partition's streams hold and how far the workers are."""

from __future__ import annotations

from collections import Counter
from typing import Any

import redis

from charging.keys import all_partitions
from charging.plan import Plan, run
from charging.settings import Settings
from charging.streams import partition_reading


def status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Totals over all partitions at the top level, one entry per partition below."""
    return run(client, status_reading(settings))


def status_reading(settings: Settings) -> Plan[dict[str, Any]]:
    """status as a plan, for the sync and the asyncio client: a round trip per partition."""
    parts = []
    for keys in all_partitions(settings.namespace, settings.partitions):
        parts.append((yield from partition_reading(settings, keys)))
    return summary(settings, parts)


def summary(settings: Settings, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The totals of partition_status over every partition (charging.streams), read by
    whichever client. lag is None (unknown) if any partition's lag is unknown."""
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
        "stray_groups": sorted({g for p in parts for g in p["stray_groups"]}),
        "partitions": parts,
    }
