"""steady: producers submit at a fixed offered rate while the workers run; throughput and
submit -> result latency (the request's submitted_at to the outcome's processed_at, both in
whole milliseconds of the same machine's clock). One run per offered rate of the profile:
the target rate first, then a lighter load to show the latency when not saturated."""

from __future__ import annotations

import multiprocessing
import time

import redis

from charging import codec
from charging import log as logging_setup
from charging.app.audit import audit
from charging.connection import connect
from charging.keys import Keys
from charging.settings import Settings
from charging.tools.bench import load as loads
from charging.tools.bench.context import POLL_S, Context
from charging.tools.bench.outcomes import cpu_per_charge, timings, wait_for_outcomes
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from charging.tools.bench.workers import WorkerProcesses
from producer import Producer

START_DELAY_S = 1.5  # producers import and connect before the clock starts
CHUNK = 1000  # at most this many requests per submit (one pipeline)
READY_TIMEOUT_S = 60


def run(ctx: Context, profile: Profile) -> list[ModeResult]:
    return [_run(ctx, profile, rate, seed=10 + i) for i, rate in enumerate(profile.steady_rates)]


def _run(ctx: Context, profile: Profile, rate: int, seed: int) -> ModeResult:
    ctx.reset()
    settings = ctx.settings_for(f"steady{rate}")
    load = loads.mixed(profile.accounts, int(rate * profile.steady_seconds), seed=seed,
                       prefix=f"{settings.namespace}-")
    codec.set_balances(ctx.client, settings, load.balances.items())
    workers = WorkerProcesses(settings, profile.workers, ctx.out / f"worker-steady{rate}.log").start()
    try:
        _wait_until_consuming(ctx, settings, workers, profile.workers)
        before = ctx.redis_work()
        workers.sample()
        worker_cpu = workers.cpu_seconds()
        producers = Producers(settings, load, rate, profile.producers)
        with ctx.task(f"steady: {rate:,}/s offered", len(load)) as advance:
            wait_for_outcomes(ctx, settings, len(load), workers, advance, busy=producers.busy)
        producers.join()
        workers.sample()
        worker_cpu = workers.cpu_seconds() - worker_cpu
        after = ctx.redis_work()
    finally:
        exit_code = workers.stop()
    times = timings(ctx, settings)
    start_ms = int(producers.start_at * 1000)
    check = audit(ctx.client, settings, load.balances, load.expected)
    return ModeResult(
        f"steady {rate / 1000:g}k/s", len(times.processed_ms), times.span_s(since_ms=start_ms), check.as_dict(),
        check.ok and producers.submitted.value == len(load),
        latencies_ms=times.latencies_ms(), done_at_s=times.done_at_s(start_ms),
        extra={"offered_rate_per_s": rate, "submit_rate_per_s": round(producers.submit_rate()),
               "producers": profile.producers, "workers": profile.workers, "submitted": producers.submitted.value,
               "worker_peak_rss_mb": workers.peak_rss(), "worker_exit_code": exit_code,
               "cpu_us_per_charge": cpu_per_charge(len(load), redis=after.cpu_s - before.cpu_s, workers=worker_cpu,
                                                   producers=producers.cpu.value),
               "per_charge": before.per_charge(after, len(load))},
        notes=["latency resolution is 1 ms (submitted_at and processed_at are whole ms); "
               "the rate spans the first submit to the last outcome"],
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


class Producers:
    """Producer processes, each submitting its share of the load at its share of the rate."""

    def __init__(self, settings: Settings, load: loads.Load, rate: int, processes: int):
        ctx = multiprocessing.get_context("spawn")
        self.submitted = ctx.Value("q", 0)
        self.cpu = ctx.Value("d", 0.0)  # CPU seconds, summed over the producers
        self.finished_at = ctx.Value("d", 0.0)  # wall clock of the last producer to finish
        self.start_at = time.time() + START_DELAY_S
        counters = (self.submitted, self.cpu, self.finished_at)
        self.procs = [ctx.Process(target=_produce, args=(settings.model_dump(), load.requests[i::processes],
                                                         rate / processes, self.start_at, *counters))
                      for i in range(processes)]
        for proc in self.procs:
            proc.start()

    def busy(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def join(self) -> None:
        for proc in self.procs:
            proc.join()

    def submit_rate(self) -> float:
        return self.submitted.value / max(self.finished_at.value - self.start_at, 1e-3)


def _produce(settings_dump: dict, requests: list[dict], rate: float, start_at: float,
             submitted, cpu_s, finished_at) -> None:
    """One producer process: submit at `rate` per second, in small pipelined chunks."""
    logging_setup.configure("warning")
    settings = Settings(**settings_dump)
    producer = Producer(connect(settings, load=False), settings)
    time.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
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
    with cpu_s.get_lock():
        cpu_s.value += time.process_time() - cpu
    with finished_at.get_lock():
        finished_at.value = max(finished_at.value, time.time())
