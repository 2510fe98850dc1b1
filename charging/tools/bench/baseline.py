"""baseline: what a settled charge costs Redis with today's library against the frozen one
(lua/baseline.lua, the library as it was before the work on cost per charge), on the same
server, the same load and the same driver, so the ratio holds on a noisy machine.

The driver is the worker's path without its process: XREADGROUP a batch, then one pipeline
of settle_batch calls of ENTRIES_PER_CALL entries each. Both libraries get the same
requests (the drain's mix, replays and poor accounts included), each in a namespace of its
own; Redis's CPU time, commands (INFO commandstats) and memory are read around each drain."""

from __future__ import annotations

import time
from functools import partial

from charging import codec
from charging.app.audit import audit
from charging.connection import library_source
from charging.keys import all_partitions
from charging.plan import run as run_plan
from charging.schema import parse_request
from charging.settings import Settings
from charging.streams import ensure_group, text
from charging.tariff import price
from charging.tools.bench import load as loads
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from producer import Producer
from worker.loop import ENTRIES_PER_CALL

LIBRARY = "charging_baseline"
CONSUMER = "bench-baseline"
CHUNK = 5000


def run(ctx: Context, profile: Profile) -> ModeResult:
    charges = profile.drain_charges // 3
    frozen, today = ctx.settings_for("baseline0"), ctx.settings_for("baseline1")
    load = loads.mixed(profile.accounts, charges, seed=8, prefix=f"{today.namespace}-")
    ctx.client.function_load(library_source("baseline"), replace=True)
    try:
        with ctx.task("baseline: frozen", len(load)) as advance:
            baseline, _ = _drain(ctx, frozen, load, partial(codec.settle_batch, baseline=True), advance)
        with ctx.task("baseline: today", len(load)) as advance:
            spent, seconds = _drain(ctx, today, load, codec.settle_batch, advance)
    finally:
        ctx.client.function_delete(LIBRARY)
    check = audit(ctx.client, today, load.balances, load.expected)
    ratio = baseline["redis_cpu_us"] / spent["redis_cpu_us"] if spent.get("redis_cpu_us") else None
    return ModeResult(
        "baseline", check.outcomes, seconds, check.as_dict(), check.ok,
        extra={"per_charge": spent | {f"baseline_{name}": value for name, value in baseline.items()},
               "baseline_cpu_ratio": None if ratio is None else round(ratio, 2)},
        notes=["one driver, one load, two libraries: lua/baseline.lua (frozen) and lua/charging.lua; "
               "baseline_cpu_ratio = baseline_redis_cpu_us / redis_cpu_us"],
    )


def _drain(ctx: Context, settings: Settings, load: loads.Load, settle_batch, advance) -> tuple[dict, float]:
    """Preload the load, then settle it batch by batch: Redis's work per charge, and the seconds."""
    codec.set_balances(ctx.client, settings, load.balances.items())
    producer = Producer(ctx.client, settings)
    for start in range(0, len(load), CHUNK):
        producer.submit(load.requests[start:start + CHUNK])
    partitions = {k.requests: k for k in all_partitions(settings.namespace, settings.partitions)}
    for name in partitions:
        run_plan(ctx.client, ensure_group(name, settings.group))
    before, began = ctx.redis_work(), time.perf_counter()
    while batch := ctx.client.xreadgroup(settings.group, CONSUMER, dict.fromkeys(partitions, ">"),
                                         count=settings.batch):
        pipe = ctx.client.pipeline(transaction=False)
        for stream, entries in batch:
            items = []
            for entry_id, fields in entries:
                request = parse_request(fields, settings)
                items.append((request, price(request, settings), entry_id.decode()))
            for start in range(0, len(items), ENTRIES_PER_CALL):
                settle_batch(pipe, settings, partitions[text(stream)], items[start:start + ENTRIES_PER_CALL])
            advance(len(entries))
        pipe.execute()
    seconds = time.perf_counter() - began
    return before.per_charge(ctx.redis_work(), len(load)), seconds
