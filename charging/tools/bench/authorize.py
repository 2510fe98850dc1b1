"""authorize: concurrent clients on the synchronous path (Producer.authorize: the same
function the workers call, no stream). Run twice: closed loop (every client sends its next
charge as soon as the last one is answered: the most this path does here), then paced at
at the profile's fixed rate (all clients together), the latency a client sees when the
machine is not saturated."""

from __future__ import annotations

from charging import codec
from charging.app.audit import audit
from charging.connection import connect
from charging.settings import Settings
from charging.tools.bench import load as loads
from charging.tools.bench.clients import run_clients
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from producer import Producer


class AuthorizeClient:
    def __init__(self, settings_dump: dict):
        settings = Settings(**settings_dump)
        self.producer = Producer(connect(settings, load=False), settings)

    def __call__(self, request: dict) -> str:
        return self.producer.authorize(request).status


def run(ctx: Context, profile: Profile) -> list[ModeResult]:
    return [_run(ctx, profile, rate=None, seed=3), _run(ctx, profile, rate=profile.authorize_rate, seed=4)]


def _run(ctx: Context, profile: Profile, rate: int | None, seed: int) -> ModeResult:
    ctx.reset()
    settings = ctx.settings_for(f"authorize{rate or ''}")
    load = loads.mixed(profile.accounts, profile.client_charges, seed=seed, prefix=f"{settings.namespace}-")
    codec.set_balances(ctx.client, settings, load.balances.items())
    label = "closed loop" if rate is None else f"paced {rate:,.0f}/s"
    with ctx.task(f"authorize: {label}", len(load)) as advance:
        before = ctx.redis_work()
        run = run_clients(AuthorizeClient, (settings.model_dump(),), load.requests, profile.clients,
                          profile.client_processes, rate, advance)
        after = ctx.redis_work()
    check = audit(ctx.client, settings, load.balances, load.expected)
    name = "authorize" if rate is None else f"authorize {rate / 1000:g}k/s"
    return ModeResult(
        name, len(run.replies), run.seconds, check.as_dict(), check.ok and not run.errors,
        latencies_ms=run.latencies_ms, done_at_s=run.done_at_s,
        extra={"clients": profile.clients, "client_processes": profile.client_processes,
               "offered_rate_per_s": rate, "errors": len(run.errors),
               "first_errors": run.errors[:3], "per_charge": before.per_charge(after, len(load))},
        notes=[f"{profile.clients} clients, {label}; latency measured in the client (includes the Python client)"],
    )
