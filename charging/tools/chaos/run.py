"""One chaos run: a private redis-server, a worker fleet, producer processes, the fault plan
carried out while the load runs, then the wait until everything is settled and the verdict."""

from __future__ import annotations

import multiprocessing
import random
import shutil
import tempfile
import time
from pathlib import Path

import redis

from charging import codec
from charging import log as logging_setup
from charging.app.accounts import numbered
from charging.connection import connect
from charging.keys import all_partitions
from charging.settings import Settings
from charging.tools.chaos import load, report
from charging.tools.chaos.lots import give, plan_lots
from charging.tools.chaos.check import judge
from charging.tools.chaos.faults import Injector, plan
from charging.tools.chaos.profile import FULL, QUICK, Profile
from charging.tools.chaos.workers import Fleet
from charging.tools.redis_server import RedisServer, RedisServerMissing

# Short reclaim and maintenance intervals, so a stalled worker's entries are taken over within
# the run; two partitions, so a wrong-partition entry is possible and workers read two streams;
# the default client retries, which faults.LONG_OUTAGE_S is made to outlast.
CHAOS_SETTINGS = {"namespace": "chaos", "partitions": 2, "redis_cluster": False, "reclaim_idle_ms": 1000,
                  "maintenance_interval_s": 0.25, "block_ms": 500, "batch": 200, "retry_attempts": 8,
                  "log_level": "info"}
SETTLE_TIMEOUT_S = 300
POLL_S = 0.2


def run_chaos(quick: bool, seed: int | None, out: Path | None, fsync: str) -> int:
    """Returns the exit code: 0 when every check held, 1 on any violation."""
    profile = QUICK if quick else FULL
    seed = random.randrange(1_000_000) if seed is None else seed
    out = out or Path("chaos-out") / f"{profile.name}-{fsync}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    logging_setup.configure("warning")
    try:
        server = RedisServer(tempfile.mkdtemp(prefix="redis-", dir=out), appendfsync=fsync).start()
    except RedisServerMissing:
        report.console.print("[bold red]error:[/] chaos starts, kills and restarts its own redis-server (>= 7.0), "
                             "which is not on PATH (Debian/Ubuntu: apt-get install redis-server; macOS: brew "
                             "install redis)", highlight=False)
        return 1
    overrides = {**CHAOS_SETTINGS, "redis_url": server.url}
    settings = Settings(**overrides)
    fleet = Fleet({f"CHARGING_{k.upper()}": str(v) for k, v in overrides.items()}, profile.workers, out / "workers")
    report.announce(profile, seed, fsync, out)
    try:
        facts = _run(settings, profile, seed, fsync, server, fleet, out)
    finally:
        fleet.shutdown()
        server.stop()
    if facts["verdict"] == "pass":
        shutil.rmtree(server.data_dir)  # the AOF is kept only to look into a failed run
    else:
        facts["redis"]["kept_data_dir"] = str(server.data_dir)
    report.save(facts, out / "chaos-report.json")
    report.show(facts)
    return 0 if facts["verdict"] == "pass" else 1


def _run(settings: Settings, profile: Profile, seed: int, fsync: str, server: RedisServer, fleet: Fleet,
         out: Path) -> dict:
    client = connect(settings)
    start_balances = {account: profile.balance for account in numbered(profile.accounts)}
    codec.set_balances(client, settings, start_balances.items())
    started_with = plan_lots(profile, seed, list(start_balances))
    give(client, settings, started_with)
    fleet.start_all()
    faults = plan(profile, seed, settings.reclaim_idle_ms / 1000)
    # The injector's probes (what a worker holds before a stall) answer at once while Redis
    # is down, instead of after the retries every other client rides out an outage with:
    # a stall planned during an outage would otherwise hold up the plan for minutes.
    probe = connect(settings.model_copy(update={"retry_attempts": 0}), load=False)
    injector = Injector(faults, fleet, server, probe, settings)
    (out / "producers").mkdir(exist_ok=True)
    paths = [out / "producers" / f"producer-{i}.json" for i in range(profile.producers)]
    for path in paths:
        path.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")  # no inherited sockets or locks
    producers = [ctx.Process(target=load.run, args=(settings.model_dump(), profile, seed, i, str(path)),
                             name=f"chaos-p{i}") for i, path in enumerate(paths)]
    started = time.monotonic()
    for proc in producers:
        proc.start()
    injector.run(started)
    while any(proc.is_alive() for proc in producers):
        fleet.watch()
        time.sleep(POLL_S)
    loaded = time.monotonic()
    settled = _wait_settled(client, settings, fleet)
    stop_codes = fleet.shutdown()
    records = [load.Record.load(path) for path in paths if path.exists()]
    events = fleet.events()
    verdict = judge(client, settings, profile, fsync, start_balances, started_with.granted, records, injector.done,
                    events, fleet.exits, stop_codes)
    verdict.require(len(records) == len(producers),
                    f"producers crashed: exit codes {[p.exitcode for p in producers]}")
    verdict.require(settled, f"not settled within {SETTLE_TIMEOUT_S}s after the load")
    return report.facts(
        profile=profile, seed=seed, fsync=fsync, settings=CHAOS_SETTINGS, records=records,
        lots=started_with.summary(profile), faults=faults,
        done=injector.done, events=events, exits=fleet.exits, verdict=verdict,
        memory=client.info("memory"),
        elapsed={"load_s": loaded - started, "settle_s": time.monotonic() - loaded,
                 "total_s": time.monotonic() - started})


def _wait_settled(client: redis.Redis, settings: Settings, fleet: Fleet) -> bool:
    """Every entry delivered to the group and nothing pending, in every partition."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(_partition_settled(client, settings, keys.requests)
               for keys in all_partitions(settings.namespace, settings.partitions)):
            return True
        fleet.watch()
        time.sleep(POLL_S)
    return False


def _partition_settled(client: redis.Redis, settings: Settings, stream: str) -> bool:
    try:
        last = client.xinfo_stream(stream)["last-generated-id"]
        groups = client.xinfo_groups(stream)
    except redis.RedisError:
        return False
    return any(g["name"] == settings.group.encode() and g["pending"] == 0 and g["last-delivered-id"] == last
               for g in groups)
