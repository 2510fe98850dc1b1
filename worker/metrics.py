"""Prometheus metrics of the worker, served by `charging worker --metrics-port P`.

With --processes N the consumers are separate processes: they write their metrics to
files in a directory (prometheus-client multiprocess mode) and the supervisor serves the
sum of them all on the one port. The directory is set in the environment before the
consumers start, because prometheus-client picks its storage when it is imported.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from charging import codec
from charging.errors import ChargingError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

PROCESSED = Counter("charging_entries_processed", "Entries settled: charged, rejected, dead-lettered, or found "
                                                  "already settled by another consumer.")
APPROVED = Counter("charging_charges_approved", "Charges approved (replays of a request id not included).")
REJECTED = Counter("charging_charges_rejected", "Charges rejected, by reason (replays not included, "
                                                "idempotency conflicts included).", ["reason"])
DEAD_LETTERED = Counter("charging_dead_letters", "Entries moved to the dead-letter stream, by reason.", ["reason"])
DUPLICATES = Counter("charging_duplicates", "Replayed request ids answered with the stored outcome.")
SETTLE_ERRORS = Counter("charging_settle_errors", "Function calls that failed; the entry stays pending.")
RECLAIMED = Counter("charging_entries_reclaimed", "Entries taken over from idle consumers (XAUTOCLAIM).")
RESERVATION_OPS = Counter("charging_reservation_operations", "Reservation operations (reserve, extend, commit, "
                                                             "release) by result: approved, duplicate, or the "
                                                             "rejection reason.", ["op", "result"])
RESERVATIONS_EXPIRED = Counter("charging_reservations_expired", "Reservations released by the worker's sweep "
                                                                "after their expiry (releases by other calls on "
                                                                "the same partition not included).")
BATCH_SIZE = Histogram("charging_batch_size", "Entries read per pump call (calls that read none not counted).",
                       buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_SECONDS = Histogram("charging_batch_seconds", "Time of one pump call that read entries (its share of the round trip).",
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
# Gauges read from Redis at maintenance; every consumer reads the same group, so the
# multiprocess value is the most recent one of a live process.
LAG = Gauge("charging_consumer_lag", "Entries of the request stream not yet delivered to the group "
                                     "(NaN when Redis cannot tell).", ["partition"], multiprocess_mode="livemostrecent")
PENDING = Gauge("charging_pending_entries", "Entries delivered but not yet settled.", ["partition"],
                multiprocess_mode="livemostrecent")
OLDEST_PENDING = Gauge("charging_oldest_pending_age_seconds", "Age of the oldest pending entry (0 when none).",
                       ["partition"], multiprocess_mode="livemostrecent")

_enabled = False


def enable() -> None:
    """Record the Redis-side gauges at maintenance (a few reads per partition)."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    return _enabled


class MetricsPortUnavailable(ChargingError, RuntimeError):
    pass


def serve(port: int) -> None:
    """Serve this process's metrics on port (all interfaces: containers are scraped from outside)."""
    enable()
    _listen(port, REGISTRY)


@contextmanager
def multiprocess_served(port: int) -> Iterator[str]:
    """Serve the sum of the consumers' metrics on port while the block runs; yields the
    directory of their metric files (set in the environment: start the consumers inside
    the block). The directory is removed on every way out, a busy port included."""
    path = tempfile.mkdtemp(prefix="charging-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        _listen(port, registry)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        del os.environ[MULTIPROC_ENV]


def _listen(port: int, registry: CollectorRegistry) -> None:
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        raise MetricsPortUnavailable(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from None


def process_dead(pid: int) -> None:
    """Forget a dead consumer's gauges (its counters still count)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def record_summary(summary: codec.Summary, seconds: float) -> None:
    """Count one pump call from its summary: a handful of metric updates, whatever it settled."""
    if summary.read:
        BATCH_SIZE.observe(summary.read)
        BATCH_SECONDS.observe(seconds)
    APPROVED.inc(summary.approved)
    DUPLICATES.inc(summary.duplicate)
    SETTLE_ERRORS.inc(summary.refused)
    RECLAIMED.inc(summary.reclaimed)
    for reason, n in summary.rejected.items():
        REJECTED.labels(reason).inc(n)
    for reason, n in summary.dead.items():
        DEAD_LETTERED.labels(reason).inc(n)
    for (op, result), n in summary.operations.items():
        RESERVATION_OPS.labels(op, result).inc(n)
    processed = (summary.approved + summary.duplicate + sum(summary.rejected.values())
                 + sum(summary.dead.values()) + sum(summary.operations.values()))
    if processed:
        PROCESSED.inc(processed)


def record_partition(status: dict) -> None:
    """Gauges from charging.streams.partition_status."""
    partition = str(status["partition"])
    LAG.labels(partition).set(math.nan if status["lag"] is None else status["lag"])
    PENDING.labels(partition).set(status["pending"])
    age = status["oldest_pending_age_ms"]
    OLDEST_PENDING.labels(partition).set(0 if age is None else age / 1000)
