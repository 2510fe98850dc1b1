"""ceiling: the most Redis itself does of this work. redis-benchmark (many clients,
pipelined) calls the same `charge` function the workers and authorize call, each with a
new random request id, so every call takes the full path (dedupe miss, balance check,
deduct, outcome XADD). Without redis-benchmark: a labelled estimate from Python.

The entry_id argument is empty (the authorize form: nothing to XACK), and redis-benchmark
cannot put one random id into two arguments, so the request id and the old layout's record
key are two random numbers: the checker verifies money and balances here, not one outcome
per request id."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time

from charging import codec
from charging.app.audit import audit
from charging.keys import keys_of
from charging.schema import parse_request
from charging.settings import Settings
from charging.tools.bench.context import POLL_S, Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult

ACCOUNT = "ceiling"
BALANCE = 10**14
PRICE = 10
CLIENTS = 50
PIPELINE = 16
RANDOM_RANGE = 2**31 - 1  # redis-benchmark's -r is a C int
ESTIMATE_CHUNK = 1000


def run(ctx: Context, profile: Profile) -> ModeResult:
    settings = ctx.settings_for("ceiling")
    codec.set_balances(ctx.client, settings, [(ACCOUNT, BALANCE)])
    if shutil.which("redis-benchmark"):
        result = _redis_benchmark(ctx, settings, profile.ceiling_requests)
    else:
        result = _python_estimate(ctx, settings, min(profile.ceiling_requests, 100_000))
    report = audit(ctx.client, settings, {ACCOUNT: BALANCE})
    # Every outcome carries the same request id here, so nothing keyed by request id is checked.
    result.check = {**report.as_dict(), "double_charged": "n/a", "missing": "n/a", "replay_mismatches": "n/a"}
    result.ok = not (report.money or report.negative) and report.outcomes >= result.charges
    return result


def _redis_benchmark(ctx: Context, settings: Settings, requests: int) -> ModeResult:
    conn = ctx.client.connection_pool.connection_kwargs
    args = ["redis-benchmark", "-h", str(conn.get("host", "127.0.0.1")), "-p", str(conn.get("port", 6379)),
            "--dbnum", str(conn.get("db", 0)), "-n", str(requests), "-c", str(CLIENTS), "-P", str(PIPELINE),
            "-r", str(RANDOM_RANGE), "--csv"]
    if conn.get("password"):
        args += ["-a", conn["password"]] + (["--user", conn["username"]] if conn.get("username") else [])
    request = parse_request({"request_id": ACCOUNT, "account": ACCOUNT, "amount": PRICE}, settings)
    # A charge in the authorize form (no entry to ack), with a random request id per call.
    names = codec.settle_keys(keys_of(ACCOUNT, settings))
    arguments = codec.settle_arguments(settings, request, PRICE, given={"request_id": "__rand_int__"})
    args += ["FCALL", "charge", str(len(names)), *names, *(str(a) for a in arguments)]
    with ctx.task(f"ceiling: redis-benchmark -c {CLIENTS} -P {PIPELINE}", requests) as advance:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done = 0
        while True:
            running = proc.poll() is None
            count = ctx.results_count(settings)
            advance(count - done)
            done = count
            if not running:
                break
            time.sleep(POLL_S)
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({proc.returncode}): {stderr.strip()[-500:]}")
    row = list(csv.DictReader(io.StringIO(stdout)))[-1]
    rate = float(row["rps"])
    return ModeResult(
        "ceiling", requests, requests / rate, {}, False,
        percentiles={p: float(row[f"{p}_latency_ms"]) for p in ("p50", "p95", "p99", "max")},
        extra={"tool": "redis-benchmark", "clients": CLIENTS, "pipeline": PIPELINE},
        notes=[f"redis-benchmark, {CLIENTS} clients, pipeline {PIPELINE}; latency is per pipelined call"],
    )


def _python_estimate(ctx: Context, settings: Settings, requests: int) -> ModeResult:
    """Pipelined FCALLs from this process: bounded by Python, so it understates the ceiling."""
    began = time.perf_counter()
    with ctx.task("ceiling: Python estimate", requests) as advance:
        for start in range(0, requests, ESTIMATE_CHUNK):
            pipe = ctx.client.pipeline(transaction=False)
            for i in range(start, min(start + ESTIMATE_CHUNK, requests)):
                request = parse_request({"request_id": f"ceiling-{i}", "account": ACCOUNT, "amount": PRICE}, settings)
                codec.settle(pipe, settings, request, PRICE)
            pipe.execute()
            advance(min(ESTIMATE_CHUNK, requests - start))
    seconds = time.perf_counter() - began
    return ModeResult("ceiling", requests, seconds, {}, False, extra={"tool": "python estimate"},
                      notes=["redis-benchmark is not on PATH: a Python estimate, pipelined from one process; "
                             "it understates what Redis can do"])
