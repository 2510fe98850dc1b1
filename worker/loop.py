"""The worker loop: read a batch, validate and rate each entry, settle the whole batch
with one pipeline of function calls (one round trip), repeat."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

import redis

from charging import codec
from charging.connection import TRANSIENT_ERRORS, Backoff, missing_function, reload_functions, with_functions
from charging.keys import Keys, partition_of
from charging.log import logger
from charging.plan import call, run
from charging.schema import Invalid, parse_request
from charging.settings import Settings
from charging.streams import group_lost, read_streams, text
from charging.tariff import price
from worker import metrics, recovery
from worker.entry import Entry
from worker.maintainer import Duties

log = logger("charging.worker")

# Redis serves no one else while a function runs, about 20 us per entry (docs/benchmark.md):
# 25 entries hold it for under half a millisecond, so authorize callers barely wait, and
# bigger calls were measured no faster (10 to 200 per call: the same drain rate).
ENTRIES_PER_CALL = 25


class Worker:
    def __init__(self, client: redis.Redis, settings: Settings, consumer: str,
                 partitions: Iterable[int] | None = None, burst: bool = False):
        self.client = client
        self.settings = settings
        self.consumer = consumer
        self.burst = burst
        owned = range(settings.partitions) if partitions is None else partitions
        self.partitions = [Keys(settings.namespace, p) for p in owned]
        self.by_stream = {k.requests: k for k in self.partitions}
        self.stopping = False
        self.log = log.bind(consumer=consumer)
        self.settled = 0
        self.clock_offset_ms = 0  # the server's clock minus this host's (recovery.sync_clock)
        self.groups_ensured = False  # recovery.ensure_groups has run once: a group it makes later was lost
        self.duties = Duties(client, settings, self.log, consumer)

    def stop(self, *_) -> None:
        self.stopping = True

    def run(self) -> int:
        """Process until stopped (SIGTERM / SIGINT finish the batch in hand), or in burst
        mode until every stream is drained and nothing is pending. Returns the exit code."""
        self.log.info("worker_started", partitions=[k.partition for k in self.partitions], burst=self.burst)
        next_maintenance = 0.0
        own_pending_done = False
        backoff = Backoff()
        unavailable = self.log.bind(redis=str(self.settings.redis_url))  # which server is down; no password
        while not self.stopping:
            try:
                if not own_pending_done:
                    recovery.sync_clock(self)
                    recovery.ensure_groups(self)
                    recovery.settle_own_pending(self)
                    own_pending_done = True
                if time.monotonic() >= next_maintenance:
                    recovery.maintain(self)
                    next_maintenance = time.monotonic() + self.settings.maintenance_interval_s
                entries = self.read()
                if entries and self.settle(entries):
                    own_pending_done = False  # what failed stays pending: settle it first
                    time.sleep(0.1)
                elif not entries and self.burst and recovery.drained(self):
                    break
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                # Entries read but not settled stay pending: settle them first once back.
                backoff.wait(unavailable, exc)
                own_pending_done = False
            except redis.ResponseError as exc:
                own_pending_done = False  # whatever step failed runs again, after the groups
                self.recover(exc, backoff, unavailable)
        self.log.info("worker_stopped", settled=self.settled)
        return 0

    def recover(self, error: redis.ResponseError, backoff: Backoff, unavailable) -> None:
        """The server lost its data (restarted empty, failed over to an empty node, flushed):
        a group gone is made again by recovery.ensure_groups, which the loop runs next; a
        library gone is loaded again, or, by a worker whose ACL user may not load code,
        waited for until the maintainer loads it. Any other error is raised."""
        if group_lost(error):
            self.log.warning("redis_found_empty", error=str(error))
        elif not missing_function(error):
            raise error
        elif not run(self.client, reload_functions(error)):
            backoff.wait(unavailable, error)

    def read(self) -> list[Entry]:
        block = 100 if self.burst else self.settings.block_ms
        reply = run(self.client, read_streams({k.requests: ">" for k in self.partitions}, self.settings.batch, block,
                                              group=self.settings.group, consumer=self.consumer))
        return [Entry(self.by_stream[text(stream)], eid.decode(), fields)
                for stream, messages in reply for eid, fields in messages]

    def settle(self, entries: list[Entry]) -> int:
        """One pipeline of function calls for the whole batch: settle_batch calls of up to
        ENTRIES_PER_CALL entries per partition (one FCALL settling many is far cheaper, for
        Redis and for this process, than one FCALL each), and a dead_letter call per bad
        entry. Each call is atomic on its own. Returns how many entries could not be settled
        (they stay pending)."""
        started = time.perf_counter()
        plan = [self.judge(entry) for entry in entries]

        def send(_client: object) -> list:
            pipe = self.client.pipeline(transaction=False)
            calls = []  # per queued call: the entries it settles, and whether it is a settle_batch
            by_partition: dict[Keys, list[int]] = defaultdict(list)
            for i, (entry, work) in enumerate(zip(entries, plan)):
                if isinstance(work, Invalid):
                    codec.dead_letter(pipe, self.settings, entry.keys, entry.entry_id, work, entry.fields)
                    calls.append(([i], False))
                else:
                    by_partition[entry.keys].append(i)
            for keys, indices in by_partition.items():
                for start in range(0, len(indices), ENTRIES_PER_CALL):
                    chunk = indices[start:start + ENTRIES_PER_CALL]
                    codec.settle_batch(pipe, self.settings, keys, [(*plan[i], entries[i].entry_id) for i in chunk])
                    calls.append((chunk, True))
            replies = [None] * len(entries)
            for (indices, batch), answer in zip(calls, pipe.execute(raise_on_error=False)):
                for i, result in zip(indices, codec.batch_replies(answer, len(indices)) if batch else [answer]):
                    replies[i] = result
            if lost := next((r for r in replies if missing_function(r)), None):
                raise lost  # nothing of this pipeline ran: load the library and send it again
            return replies

        replies = run(self.client, with_functions(lambda: call(send)))
        failed = 0
        for entry, work, reply in zip(entries, plan, replies):
            if isinstance(reply, Exception):
                # An error reply, or (on a cluster) a node that went away mid-batch. Not acked,
                # so it stays pending and is retried; max_deliveries ends an endless failure.
                self.log.error("settle_failed", entry_id=entry.entry_id, partition=entry.keys.partition,
                               error=str(reply))
                failed += 1
            else:
                self.report(entry, work, reply)
        self.settled += len(entries) - failed
        metrics.record_batch(plan, replies, time.perf_counter() - started)
        return failed

    def judge(self, entry: Entry):
        """Validate and rate one entry: (request, amount), or the Invalid that dead-letters it.
        amount is None for a commit or extend in units (rated in lua/) and a release."""
        ahead = entry_ms(entry.entry_id) - (time.time() * 1000 + self.clock_offset_ms)
        if ahead > self.settings.max_clock_skew_ms:
            return Invalid("id_in_future", f"entry id {entry.entry_id} is {ahead:.0f} ms ahead of the Redis clock; "
                                           "producers must let Redis choose the id (XADD *)")
        if entry.deliveries > self.settings.max_deliveries:
            return Invalid("max_deliveries", f"delivered {entry.deliveries} times without being settled")
        try:
            request = parse_request(entry.fields, self.settings)
            if partition_of(request.account, self.settings.partitions) != entry.keys.partition:
                raise Invalid("wrong_partition", f"account {request.account} does not belong to "
                                                 f"partition {entry.keys.partition}")
            return request, price(request, self.settings)
        except Invalid as invalid:
            return invalid

    def report(self, entry: Entry, work, reply) -> None:
        if isinstance(work, Invalid):
            if reply:
                self.log.warning("entry_dead_lettered", entry_id=entry.entry_id, reason=work.reason,
                                 detail=work.detail, request_id=_field(entry.fields, b"request_id"),
                                 account=_field(entry.fields, b"account"), partition=entry.keys.partition)
            return
        request, amount = work
        event = "entry_already_settled" if reply.stale else f"{request.op}_{reply.status}"  # charge_approved ...
        level = self.log.debug if reply.status == "approved" else self.log.info
        session = {} if request.op == "charge" else {"reservation": request.reservation_id}
        level(event, request_id=request.request_id, account=request.account, entry_id=entry.entry_id,
              partition=entry.keys.partition, amount=amount, reason=reply.reason, duplicate=reply.duplicate,
              **session)


def entry_ms(entry_id: str) -> int:
    """The milliseconds part of a stream id: the server's clock when it chose the id."""
    return int(entry_id.split("-", 1)[0])


def _field(fields: dict[bytes, bytes] | None, name: bytes) -> str | None:
    """A field of an entry that failed validation, cut short and decoded leniently for the log."""
    raw = (fields or {}).get(name)
    return raw[:128].decode("utf-8", "replace") if raw else None
