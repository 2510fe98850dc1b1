"""`charging bench`: every mode in one run against one server, so the ratios hold on a
noisy machine; the independent checker after each mode; the report at the end."""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
import uuid
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from charging.connection import connect
from charging.settings import Settings
from charging.tools.bench import (authorize, baseline, ceiling, drain, gateway, lots, memcached, memory, naive, report,
                                  sessions, steady)
from charging.tools.bench.context import Context
from charging.tools.bench.memcached import INSTALL_HINT as MEMCACHED_HINT
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from charging.tools.redis_server import RedisServer

MODES = (ceiling, drain, baseline, lots, steady, authorize, gateway, sessions, naive, memcached, memory)
# On a cluster only the engine's own paths: redis-benchmark, the naive handler and the
# memory probe each measure one server.
CLUSTER_MODES = (drain, steady, authorize, gateway, sessions)


def run_bench(settings: Settings, profile: Profile, out: Path, own_server: bool, console: Console) -> int:
    """own_server: spawn a private redis-server (and flush it between modes); otherwise use
    settings.redis_url and leave every key there (each run has its own namespaces)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="charging-bench-") as data_dir:
        server = RedisServer(data_dir).start() if own_server else None
        try:
            if server:
                settings = settings.model_copy(update={"redis_url": server.url, "redis_cluster": False})
                console.print(f"private redis-server on port {server.port} (AOF, appendfsync everysec)")
            return _run(settings, profile, out, server is not None, console)
        finally:
            if server:
                server.stop()


def _run(settings: Settings, profile: Profile, out: Path, own_server: bool, console: Console) -> int:
    client = connect(settings)
    results: list[ModeResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        ctx = Context(settings, client, out, uuid.uuid4().hex[:6], progress, own_server)
        for mode in CLUSTER_MODES if settings.cluster else MODES:
            ctx.reset()
            produced = mode.run(ctx, profile)
            if produced is None:
                ctx.print(f"[yellow]memcached mode skipped:[/] {MEMCACHED_HINT}")
                continue
            used = client.info("memory")["used_memory"]
            for result in produced if isinstance(produced, list) else [produced]:
                result.extra["redis_used_memory_after"] = used
                results.append(result)
                ctx.print(report.mode_table(result))
    meta = _meta(client, profile)
    target_rows = report.targets(results)
    console.print(report.summary_table(results))
    console.print(report.targets_table(target_rows))
    per_charge = next((r.extra["bytes_per_charge"] for r in results if r.mode == "memory"), None)
    capacity = []
    if per_charge:
        console.print(report.memory_table(per_charge, settings.results_maxlen))
        capacity = [{"rate_per_s": rate, "dedupe_window_s": window,
                     "bytes": report.capacity_bytes(per_charge, rate, window, settings.results_maxlen)}
                    for rate, window in report.CAPACITY_EXAMPLES]
    report.write_json(out / "bench.json", {**meta, "bytes_per_charge": per_charge, "capacity": capacity}, results,
                      target_rows)
    report.write_plot(out / "bench.png", results, f"charging bench, profile {profile.name}, "
                                                   f"{meta['machine']['cpus']} cores, {meta['date'][:10]}")
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0 if all(r.ok for r in results) else 1


def _meta(client, profile: Profile) -> dict:
    server = client.info("server")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.as_dict(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "redis_version": server["redis_version"]},
        "redis_used_memory_end": client.info("memory")["used_memory"],
        "note": "one machine runs Redis, workers and load generators; other processes share its cores, "
                "so numbers are noisy: compare modes within one run",
    }
