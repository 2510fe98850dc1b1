"""Reading the results streams: from the start, following new outcomes, or as a consumer
group of its own (each outcome delivered once to the group, acked after it is yielded)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import redis

from charging.keys import all_partitions
from charging.schema import Outcome
from charging.settings import Settings
from charging.streams import ensure_group


def subscribe(client: redis.Redis, settings: Settings, follow: bool = False, group: str | None = None,
              limit: int | None = None) -> Iterator[Outcome]:
    streams = [k.results for k in all_partitions(settings.namespace, settings.partitions)]
    reader = _group_reader(client, streams, group) if group else _plain_reader(client, streams, follow)
    for n, outcome in enumerate(reader(follow), start=1):
        yield outcome
        if limit is not None and n >= limit:
            return


def _plain_reader(client: redis.Redis, streams: list[str], follow: bool):
    def read(follow: bool) -> Iterator[Outcome]:
        last = {s: "0-0" for s in streams}
        while True:
            reply = client.xread(last, count=1000, block=1000 if follow else None)
            if not reply and not follow:
                return
            for stream, messages in reply or []:
                for entry_id, fields in messages:
                    last[stream.decode()] = entry_id.decode()
                    yield Outcome.from_fields(fields)
    return read


def _group_reader(client: redis.Redis, streams: list[str], group: str):
    consumer = socket.gethostname()

    def read(follow: bool) -> Iterator[Outcome]:
        for stream in streams:
            ensure_group(client, stream, group)
        while True:
            reply = client.xreadgroup(group, consumer, {s: ">" for s in streams}, count=1000,
                                      block=1000 if follow else None)
            if not reply and not follow:
                return
            for stream, messages in reply or []:
                for _, fields in messages:
                    yield Outcome.from_fields(fields)
                client.xack(stream, group, *[entry_id for entry_id, _ in messages])
    return read
