"""What the dedupe records hold for a request id: the tests' one reader of them."""

from __future__ import annotations

import redis

from charging import codec
from charging.keys import all_partitions
from charging.plan import run
from charging.settings import Settings


def recorded(client: redis.Redis, settings: Settings, request_id: str) -> list[codec.Recorded]:
    """The records of request_id, a partition each that has one, in its dedupe buckets ([]
    when there is none)."""
    return run(client, codec.find_records(settings, all_partitions(settings.namespace, settings.partitions),
                                          request_id))
