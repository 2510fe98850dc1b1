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
from collections import Counter as Tally
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from charging.errors import ChargingError
from charging.schema import Invalid

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

PROCESSED = Counter("charging_entries_processed", "Entries settled: charged, rejected, dead-lettered, or found "
                                                  "already settled by another consumer.")
APPROVED = Counter("charging_charges_approved", "Charges approved (replays of a request id not included).")
REJECTED = Counter("charging_charges_rejected", "Charges rejected, by reason (replays not included, "
                                                "idempotency conflicts included).", ["reason"])
DEAD_LETTERED = Counter("charging_dead_letters", "Entries moved to the dead-letter stream, by reason.", ["reason"])
DUPLICATES = Counter("charging_duplicates", "Replayed request ids answered with the stored outcome.")
ALREADY_SETTLED = Counter("charging_entries_already_settled", "Entries another consumer had settled first.")
SETTLE_ERRORS = Counter("charging_settle_errors", "Function calls that failed; the entry stays pending.")
RECLAIMED = Counter("charging_entries_reclaimed", "Entries taken over from idle consumers (XAUTOCLAIM).")
RESERVATION_OPS = Counter("charging_reservation_operations", "Reservation operations (reserve, extend, commit, "
                                                             "release) by result: approved, duplicate, or the "
                                                             "rejection reason.", ["op", "result"])
RESERVATIONS_EXPIRED = Counter("charging_reservations_expired", "Reservations released by the worker's sweep "
                                                                "after their expiry (releases by other calls on "
                                                                "the same partition not included).")
BATCH_SIZE = Histogram("charging_batch_size", "Entries per settled batch.",
                       buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
BATCH_SECONDS = Histogram("charging_batch_seconds", "Time to judge and settle one batch (one round trip).",
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


def prepare_multiprocess() -> str:
    """A fresh directory for the consumers' metric files; call before starting them."""
    path = tempfile.mkdtemp(prefix="charging-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def serve_multiprocess(port: int, path: str) -> None:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    _listen(port, registry)


def _listen(port: int, registry: CollectorRegistry) -> None:
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        raise MetricsPortUnavailable(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from None


def process_dead(pid: int) -> None:
    """Forget a dead consumer's gauges (its counters still count)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def remove_multiprocess(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def record_batch(plan: list, replies: list, seconds: float) -> None:
    """Count one settled batch from the function replies. Tallied first, so a batch of
    500 costs a handful of metric updates, not 500."""
    BATCH_SIZE.observe(len(plan))
    BATCH_SECONDS.observe(seconds)
    tally: Tally = Tally()
    for work, reply in zip(plan, replies):
        tally[_kind(work, reply)] += 1
    for (kind, *labels), n in tally.items():
        if kind != "error":
            PROCESSED.inc(n)
        (_BY_LABEL[kind].labels(*labels) if kind in _BY_LABEL else _PLAIN[kind]).inc(n)


_BY_LABEL = {"rejected": REJECTED, "dead": DEAD_LETTERED, "reservation": RESERVATION_OPS}
_PLAIN = {"error": SETTLE_ERRORS, "approved": APPROVED, "duplicate": DUPLICATES, "stale": ALREADY_SETTLED}


def _kind(work: Any, reply: Any) -> tuple[str, ...]:
    if isinstance(reply, Exception):
        return ("error",)
    if isinstance(work, Invalid):
        return ("dead", work.reason) if reply else ("stale",)
    if reply.stale:
        return ("stale",)
    reason = reply.reason
    result = "duplicate" if reply.replayed else (reason or "approved")
    op = work[0].op
    if op != "charge":
        return "reservation", op, result
    return (result,) if result in ("duplicate", "approved") else ("rejected", reason)


def dead_lettered(reason: str) -> None:
    """A dead letter written outside a batch (an entry deleted before it was claimed)."""
    PROCESSED.inc()
    DEAD_LETTERED.labels(reason).inc()


def record_partition(status: dict) -> None:
    """Gauges from charging.streams.partition_status."""
    partition = str(status["partition"])
    LAG.labels(partition).set(math.nan if status["lag"] is None else status["lag"])
    PENDING.labels(partition).set(status["pending"])
    age = status["oldest_pending_age_ms"]
    OLDEST_PENDING.labels(partition).set(0 if age is None else age / 1000)
