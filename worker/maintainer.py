"""The maintainer's duties (docs/security.md): trimming the streams, forgetting idle
consumers, repairing what a client's XADD arguments can do to a request stream
(lua/charging.lua `repair`) and reporting groups on it other than the workers'. The
first three need rights that let a client drop entries or load code, so in
deploy/users.acl only the maintainer role holds them: `charging maintain` runs the
duties under it. A worker runs them too while its own ACL user allows, and
leaves each to the maintainer at its first NOPERM, so one process with one user (a
laptop, the demo) still does everything."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from charging import codec
from charging.connection import TRANSIENT_ERRORS, Backoff, missing_function, reload_functions
from charging.keys import Keys
from charging.log import logger
from charging.plan import run
from charging.settings import Settings
from charging.streams import stray_groups, text

log = logger("charging.maintainer")

IDLE_CONSUMER_MS = 3_600_000  # a consumer silent for an hour with nothing pending is gone


class Duties:
    """The duties on one partition at a time. strict: a NOPERM is an error (the maintainer's
    own user must hold every right); else the refused duty is left to the maintainer."""

    def __init__(self, client: redis.Redis, settings: Settings, events, consumer: str | None = None,
                 strict: bool = False):
        self.client = client
        self.settings = settings
        self.log = events
        self.consumer = consumer  # the worker's own name, never forgotten as idle
        self.strict = strict
        self.refused: set[str] = set()
        self.strays_reported: set[tuple[int, str]] = set()  # (partition, group): said once

    def run(self, keys: Keys) -> None:
        for name, duty in (("repair", self.repair), ("trim", self.trim),
                           ("forget_idle_consumers", self.forget_idle_consumers),
                           ("report_stray_groups", self.report_stray_groups)):
            if name in self.refused:
                continue
            try:
                duty(keys)
            except redis.exceptions.NoPermissionError as exc:
                if self.strict:
                    raise
                self.refused.add(name)
                self.log.info("duty_left_to_maintainer", duty=name, error=str(exc))

    def repair(self, keys: Keys) -> None:
        removed, rewound = codec.repair(self.client, self.settings, keys)
        if removed:
            self.log.error("entries_removed", partition=keys.partition, count=removed)
        if rewound:
            self.log.warning("requests_rewound", partition=keys.partition)

    def trim(self, keys: Keys) -> None:
        trimmed = codec.trim_requests(self.client, self.settings, keys)
        if trimmed:
            self.log.debug("requests_trimmed", partition=keys.partition, count=trimmed)
        trimmed = codec.trim_results(self.client, self.settings, keys)
        if trimmed:
            self.log.debug("results_trimmed", partition=keys.partition, count=trimmed)

    def forget_idle_consumers(self, keys: Keys) -> None:
        """Delete consumers idle for an hour, only once their pending list is empty: XGROUP
        DELCONSUMER would strand pending entries."""
        try:
            consumers = self.client.xinfo_consumers(keys.requests, self.settings.group)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):
                return  # no worker has read this partition yet
            raise
        for consumer in consumers:
            name = text(consumer["name"])
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > IDLE_CONSUMER_MS:
                self.client.xgroup_delconsumer(keys.requests, self.settings.group, name)
                self.log.info("idle_consumer_removed", removed=name, partition=keys.partition)


    def report_stray_groups(self, keys: Keys) -> None:
        """A group on the request stream other than the workers' holds nothing back (trim and
        repair pass it by) but whoever reads it misses entries: say so, once per group."""
        try:
            groups = self.client.xinfo_groups(keys.requests)
        except redis.ResponseError as exc:
            if "no such key" in str(exc):
                return  # no stream yet
            raise
        for name in stray_groups(groups, self.settings.group):
            if (keys.partition, name) not in self.strays_reported:
                self.strays_reported.add((keys.partition, name))
                self.log.warning("stray_group_found", partition=keys.partition, group=name,
                                 hint="no worker reads it; trimming and repair pass it by; remove it "
                                      "with XGROUP DESTROY once its reader is found")


class Maintainer:
    """`charging maintain`: the duties on every partition, every maintenance interval, until
    stopped (or one round with once)."""

    def __init__(self, client: redis.Redis, settings: Settings, partitions: Iterable[int] | None = None,
                 once: bool = False):
        owned = range(settings.partitions) if partitions is None else partitions
        self.partitions = [Keys(settings.namespace, p) for p in owned]
        self.client = client
        self.once = once
        self.stopping = False
        self.duties = Duties(client, settings, log, strict=True)
        self.interval = settings.maintenance_interval_s
        self.unavailable = log.bind(redis=str(settings.redis_url))  # names the server down, without its password

    def stop(self, *_) -> None:
        self.stopping = True

    def run(self) -> int:
        log.info("maintainer_started", partitions=[k.partition for k in self.partitions], once=self.once)
        backoff = Backoff()
        while not self.stopping:
            try:
                for keys in self.partitions:
                    self.duties.run(keys)
                backoff.reset()
            except TRANSIENT_ERRORS as exc:
                backoff.wait(self.unavailable, exc)
                continue
            except redis.ResponseError as exc:
                if not missing_function(exc) or not run(self.client, reload_functions(exc)):
                    raise
                continue  # the server came back empty: loaded again, so the round again
            if self.once:
                break
            self._sleep()
        log.info("maintainer_stopped")
        return 0

    def _sleep(self) -> None:
        """The interval, cut short by a stop."""
        deadline = time.monotonic() + self.interval
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, self.interval))
