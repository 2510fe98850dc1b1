"""The worker is a pump: the library (lua/charging.lua `pump`) reads this consumer's
entries, reclaims those of dead consumers, judges, rates and settles them, and answers
with a summary. The worker decides when to call it, waits without burning CPU when there
is nothing to do, does the upkeep, and counts and logs what the summaries say."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from charging import codec
from charging.connection import TRANSIENT_ERRORS, Backoff, load_functions, missing_function, reload_functions
from charging.keys import Keys
from charging.log import logger
from charging.plan import run
from charging.settings import Settings
from charging.streams import ensure_group, group_lost, partition_status, read_streams, text
from worker import metrics
from worker.maintainer import Duties

log = logger("charging.worker")

# Redis serves no one else while a function runs, about 25 us per entry (docs/benchmark.md):
# 25 entries hold it for well under a millisecond, so authorize callers barely wait. While
# calls come back full (a backlog) the size doubles up to MAX_ENTRIES_PER_CALL, whose calls
# cost Redis less per entry (drains 1.07x faster at 100, measured), holding it ~2.5 ms.
ENTRIES_PER_CALL = 25
MAX_ENTRIES_PER_CALL = 100
REFUSED_PAUSE_S = 0.1  # before a partition whose call refused entries is called again
BURST_BLOCK_MS = 100


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
        self.sizes: dict[int, int] = {}  # partition -> entries its next call asks for
        self.stopping = False
        self.log = log.bind(consumer=consumer)
        self.settled = 0
        self.groups_ensured = False  # ensure_groups has run once: a group it makes later was lost
        self.groups_ready = False  # every partition has its group (unknown again after redis_found_empty)
        self.resume_at: dict[int, float] = {}  # partition -> when to call it again after refusals
        self.waited: dict[int, str] = {}  # partition -> the entry the last wait delivered
        self.duties = Duties(client, settings, self.log, consumer)

    def stop(self, *_) -> None:
        self.stopping = True

    def run(self) -> int:
        """Pump until stopped (SIGTERM / SIGINT finish the call in hand), or in burst mode
        until nothing is pending after a round. Returns the exit code."""
        self.log.info("worker_started", partitions=[k.partition for k in self.partitions], burst=self.burst)
        next_maintenance = 0.0
        backoff = Backoff()
        unavailable = self.log.bind(redis=str(self.settings.redis_url))  # which server is down; no password
        while not self.stopping:
            try:
                if not self.groups_ready:
                    self.ensure_groups()
                maintaining = time.monotonic() >= next_maintenance
                if maintaining:  # the sweep first: holds past their expiry go before the entries are read
                    self.maintain()
                    next_maintenance = time.monotonic() + self.settings.maintenance_interval_s
                # a round ends when its calls find the partitions empty (or all pausing)
                self.pump_round(self.settings.reclaim_idle_ms if maintaining else 0)
                if self.burst and self.drained():
                    break
                self.wait()
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                backoff.wait(unavailable, exc)  # what was read stays pending: the next call settles it
            except redis.ResponseError as exc:
                self.recover(exc, backoff, unavailable)
        self.log.info("worker_stopped", settled=self.settled)
        return 0

    def recover(self, error: redis.ResponseError, backoff: Backoff, unavailable) -> None:
        """The server lost its data (restarted empty, failed over to an empty node, flushed):
        a group gone is made again (ensure_groups, which the loop runs next); a library gone
        is loaded again, or, by a worker whose ACL user may not load code, waited for until
        the maintainer loads it. Any other error is raised."""
        if group_lost(error):
            self.log.warning("redis_found_empty", error=str(error))
            self.groups_ready = False
        elif not missing_function(error):
            raise error
        elif not run(self.client, reload_functions(error)):
            backoff.wait(unavailable, error)

    def ensure_groups(self) -> None:
        """Make the group on every partition that lacks it. One gone after this worker had
        made sure of it means the server lost its data: say so per partition and load the
        library again where this worker's ACL user may (in deploy/users.acl it may not: the
        maintainer loads it, and the next pump waits for it, functions_missing)."""
        made = [keys.partition for keys in self.partitions
                if run(self.client, ensure_group(keys.requests, self.settings.group))]
        if self.groups_ensured and made:
            for partition in made:
                self.log.warning("group_recreated", partition=partition, group=self.settings.group)
            try:
                run(self.client, load_functions())
                self.log.info("functions_loaded")
            except redis.exceptions.NoPermissionError:
                pass
        self.groups_ensured = self.groups_ready = True

    def pump_round(self, reclaim_idle_ms: int = 0) -> bool:
        """Call pump on every partition but those pausing after refusals, again while any
        call comes back full; each time on all of them, so a quiet partition is not left
        waiting behind another's backlog. A round whose calls all read less than they asked
        for found the partitions empty, and the wait that follows wakes at the next entry.
        reclaim_idle_ms goes with each partition's first call. True when any call read an
        entry."""
        found = False
        while (todo := self.active()) and not self.stopping:
            asked = [self.size(k.partition) for k in todo]
            summaries = self.pump(todo, reclaim_idle_ms)
            reclaim_idle_ms = 0
            full = False
            for keys, size, summary in zip(todo, asked, summaries):
                if summary.refused:
                    self.resume_at[keys.partition] = time.monotonic() + REFUSED_PAUSE_S
                full = full or (not summary.refused and summary.read >= size)
                found = found or summary.read > 0
            if not full:
                break
        return found

    def active(self) -> list[Keys]:
        """The partitions not pausing after refusals."""
        now = time.monotonic()
        return [k for k in self.partitions if self.resume_at.get(k.partition, 0.0) <= now]

    def pump(self, todo: list[Keys], reclaim_idle_ms: int) -> list[codec.Summary]:
        """One pipeline of pump calls, one per partition: one round trip. A call refused as
        a whole counts as refusing all it would have read (nothing is known of them); a
        lost group or library is raised for recover()."""
        started = time.perf_counter()
        pipe = self.client.pipeline(transaction=False)
        for keys in todo:
            codec.pump(pipe, self.settings, keys, self.consumer, self.size(keys.partition), reclaim_idle_ms,
                       self.waited.pop(keys.partition, ""))
        replies = pipe.execute(raise_on_error=False)
        seconds = (time.perf_counter() - started) / len(todo)
        summaries = []
        for keys, reply in zip(todo, replies):
            if isinstance(reply, Exception):
                if not isinstance(reply, redis.ResponseError) or group_lost(reply) or missing_function(reply):
                    raise reply
                summary = codec.Summary(refused=1, error=str(reply))
            else:
                summary = codec.summary(reply)
            self.resize(keys.partition, summary)
            self.report(keys, summary)
            metrics.record_summary(summary, seconds)
            summaries.append(summary)
        return summaries

    def size(self, partition: int) -> int:
        return self.sizes.get(partition, min(self.settings.batch, ENTRIES_PER_CALL))

    def resize(self, partition: int, summary: codec.Summary) -> None:
        """Twice the entries after a full call, up to MAX_ENTRIES_PER_CALL (and
        CHARGING_BATCH); back to ENTRIES_PER_CALL after one that was not."""
        size = self.size(partition)
        if summary.read >= size:
            self.sizes[partition] = min(size * 2, self.settings.batch, MAX_ENTRIES_PER_CALL)
        else:
            self.sizes.pop(partition, None)

    def report(self, keys: Keys, summary: codec.Summary) -> None:
        """One line per call at debug; dead letters at warning, refusals at error. Each
        entry's outcome is in the results stream, each dead letter's detail in its stream."""
        self.settled += summary.settled
        if not summary.read and not summary.refused and not summary.dead:
            return
        events = self.log.bind(partition=keys.partition)
        events.debug("entries_settled", read=summary.read, last_id=summary.last_id, approved=summary.approved,
                     duplicate=summary.duplicate, rejected=summary.rejected, dead=summary.dead,
                     operations={f"{op}_{result}": n for (op, result), n in summary.operations.items()},
                     refused=summary.refused)
        if summary.reclaimed:
            events.info("entries_reclaimed", count=summary.reclaimed)
        for reason, n in summary.dead.items():
            events.warning("entry_dead_lettered", reason=reason, count=n)
        if summary.refused:
            # Not acked: pending, read again after REFUSED_PAUSE_S; max_deliveries ends an endless failure.
            events.error("settle_failed", count=summary.refused, error=summary.error)

    def wait(self) -> None:
        """Nothing to do: block on the request streams of the partitions not pausing
        (XREADGROUP COUNT 1) until an entry comes, block_ms passes, or a pausing partition is
        due. The entry read stays pending to this consumer; the next round's pump settles it
        as its own. A pausing partition is not read: its unread entries would come one per
        wait, each counting a delivery nobody tried."""
        block = BURST_BLOCK_MS if self.burst else self.settings.block_ms
        now = time.monotonic()
        self.resume_at = {p: at for p, at in self.resume_at.items() if at > now}
        if self.resume_at:
            block = max(1, min(block, int((min(self.resume_at.values()) - now) * 1000) + 1))
        streams = {k.requests: ">" for k in self.active()}
        if not streams:
            time.sleep(block / 1000)
            return
        reply = run(self.client, read_streams(streams, 1, block, group=self.settings.group, consumer=self.consumer))
        for stream, messages in reply:
            for entry_id, _ in messages:
                self.waited[self.by_stream[text(stream)].partition] = text(entry_id)

    def maintain(self) -> None:
        """Every maintenance interval (the reclaim goes with that round's pump calls): the
        sweep of expired reservations, the maintainer's duties while this ACL user allows,
        and the partition gauges."""
        for keys in self.partitions:
            released = codec.expire_reservations(self.client, self.settings, keys)
            if released:
                self.log.info("reservations_expired", partition=keys.partition, count=released)
                metrics.RESERVATIONS_EXPIRED.inc(released)
            self.duties.run(keys)
            if metrics.enabled():
                metrics.record_partition(partition_status(self.client, self.settings, keys))

    def drained(self) -> bool:
        """Nothing pending in the group (after a round, whose calls found the partitions
        empty). Pending entries of other consumers are reclaimed at maintenance once they go
        idle."""
        return all(self.client.xpending(k.requests, self.settings.group)["pending"] == 0
                   for k in self.partitions)
