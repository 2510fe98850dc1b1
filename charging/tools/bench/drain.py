"""drain: preload the request stream, then start the workers and time how fast they empty it.
The rate spans the first to the last outcome (the server's clock), so worker start-up
(Python imports, connecting) is not counted against it."""

from __future__ import annotations

import time

from charging import codec
from charging.app.audit import audit
from charging.tools.bench import load as loads
from charging.tools.bench.context import Context
from charging.tools.bench.outcomes import cpu_per_charge, timings, wait_for_outcomes
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from charging.tools.bench.workers import WorkerProcesses
from producer import Producer

CHUNK = 5000


def run(ctx: Context, profile: Profile) -> ModeResult:
    settings = ctx.settings_for("drain")
    load = loads.mixed(profile.accounts, profile.drain_charges, seed=1, prefix=f"{settings.namespace}-")
    codec.set_balances(ctx.client, settings, load.balances.items())
    producer = Producer(ctx.client, settings)
    began = time.perf_counter()
    with ctx.task("drain: preload", len(load)) as advance:
        for start in range(0, len(load), CHUNK):
            chunk = load.requests[start:start + CHUNK]
            producer.submit(chunk)
            advance(len(chunk))
    preload_s = time.perf_counter() - began
    before = ctx.redis_work()
    workers = WorkerProcesses(settings, profile.workers, ctx.out / "worker-drain.log", burst=True).start()
    try:
        with ctx.task(f"drain: {profile.workers} workers", len(load)) as advance:
            wait_for_outcomes(ctx, settings, len(load), workers, advance)
        exit_code = workers.wait()
    finally:
        workers.stop()
    after = ctx.redis_work()
    times = timings(ctx, settings)
    check = audit(ctx.client, settings, load.balances, load.expected)
    return ModeResult(
        "drain", len(times.processed_ms), times.span_s(), check.as_dict(), check.ok,
        done_at_s=times.done_at_s(times.first_ms),
        extra={"workers": profile.workers, "preloaded": len(load), "preload_rate_per_s": round(len(load) / preload_s),
               "worker_peak_rss_mb": workers.peak_rss(), "worker_exit_code": exit_code,
               "cpu_us_per_charge": cpu_per_charge(len(load), redis=after.cpu_s - before.cpu_s,
                                                   workers=workers.cpu_seconds()),
               "per_charge": before.per_charge(after, len(load))},
    )
