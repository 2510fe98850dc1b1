"""baseline: what a settled charge costs Redis with today's library against the frozen one
(baseline.lua, beside this module: the library as it was before the work on cost per
charge), on the same server, the same load and the same driver, so the ratio holds on a
noisy machine.

The driver is the worker's path without its process: XREADGROUP a batch, then one pipeline
of settle_batch calls of ENTRIES_PER_CALL entries each. Both libraries get the same
requests (the drain's mix, replays and poor accounts included), each in a namespace of its
own, and they take turns, a part of the load at a time; Redis's CPU time, commands
(INFO commandstats) and memory are read around each part's drain and summed per library."""

from __future__ import annotations

import math
import time
from pathlib import Path

from charging import codec
from charging.app.audit import audit
from charging.keys import Keys, all_partitions
from charging.plan import run as run_plan
from charging.schema import parse_request
from charging.settings import Settings
from charging.streams import ensure_group, text
from charging.tariff import price
from charging.tools.bench import load as loads
from charging.tools.bench.context import Context, RedisWork
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from producer import Producer
from worker.loop import ENTRIES_PER_CALL

# Bench data, not the product: the wheel carries it in this package, the engine never loads it.
SOURCE = Path(__file__).with_name("baseline.lua")
LIBRARY = "charging_baseline"
CONSUMER = "bench-baseline"
CHUNK = 5000
# The two libraries take turns, a part of the load each, so a machine that slows down or
# speeds up during the mode (a neighbour, a frequency change) weighs on both alike.
ROUNDS = 4
NOTHING = RedisWork(0.0, {}, 0)


def run(ctx: Context, profile: Profile) -> ModeResult:
    charges = profile.drain_charges // 3
    libraries = {"frozen": (ctx.settings_for("baseline0"), settle_frozen),
                 "today": (ctx.settings_for("baseline1"), codec.settle_batch)}
    today = libraries["today"][0]
    load = loads.mixed(profile.accounts, charges, seed=8, prefix=f"{today.namespace}-")
    work, seconds = dict.fromkeys(libraries, NOTHING), dict.fromkeys(libraries, 0.0)
    part = math.ceil(len(load) / ROUNDS)
    ctx.client.function_load(SOURCE.read_text(), replace=True)
    try:
        for settings, _ in libraries.values():
            _prepare(ctx, settings, load)
        with ctx.task("baseline", 2 * len(load)) as advance:
            for start in range(0, len(load), part):
                for name, (settings, settle_batch) in libraries.items():
                    done, took = _drain(ctx, settings, load.requests[start:start + part], settle_batch, advance)
                    work[name], seconds[name] = work[name] + done, seconds[name] + took
    finally:
        ctx.client.function_delete(LIBRARY)
    check = audit(ctx.client, today, load.balances, load.expected)
    spent, baseline = (NOTHING.per_charge(work[name], len(load)) for name in ("today", "frozen"))
    ratio = baseline["redis_cpu_us"] / spent["redis_cpu_us"] if spent.get("redis_cpu_us") else None
    return ModeResult(
        "baseline", check.outcomes, seconds["today"], check.as_dict(), check.ok,
        extra={"per_charge": spent | {f"baseline_{name}": value for name, value in baseline.items()},
               "baseline_cpu_ratio": None if ratio is None else round(ratio, 2)},
        notes=[f"one driver, one load, two libraries taking turns ({ROUNDS} rounds): "
               "charging/tools/bench/baseline.lua (frozen) and lua/charging.lua; "
               "baseline_cpu_ratio = baseline_redis_cpu_us / redis_cpu_us"],
    )


def settle_frozen(target, settings: Settings, keys: Keys, items) -> None:
    """codec.settle_batch's call, made to the frozen library: its settle_batch predates the
    holds index, so it takes the partition's keys without that one, then the same entries."""
    names, args = codec.batch_entries(settings, keys, items)
    names = [keys.balances, keys.results, keys.requests, keys.held, keys.reservations, keys.expiries, *names]
    target.fcall("baseline_settle_batch", len(names), *names, *args)


def _prepare(ctx: Context, settings: Settings, load: loads.Load) -> None:
    codec.set_balances(ctx.client, settings, load.balances.items())
    for keys in all_partitions(settings.namespace, settings.partitions):
        run_plan(ctx.client, ensure_group(keys.requests, settings.group))


def _drain(ctx: Context, settings: Settings, requests: list[dict], settle_batch, advance) -> tuple[RedisWork, float]:
    """Submit requests, then settle them batch by batch: Redis's work, and the seconds."""
    producer = Producer(ctx.client, settings)
    for start in range(0, len(requests), CHUNK):
        producer.submit(requests[start:start + CHUNK])
    partitions = {k.requests: k for k in all_partitions(settings.namespace, settings.partitions)}
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
    return ctx.redis_work() - before, seconds
