"""The tools' commands: demo, bench and chaos. They spawn their own redis-server and load
generators; bench needs the [bench] extra (numpy, matplotlib, pymemcache)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from charging.app.cli import fail, make_console, state, talks_to_redis
from charging.tools.chaos.run import run_chaos
from charging.tools.demo import run_demo
from charging.tools.redis_server import RedisServerMissing


def register(app: typer.Typer) -> None:
    for command in (talks_to_redis(demo), bench, chaos):
        app.command()(command)


def demo(charges: Annotated[int, typer.Option(min=1, max=10_000_000)] = 20_000,
         workers: Annotated[int, typer.Option(min=1, max=64)] = 2,
         accounts: Annotated[int, typer.Option(min=1, max=1_000_000)] = 100,
         balance: Annotated[int, typer.Option(min=1)] = 10_000,
         data_dir: Annotated[Path | None, typer.Option(help="Where the private redis-server keeps its AOF "
                                                            "(kept; default: a temp dir, removed at the end).")]
         = None,
         keep: Annotated[bool, typer.Option(help="Keep the temp dir (AOF, redis.log, worker.log) and say where.")]
         = False):
    """Spawn a private Redis (unless --redis-url), run workers and a mixed load, check the sums."""
    if data_dir is not None and state.redis_url is not None:
        fail(2, "--data-dir is the private redis-server's; with --redis-url there is none. Drop one or the other")
    try:
        code = run_demo(state, charges=charges, workers=workers, accounts=accounts, balance=balance,
                        data_dir=data_dir, keep=keep)
    except RedisServerMissing as exc:
        fail(1, str(exc))
    raise typer.Exit(code)


def bench(profile: Annotated[str, typer.Argument(help="standard, quick or tiny.")] = "standard",
          quick: Annotated[bool, typer.Option("--quick", help="The quick profile (a few minutes).")] = False,
          out_dir: Annotated[Path, typer.Option("--out", help="For bench.json and bench.png.")] = Path("bench-out"),
          redis_url: Annotated[str | None, typer.Option(help="Use this server instead of a private one.")] = None):
    """Measure every mode against the Redis ceiling, checking the money after each (a private
    redis-server unless --redis-url; on a cluster URL: drain, steady and authorize only)."""
    try:
        from charging.tools.bench.profile import PROFILES
        from charging.tools.bench.run import run_bench
    except ModuleNotFoundError as exc:  # numpy, matplotlib: the [bench] extra
        fail(1, f"charging bench needs {exc.name}, which comes with the bench extra: "
                "pip install 'redis-charging[bench]'")
    if quick and profile not in ("standard", "quick"):
        fail(2, f"--quick and profile {profile!r} contradict each other")
    name = "quick" if quick else profile
    if name not in PROFILES:
        fail(2, f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    url = redis_url or state.redis_url
    settings = state.settings if url is None else state.settings.model_copy(update={"redis_url": url})
    raise typer.Exit(run_bench(settings, PROFILES[name], out_dir, own_server=url is None,
                               console=make_console(markup=True)))


def chaos(quick: Annotated[bool, typer.Option(help="About 10k charges and fewer faults (CI).")] = False,
          seed: Annotated[int | None, typer.Option(help="Replays a run's fault plan and load (default: random).")]
          = None,
          out: Annotated[Path | None, typer.Option(help="Where the report, logs and producers' records go.")] = None,
          fsync: Annotated[str, typer.Option(help="Redis appendfsync policy: always or everysec.")] = "always"):
    """Kill and stall workers and Redis under load, feed bad entries, then check nothing was lost or charged twice."""
    if state.redis_url is not None:
        fail(2, "chaos spawns and kills its own redis-server; it does not take --redis-url")
    if fsync not in ("always", "everysec"):
        fail(2, f"--fsync must be always or everysec, got {fsync!r}")
    raise typer.Exit(run_chaos(quick=quick, seed=seed, out=out, fsync=fsync))
