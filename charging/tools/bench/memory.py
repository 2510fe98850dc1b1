"""Bytes per charge: what one settled charge leaves in Redis memory (INFO used_memory before
and after a known number of charges), split into the request entry, the result entry and
the dedupe record. Everything lives in RAM, so this is the capacity budget (docs/benchmark.md)."""

from __future__ import annotations

from charging import codec
from charging.app.audit import audit
from charging.keys import all_partitions
from charging.settings import Settings
from charging.tools.bench import load as loads
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from charging.tools.bench.workers import WorkerProcesses
from producer import Producer

CHUNK = 5000
BURST_TIMEOUT_S = 600


def run(ctx: Context, profile: Profile) -> ModeResult:
    # No maintenance while measuring: the request entries must still be there to be counted.
    settings = ctx.settings_for("memory").model_copy(update={"maintenance_interval_s": 10**6})
    # No replays: every charge leaves exactly one request entry, one result entry, one dedupe record.
    load = loads.mixed(profile.accounts, profile.memory_charges, seed=6, prefix=f"{settings.namespace}-", replays=0)
    codec.set_balances(ctx.client, settings, load.balances.items())
    n = len(load)
    with ctx.task("memory: bytes/charge", 3) as advance:
        before = _used(ctx)
        producer = Producer(ctx.client, settings)
        for start in range(0, n, CHUNK):
            producer.submit(load.requests[start:start + CHUNK])
        submitted = _used(ctx)
        advance(1)
        workers = WorkerProcesses(settings, 1, ctx.out / "worker-memory.log", burst=True).start()
        if workers.wait(timeout=BURST_TIMEOUT_S) != 0:
            raise RuntimeError(f"the memory run's worker failed; see {workers.log_path}")
        settled = _used(ctx)
        streams = _stream_bytes(ctx, settings)
        advance(1)
        for keys in all_partitions(settings.namespace, settings.partitions):
            codec.trim_requests(ctx.client, settings, keys)  # what maintenance does in steady operation
        trimmed = _used(ctx)
        advance(1)
    check = audit(ctx.client, settings, load.balances, load.expected)
    per_charge = {
        "request_entry": (submitted - before) / n,
        "result_entry": streams["results"] / n,
        "total_settled": (settled - before) / n,
        "after_trimming_requests": (trimmed - before) / n,
    }
    per_charge["dedupe_record"] = per_charge["total_settled"] - per_charge["request_entry"] - per_charge["result_entry"]
    return ModeResult(
        "memory", check.outcomes, 0.0, check.as_dict(), check.ok,
        extra={"charges": n, "bytes_per_charge": {k: round(v) for k, v in per_charge.items()},
               # What a charge holds for the whole dedupe window: its record. Requests are
               # trimmed once acked, results to CHARGING_RESULTS_MAXLEN (the capacity formula).
               "per_charge": {"bytes_held": round(per_charge["dedupe_record"], 1)},
               "used_memory": {"before": before, "submitted": submitted, "settled": settled, "trimmed": trimmed}},
        notes=["INFO used_memory deltas; the result entry from MEMORY USAGE of the results streams; "
               "the dedupe record is the rest"],
    )


def _used(ctx: Context) -> int:
    return int(ctx.client.info("memory")["used_memory"])


def _stream_bytes(ctx: Context, settings: Settings) -> dict[str, int]:
    total = {"results": 0, "requests": 0}
    for keys in all_partitions(settings.namespace, settings.partitions):
        total["results"] += ctx.client.memory_usage(keys.results, samples=0) or 0
        total["requests"] += ctx.client.memory_usage(keys.requests, samples=0) or 0
    return total
