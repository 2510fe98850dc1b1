"""steady: producers submit at a fixed offered rate while the workers run; throughput and
submit -> result latency (the request's submitted_at to the outcome's processed_at, both in
whole milliseconds of the same machine's clock)."""

from __future__ import annotations

import multiprocessing
import time

import redis

from bench import load as loads
from bench.context import POLL_S, Context
from bench.outcomes import timings, wait_for_outcomes
from bench.profile import Profile
from bench.result import ModeResult
from bench.workers import WorkerProcesses
from charging import functions
from charging import log as logging_setup
from charging.audit import audit
from charging.connection import connect
from charging.keys import Keys
from charging.settings import Settings
from producer import Producer

START_DELAY_S = 1.5  # producers import and connect before the clock starts
CHUNK = 1000  # at most this many requests per submit (one pipeline)
READY_TIMEOUT_S = 60


def run(ctx: Context, profile: Profile) -> ModeResult:
    settings = ctx.settings_for("steady")
    charges = int(profile.steady_rate * profile.steady_seconds)
    load = loads.mixed(profile.accounts, charges, seed=2, prefix=f"{settings.namespace}-")
    functions.set_balances(ctx.client, settings, load.balances.items())
    workers = WorkerProcesses(settings, profile.workers, ctx.out / "worker-steady.log").start()
    try:
        _wait_until_consuming(ctx, settings, workers, profile.workers)
        submitted, start_at, producers = _start_producers(settings, load, profile)
        with ctx.task(f"steady: {profile.steady_rate:,}/s", len(load)) as advance:
            wait_for_outcomes(ctx, settings, len(load), workers, advance,
                              busy=lambda: any(p.is_alive() for p in producers))
        for proc in producers:
            proc.join()
    finally:
        exit_code = workers.stop()
    times = timings(ctx, settings)
    start_ms = int(start_at * 1000)
    check = audit(ctx.client, settings, load.balances, load.expected)
    return ModeResult(
        "steady", len(times.processed_ms), times.span_s(since_ms=start_ms), check.as_dict(),
        check.ok and submitted.value == len(load),
        latencies_ms=times.latencies_ms(), done_at_s=times.done_at_s(start_ms),
        extra={"offered_rate_per_s": profile.steady_rate, "producers": profile.producers, "workers": profile.workers,
               "submitted": submitted.value, "worker_peak_rss_mb": workers.peak_rss(), "worker_exit_code": exit_code},
        notes=["latency resolution is 1 ms (submitted_at and processed_at are whole ms)"],
    )


def _wait_until_consuming(ctx: Context, settings: Settings, workers: WorkerProcesses, processes: int) -> None:
    """Producers start only once every worker has joined the group, so start-up is not latency."""
    stream = Keys(settings.namespace, 0).requests
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and workers.running():
        try:
            if len(ctx.client.xinfo_consumers(stream, settings.group)) >= processes:
                return
        except redis.ResponseError:  # no stream or group yet
            pass
        time.sleep(POLL_S)
    raise RuntimeError(f"workers did not join the group within {READY_TIMEOUT_S}s; see {workers.log_path}")


def _start_producers(settings: Settings, load: loads.Load, profile: Profile):
    ctx = multiprocessing.get_context("spawn")
    submitted = ctx.Value("q", 0)
    start_at = time.time() + START_DELAY_S
    rate = profile.steady_rate / profile.producers
    producers = [ctx.Process(target=_produce, args=(settings.model_dump(), load.requests[i::profile.producers],
                                                    rate, start_at, submitted))
                 for i in range(profile.producers)]
    for proc in producers:
        proc.start()
    return submitted, start_at, producers


def _produce(settings_dump: dict, requests: list[dict], rate: float, start_at: float, submitted) -> None:
    """One producer process: submit at `rate` per second, in small pipelined chunks."""
    logging_setup.configure("warning")
    settings = Settings(**settings_dump)
    producer = Producer(connect(settings, load=False), settings)
    time.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    sent = 0
    while sent < len(requests):
        due = min(len(requests), int((time.perf_counter() - began) * rate) + 1, sent + CHUNK)
        if due <= sent:
            time.sleep(0.0005)
            continue
        producer.submit(requests[sent:due])
        with submitted.get_lock():
            submitted.value += due - sent
        sent = due
