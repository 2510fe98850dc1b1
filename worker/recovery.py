"""Recovery and upkeep around the worker loop: the consumer group, this consumer's own
pending entries, entries of dead consumers (XAUTOCLAIM), the sweep of expired
reservations, the server's clock, and the maintainer's duties while the worker's ACL
user allows them (worker/maintainer.py). None of this runs per entry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis

from charging import codec
from charging.connection import load_functions, server_clock_offset_ms
from charging.keys import Keys
from charging.plan import call, run
from charging.schema import Invalid
from charging.streams import autoclaim, ensure_group, partition_status
from worker import metrics
from worker.entry import Entry

if TYPE_CHECKING:
    from worker.loop import Worker


def ensure_groups(worker: Worker) -> None:
    """Make the group on every partition that lacks it. One gone after this worker had made
    sure of it means the server lost its data (restarted without it, failed over to an
    empty node, flushed): say so per partition and load the library again."""
    made = [keys.partition for keys in worker.partitions
            if run(worker.client, ensure_group(keys.requests, worker.settings.group))]
    if worker.groups_ensured and made:
        for partition in made:
            worker.log.warning("group_recreated", partition=partition, group=worker.settings.group)
        _load_functions(worker)
    worker.groups_ensured = True


def _load_functions(worker: Worker) -> None:
    """Load the library where the worker's ACL user may. In deploy/users.acl it may not:
    the maintainer loads it, and until then the worker's first function call waits and
    says so (functions_missing)."""
    try:
        run(worker.client, load_functions())
    except redis.exceptions.NoPermissionError:
        return
    worker.log.info("functions_loaded")


def settle_own_pending(worker: Worker) -> None:
    """Entries this consumer read before a crash or a lost connection are settled first."""
    for keys in worker.partitions:
        start = "0"
        while not worker.stopping:
            read = worker.client.xreadgroup(worker.settings.group, worker.consumer, {keys.requests: start},
                                            count=worker.settings.batch)
            entries = [Entry(keys, eid.decode(), fields or None) for _, messages in read for eid, fields in messages]
            if not entries:
                break
            _count_deliveries(worker, keys, entries)
            worker.settle(entries)
            start = entries[-1].entry_id  # failed entries stay pending; move past them


def reclaim(worker: Worker) -> None:
    """Take over and settle entries idle longer than reclaim_idle_ms from consumers that
    died or stalled."""
    for keys in worker.partitions:
        if worker.stopping:
            return
        run(worker.client, autoclaim(keys.requests, worker.settings.group, worker.consumer,
                                     worker.settings.reclaim_idle_ms, worker.settings.batch,
                                     lambda messages, deleted: call(
                                         lambda _client: _settle_claimed(worker, keys, messages, deleted))))


def _settle_claimed(worker: Worker, keys: Keys, messages: list, deleted: list) -> bool:
    """Settle what one XAUTOCLAIM call took over; False once the worker is stopping."""
    for entry_id in deleted:
        # Already dropped from the pending list by Redis; record it, never lose it silently.
        try:
            codec.dead_letter(worker.client, worker.settings, keys, entry_id.decode(),
                              Invalid("entry_deleted", "deleted before it was settled"), None, ack=False)
        except redis.ResponseError as refused:  # the dead-letter stream exhausted: say so, go on
            worker.log.error("dead_letter_failed", entry_id=entry_id.decode(), reason="entry_deleted",
                             partition=keys.partition, error=str(refused))
            continue
        metrics.dead_lettered("entry_deleted")
        worker.log.warning("entry_dead_lettered", entry_id=entry_id.decode(), reason="entry_deleted",
                           partition=keys.partition)
    entries = [Entry(keys, eid.decode(), fields or None) for eid, fields in messages]
    if entries:
        worker.log.info("entries_reclaimed", partition=keys.partition, count=len(entries))
        metrics.RECLAIMED.inc(len(entries))
        _count_deliveries(worker, keys, entries)
        worker.settle(entries)
    return not worker.stopping


def _count_deliveries(worker: Worker, keys, entries: list) -> None:
    """Fill in each entry's delivery counter, which the max_deliveries rule reads."""
    pending = worker.client.xpending_range(
        keys.requests, worker.settings.group, min=entries[0].entry_id, max=entries[-1].entry_id,
        count=len(entries) * 2, consumername=worker.consumer)
    counts = {p["message_id"].decode(): p["times_delivered"] for p in pending}
    for entry in entries:
        entry.deliveries = counts.get(entry.entry_id, entry.deliveries)


def maintain(worker: Worker) -> None:
    reclaim(worker)
    sync_clock(worker)
    for keys in worker.partitions:
        released = codec.expire_reservations(worker.client, worker.settings, keys)
        if released:
            worker.log.info("reservations_expired", partition=keys.partition, count=released)
            metrics.RESERVATIONS_EXPIRED.inc(released)
        worker.duties.run(keys)
        if metrics.enabled():
            metrics.record_partition(partition_status(worker.client, worker.settings, keys))


def sync_clock(worker: Worker) -> None:
    """Read the server's clock: entry ids are in its time (the id_in_future rule)."""
    worker.clock_offset_ms = run(worker.client, server_clock_offset_ms())


def drained(worker: Worker) -> bool:
    """Nothing left to read (the caller just read nothing) and nothing pending in the group.
    Pending entries of other consumers are reclaimed by maintenance once they go idle."""
    return all(worker.client.xpending(k.requests, worker.settings.group)["pending"] == 0
               for k in worker.partitions)
