"""baseline: what a settled charge costs Redis with today's library against the frozen one
(baseline.lua, beside this module: the library as it was before the work on cost per
charge), on the same server, the same load and the same driver, so the ratio holds on a
noisy machine.

The driver is the worker's path without its process. Today's library: one pipeline of pump
calls of ENTRIES_PER_CALL entries each, one per partition, until they read nothing (what a
worker sends). The frozen library, which cannot read its own entries: XREADGROUP a batch,
then one pipeline of its settle_batch calls of ENTRIES_PER_CALL entries each. Both get the same
requests (the drain's mix, replays and poor accounts included), each in a namespace of its
own, and they take turns, a part of the load at a time; Redis's CPU time, commands
(INFO commandstats) and memory are read around each part's drain and summed per library."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from charging import codec
from charging.app.audit import audit
from charging.keys import Keys, all_partitions
from charging.plan import run as run_plan
from charging.schema import ChargeRequest, parse_request
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
    libraries = {"frozen": (ctx.settings_for("baseline0"), _settle_frozen),
                 "today": (ctx.settings_for("baseline1"), pump_all)}
    today = libraries["today"][0]
    load = loads.mixed(profile.accounts, charges, seed=8, prefix=f"{today.namespace}-")
    work, seconds = dict.fromkeys(libraries, NOTHING), dict.fromkeys(libraries, 0.0)
    part = math.ceil(len(load) / ROUNDS)
    ctx.client.function_load(SOURCE.read_text(), replace=True)
    try:
        for settings, _ in libraries.values():
            prepare(ctx, settings, load)
        with ctx.task("baseline", 2 * len(load)) as advance:
            for start in range(0, len(load), part):
                for name, (settings, settle) in libraries.items():
                    done, took = drain_part(ctx, settings, load.requests[start:start + part], settle, advance)
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


def settle_frozen(target, settings: Settings, keys: Keys,
                  items: Sequence[tuple[ChargeRequest, int | None, str]]) -> None:
    """The frozen library's settle_batch call for (request, amount, entry_id) items of one
    partition: the partition's keys (the holds index did not exist yet), then per entry its
    record key (the layout of that version) and its reply stream if any; per entry its op,
    whether it has a reply stream, and the 13 arguments of a settling call."""
    names = [keys.balances, keys.results, keys.requests, keys.held, keys.reservations, keys.expiries]
    args: list = []
    for request, amount, entry_id in items:
        names.append(f"{keys.tag}:seen:{request.request_id}")
        if request.reply_to:
            names.append(request.reply_to)
        args += (request.op, 1 if request.reply_to else 0,
                 *codec.settle_arguments(settings, request, amount, entry_id)[:13])
    target.fcall("baseline_settle_batch", len(names), *names, *args)


def prepare(ctx: Context, settings: Settings, load: loads.Load) -> None:
    codec.set_balances(ctx.client, settings, load.balances.items())
    for keys in all_partitions(settings.namespace, settings.partitions):
        run_plan(ctx.client, ensure_group(keys.requests, settings.group))


def drain_part(ctx: Context, settings: Settings, requests: list[dict], settle, advance) -> tuple[RedisWork, float]:
    """Submit requests, then settle them all: Redis's work, and the seconds."""
    producer = Producer(ctx.client, settings)
    for start in range(0, len(requests), CHUNK):
        producer.submit(requests[start:start + CHUNK])
    before, began = ctx.redis_work(), time.perf_counter()
    settle(ctx, settings, advance)
    seconds = time.perf_counter() - began
    return ctx.redis_work() - before, seconds


def pump_all(ctx: Context, settings: Settings, advance) -> None:
    """Today's library: pump calls, one per partition in a pipeline, until none reads anything."""
    todo = all_partitions(settings.namespace, settings.partitions)
    while todo:
        pipe = ctx.client.pipeline(transaction=False)
        for keys in todo:
            codec.pump(pipe, settings, keys, CONSUMER, ENTRIES_PER_CALL)
        summaries = [codec.summary(reply) for reply in pipe.execute()]
        advance(sum(s.read for s in summaries))
        todo = [keys for keys, s in zip(todo, summaries) if s.read]


def _settle_frozen(ctx: Context, settings: Settings, advance) -> None:
    """The frozen library: XREADGROUP a batch, then its settle_batch calls, until nothing is left."""
    partitions = {k.requests: k for k in all_partitions(settings.namespace, settings.partitions)}
    while batch := ctx.client.xreadgroup(settings.group, CONSUMER, dict.fromkeys(partitions, ">"),
                                         count=settings.batch):
        pipe = ctx.client.pipeline(transaction=False)
        for stream, entries in batch:
            items = []
            for entry_id, fields in entries:
                request = parse_request(fields, settings)
                items.append((request, price(request, settings), entry_id.decode()))
            for start in range(0, len(items), ENTRIES_PER_CALL):
                settle_frozen(pipe, settings, partitions[text(stream)], items[start:start + ENTRIES_PER_CALL])
            advance(len(entries))
        pipe.execute()
